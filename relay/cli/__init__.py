"""The ``opsrelay`` command line: :mod:`.app` (typer), :mod:`.queues`, shared :mod:`.common`."""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """The ``opsrelay`` console script."""
    from relay.cli.app import app

    app()
