"""``opsrelay silence add|list|expire``: mute what a deploy is about to cause, from any host that reaches the broker."""

from __future__ import annotations

import getpass
import socket
import time
from datetime import datetime
from typing import Annotated

import typer

from relay.cli.common import EX_USAGE, ConfigOption, JsonOption, app, config_or_exit, echo_json, fail, with_engine

__all__ = ["silence_app"]

silence_app = typer.Typer(no_args_is_help=True, help="Silences: events they match are not mailed until they end.")
app.add_typer(silence_app, name="silence")


def _until(text: str) -> float:
    """An ISO time (local when it has no offset) as unix seconds."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--until {text!r} is not an ISO time (2026-12-03T18:00 or 2026-12-03T18:00+01:00)") from None
    return when.timestamp()


@silence_app.command("add")
def silence_add(
    match: Annotated[list[str], typer.Option("--match", "-m", help="key=glob; keys: host, group, process, program "
                                                                   "(group:process or process), state, subscription; "
                                                                   "all must match")],
    for_: Annotated[str | None, typer.Option("--for", help="how long: 2h, 30m, 1h30m")] = None,
    until: Annotated[str | None, typer.Option("--until", help="when it ends: an ISO time")] = None,
    comment: Annotated[str, typer.Option("--comment", "-c", help="why (shown in list and in the summary)")] = "",
    quiet_summary: Annotated[bool, typer.Option("--quiet-summary", help="no summary mail when it ends")] = False,
    config: ConfigOption = None, as_json: JsonOption = False,
) -> None:
    """Add a silence; prints its id. A silence needs an end (--for or --until)."""
    from relay.config.rules import check_duration
    from relay.notify.silence import make_silence, parse_matcher
    from relay.notify.silence_log import add_silence

    cfg = config_or_exit(config)
    now = time.time()
    try:
        matchers = [parse_matcher(m) for m in match]
        if (for_ is None) == (until is None):
            raise ValueError("give exactly one of --for and --until: a silence without an end is refused")
        ends = now + check_duration(for_) if for_ is not None else _until(until or "")
        silence = make_silence(matchers, starts=now, ends=ends, comment=comment, quiet_summary=quiet_summary,
                               created_by=f"{getpass.getuser()}@{socket.gethostname()}")
    except ValueError as exc:
        fail(str(exc), EX_USAGE)
    with_engine(cfg, lambda engine: add_silence(engine, cfg.broker.prefix, silence))
    if as_json:
        echo_json(silence.to_dict())
    else:
        typer.echo(silence.id)


@silence_app.command("list")
def silence_list(config: ConfigOption = None, as_json: JsonOption = False,
                 ended: Annotated[bool, typer.Option("--ended", help="also those that ended (kept 7 days)")] = False,
                 ) -> None:
    """Active silences (and, with --ended, those that ended lately)."""
    from relay.notify.silence_log import read_silences

    cfg = config_or_exit(config)
    silences = with_engine(cfg, lambda engine: read_silences(engine, cfg.broker.prefix))
    now = time.time()
    shown = [s for s in silences.values() if ended or s.ends > now]
    if as_json:
        echo_json([{**s.to_dict(), "active": s.active(now)} for s in shown])
        return
    if not shown:
        typer.echo("no silences" if ended else "no active silences")
    for s in shown:
        state = "active" if s.active(now) else "ended" if s.ends <= now else "pending"
        typer.echo(f"{s.id}  {state:<7} until {s.to_dict()['ends_at']}  {' '.join(str(m) for m in s.matchers)}"
                   f"{'  ' + repr(s.comment) if s.comment else ''}  by {s.created_by or '?'}")


@silence_app.command("expire")
def silence_expire(silence_id: Annotated[str, typer.Argument(metavar="ID")], config: ConfigOption = None) -> None:
    """End a silence now (its summary mail follows, unless it was added with --quiet-summary)."""
    from relay.notify.silence_log import expire_silence

    cfg = config_or_exit(config)
    silence = with_engine(cfg, lambda engine: expire_silence(engine, cfg.broker.prefix, silence_id, time.time()))
    typer.echo(f"expired {silence.id} ({' '.join(str(m) for m in silence.matchers)})")
