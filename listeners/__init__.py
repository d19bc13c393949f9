"""opsrelay's supervisord eventlistener: protocol, event normalisation, publishing."""
