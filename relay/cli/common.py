"""What every ``opsrelay`` command shares: the typer app, the common options, one-line failures
with sysexits codes, the config, logging, and a connected engine."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

from relay.config.models import Config, load_config
from relay.errors import ConfigurationError, RelayError

if TYPE_CHECKING:
    from relay.engines.base import Engine

__all__ = ["EX_CONFIG", "EX_FAILED", "EX_OK", "EX_TEMPFAIL", "EX_UNAVAILABLE", "EX_USAGE", "AllOption",
           "ConfigOption", "IdsArgument", "JsonOption", "app", "config_or_exit", "echo_json", "fail", "setup_logging",
           "with_engine"]

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 69, 75, 78
# Not in sysexits.h: the command ran, but something it was asked for is not there or could not be done.
EX_FAILED = 1
_T = TypeVar("_T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="supervisord process events to email that reaches a person.")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="config file (TOML)")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"opsrelay: {message}", err=True)
    raise typer.Exit(code)


def config_or_exit(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)


def setup_logging(verbose: bool = False) -> None:
    # stderr only: stdout belongs to the supervisord protocol in `listen`.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aio_pika", "aiormq", "aiosmtplib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def with_engine(cfg: Config, work: Callable[[Engine], Awaitable[_T]]) -> _T:
    """Run ``work`` on a connected engine: a broker that is away exits 75 with one line."""
    from relay.engines import open_engine

    async def run() -> _T:
        async with open_engine(cfg.broker.url, **cfg.broker.engine_options) as engine:
            return await work(engine)

    try:
        return asyncio.run(run())
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    except RelayError as exc:
        fail(f"broker unavailable: {exc}", EX_TEMPFAIL)


def echo_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


IdsArgument = Annotated[list[str] | None, typer.Argument(metavar="[ID]...", show_default=False,
                                                         help="dead-letter ids, as `opsrelay dlq list` shows them")]
AllOption = Annotated[bool, typer.Option("--all", help="every dead letter")]
