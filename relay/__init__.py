"""opsrelay's relay: config, models, engines, routing, rendering and SMTP delivery."""
