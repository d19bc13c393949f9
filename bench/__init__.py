"""Benchmarks of opsrelay against the bare libraries and the incumbent (superlance's crashmail).

``python -m bench`` runs them all; ``python -m bench listener`` or ``python -m bench relay`` one.
They print plain-text tables and never assert timings. See bench/README.md.
"""
