"""``opsrelay queue``, ``dlq …`` and ``unrouted …``: what waits where, and the operator's hands on it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from relay.cli.common import (
    EX_CONFIG,
    EX_FAILED,
    EX_USAGE,
    AllOption,
    ConfigOption,
    IdsArgument,
    JsonOption,
    app,
    config_or_exit,
    echo_json,
    fail,
    with_engine,
)

if TYPE_CHECKING:
    from relay.engines.base import Engine
    from relay.ops.dlq import DeadEntry
    from relay.ops.unrouted import UnroutedReport

__all__ = ["dlq_app", "unrouted_app"]


dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: mail and events that could not be delivered.")
unrouted_app = typer.Typer(no_args_is_help=True, help="Events no subscription matched, kept in <prefix>.unrouted.")
app.add_typer(dlq_app, name="dlq")
app.add_typer(unrouted_app, name="unrouted")



_ROLES = {"outbound": "ready to deliver", "retry": "waiting to retry", "dead": "dead letters (opsrelay dlq list)",
          "unrouted": "events no subscription matched (opsrelay unrouted list)", "subscription": "events to render"}


@app.command("queue")
def queue_command(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """What waits in outbound, retry, dead-letter, unrouted and subscription queues; held delivery."""
    cfg = config_or_exit(config)
    # The retry steps as the relay names them (one queue per backoff step).
    from relay.daemon.relay import retry_delays_ms
    from relay.ops.stats import queue_stats

    delays = retry_delays_ms(cfg)
    subs = [s.name for s in cfg.subscriptions]
    stats = with_engine(cfg, lambda engine: queue_stats(engine, cfg.broker.prefix, delays, subs,
                                                         cfg.smtp.smarthosts))
    from relay.config.fast import load_path
    from relay.maildrop.ingest import Maildrop

    dropped, oldest = Maildrop(load_path(cfg.source)).waiting()
    if as_json:
        echo_json({**stats.to_dict(), "maildrop": {"folder": cfg.sendmail.maildrop, "waiting": dropped,
                                                   "oldest_seconds": None if oldest is None else round(oldest, 1)}})
        return
    faults: dict[str, list[str]] = {}
    for held in stats.held:
        faults.setdefault(held.fault, []).append(held.id)
    for fault, ids in faults.items():
        typer.echo(f"DELIVERY HELD: {fault} ({len(ids)} mail(s) wait until the smarthost or config is fixed)")
    for budget in stats.budgets:
        if budget.until is not None:
            typer.echo(f"waiting for the sending budget of {budget.smarthost} until {_local(budget.until)} "
                       f"({budget.used} of {budget.limit} per {budget.window} used)")
    width = max(len(q.name) for q in stats.queues)
    for q in stats.queues:
        ready = "-" if q.ready is None else str(q.ready)
        note = "not declared yet" if q.ready is None else _ROLES[q.role]
        typer.echo(f"{q.name:<{width}}  {ready:>6}  {note}")
    if dropped:
        typer.echo(f"{cfg.sendmail.maildrop}: {dropped} mail(s) from local users waiting to be ingested, "
                   f"the oldest for {round(oldest or 0)}s")


def _summary_lines(entry: DeadEntry) -> list[str]:
    who = f"to {', '.join(entry.recipients)}" if entry.recipients else f"from {entry.source or '?'}"
    attempts = "" if entry.attempts is None else f"  {entry.attempts} attempt(s)"
    subject = f"  {entry.subject!r}" if entry.subject else ""
    return [f"{entry.id}  {entry.kind}  {entry.dead_at}{attempts}  {who}{subject}", f"    {entry.reason}"]


@dlq_app.command("list")
def dlq_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every dead letter, oldest first (left in place)."""
    cfg = config_or_exit(config)
    from relay.contract.names import dead_queue
    from relay.ops.dlq import list_dead

    prefix = cfg.broker.prefix
    entries = with_engine(cfg, lambda engine: list_dead(engine, prefix))
    if as_json:
        echo_json([e.summary(prefix) for e in entries])
        return
    typer.echo(f"{len(entries)} dead letter(s) in {dead_queue(prefix)}")
    for entry in entries:
        for line in _summary_lines(entry):
            typer.echo(line)


@dlq_app.command("show")
def dlq_show(dead_id: Annotated[str, typer.Argument(metavar="ID", help="a dead-letter id")],
             config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """One dead letter in full: why, every attempt, and the message itself."""
    cfg = config_or_exit(config)
    from relay.contract.names import dead_queue
    from relay.ops.dlq import show_dead

    prefix = cfg.broker.prefix
    entries = with_engine(cfg, lambda engine: show_dead(engine, prefix, dead_id))
    if not entries:
        fail(f"no dead letter {dead_id!r} in {dead_queue(prefix)}", EX_FAILED)
    if as_json:
        # A list: a mail whose recipients failed at different times died in parts, one id.
        echo_json([e.detail(prefix) for e in entries])
        return
    for n, entry in enumerate(entries):
        detail = entry.detail(prefix)
        if n:
            typer.echo("")
        for label, key in (("id", "id"), ("kind", "kind"), ("dead at", "dead_at"), ("from queue", "from"),
                           ("reason", "reason"), ("sender", "sender"), ("subject", "subject")):
            if detail[key] is not None:
                typer.echo(f"{label + ':':<12}{detail[key]}")
        if entry.mail is not None:
            typer.echo(f"{'recipients:':<12}{', '.join(entry.recipients)}")
            typer.echo(f"{'attempts:':<12}{entry.attempts} (held {entry.mail.holds} time(s))")
        why = detail["not_replayable_because"]
        typer.echo(f"{'replayable:':<12}{'yes' if why is None else 'no: ' + why}")
        if detail["history"]:
            typer.echo("history:")
        for i, attempt in enumerate(detail["history"], 1):
            via = f" (via {attempt['smarthost']})" if attempt["smarthost"] else ""
            typer.echo(f"  {i}. {attempt['at']}  {', '.join(attempt['recipients'])}: {attempt['reply']}{via}")
        typer.echo("--- message ---")
        # Mail travels with CRLF line ends (RFC 5322); a terminal wants LF.
        typer.echo(detail["message"].replace("\r\n", "\n").rstrip("\n"))


def _ids_or_all(ids: list[str] | None, every: bool) -> list[str] | None:
    if bool(ids) == every:
        fail("give dead-letter IDs or --all (one of them)", EX_USAGE)
    return None if every else ids


@dlq_app.command("replay")
def dlq_replay(ids: IdsArgument = None, every: AllOption = False, config: ConfigOption = None,
               as_json: JsonOption = False) -> None:
    """Send dead letters back: a mail to outbound with fresh attempts, an event to its subscription.

    A replayed letter leaves the dead-letter queue. Exits 1 if a named ID is missing or cannot be replayed.
    """
    cfg = config_or_exit(config)
    from relay.ops.dlq import replay

    chosen = _ids_or_all(ids, every)
    prefix = cfg.broker.prefix
    report = with_engine(cfg, lambda engine: replay(engine, prefix, chosen))
    if as_json:
        echo_json({"replayed": [{"id": e.id, "kind": e.kind, "to": q} for e, q in report.replayed],
                    "refused": [{"id": e.id, "kind": e.kind, "reason": why} for e, why in report.refused],
                    "missing": list(report.missing)})
    else:
        for entry, target in report.replayed:
            typer.echo(f"replayed {entry.id} ({entry.kind}) to {target}")
        for entry, why in report.refused:
            typer.echo(f"not replayed {entry.id} ({entry.kind}): {why}")
        for missing in report.missing:
            typer.echo(f"no dead letter {missing}")
        if not (report.replayed or report.refused or report.missing):
            typer.echo("no dead letters")
    if report.missing or (chosen is not None and report.refused):
        raise typer.Exit(EX_FAILED)


@dlq_app.command("purge")
def dlq_purge(ids: IdsArgument = None, every: AllOption = False, config: ConfigOption = None,
              as_json: JsonOption = False) -> None:
    """Delete dead letters for good. Exits 1 if one of the IDs is not there."""
    cfg = config_or_exit(config)
    from relay.ops.dlq import purge

    chosen = _ids_or_all(ids, every)
    prefix = cfg.broker.prefix
    report = with_engine(cfg, lambda engine: purge(engine, prefix, chosen))
    if as_json:
        echo_json({"purged": [{"id": e.id, "kind": e.kind} for e in report.purged],
                    "missing": list(report.missing)})
    else:
        for entry in report.purged:
            typer.echo(f"purged {entry.id} ({entry.kind})")
        for missing in report.missing:
            typer.echo(f"no dead letter {missing}")
        if not (report.purged or report.missing):
            typer.echo("no dead letters")
    if report.missing:
        raise typer.Exit(EX_FAILED)


@unrouted_app.command("list")
def unrouted_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The events no subscription matched, oldest first (left in place)."""
    cfg = config_or_exit(config)
    from relay.contract.names import unrouted_queue
    from relay.ops.browse import browse
    from relay.ops.unrouted import unrouted_summary

    queue = unrouted_queue(cfg.broker.prefix)
    events = [unrouted_summary(m) for m in with_engine(cfg, lambda engine: browse(engine, queue))]
    if as_json:
        echo_json(events)
        return
    typer.echo(f"{len(events)} event(s) in {queue}")
    for event in events:
        typer.echo(f"{event['id']}  {event['key']}  {event.get('event') or event.get('error')}")


@unrouted_app.command("replay")
def unrouted_replay(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Publish the unrouted events again, to reach the subscriptions of this config.

    Declares the config's subscriptions first, as serve does. What still matches nothing stays in unrouted.
    """
    cfg = config_or_exit(config)
    from relay.contract.names import unrouted_queue
    from relay.daemon.relay import relay_topology
    from relay.ops.unrouted import replay_unrouted

    async def work(engine: Engine) -> UnroutedReport:
        await engine.declare(relay_topology(cfg))
        return await replay_unrouted(engine, cfg.broker.prefix)

    report = with_engine(cfg, work)
    queue = unrouted_queue(cfg.broker.prefix)
    if as_json:
        echo_json({"replayed": report.replayed, "remaining": report.remaining, "keys": dict(report.keys)})
        return
    typer.echo(f"replayed {report.replayed} event(s) from {queue}; it now holds {report.remaining} "
               "(what no subscription matches)")




def _local(unix: float) -> str:
    """A time for a person: local, to the second, with its UTC offset."""
    import datetime

    return datetime.datetime.fromtimestamp(unix).astimezone().isoformat(timespec="seconds")


@app.command("status")
def status_command(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Is alert mail flowing? Exit 0 healthy, 1 held or stale (or no relay), 2 broker unreachable."""
    import asyncio
    import time

    from relay.engines import open_engine
    from relay.errors import ConfigurationError, RelayError
    from relay.ops.status import Status, gather, unreachable

    cfg = config_or_exit(config)

    async def run() -> Status:
        async with open_engine(cfg.broker.url, **cfg.broker.engine_options) as engine:
            return await gather(engine, cfg)

    try:
        status = asyncio.run(run())
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    except RelayError as exc:
        status = unreachable(cfg, str(exc))
    if as_json:
        echo_json(status.to_dict())
        raise typer.Exit(status.exit_code)
    doc = status.to_dict()
    problems = doc["problems"]
    typer.echo("OK: mail is flowing" if not problems else f"NOT OK: {problems[0]}")
    for problem in problems[1:]:
        typer.echo(f"  also: {problem}")
    typer.echo(f"broker     {doc['broker']['url']}  {'reachable' if status.reachable else 'UNREACHABLE'}")
    if not status.reachable:
        raise typer.Exit(status.exit_code)
    for relay in doc["relays"]:
        owns = f", owns {', '.join(relay['owns'])}" if relay["owns"] else ""
        typer.echo(f"relay      {relay['id']}  seen {relay['seen_seconds_ago']:g}s ago, up {relay['up_seconds']}s"
                   f"{owns}")
    for name, seen in doc["smarthosts"].items():
        ok = _local(seen["last_ok"]) if seen["last_ok"] else "never"
        failure = (f"; last failure {_local(seen['last_failure'])}: {seen['last_reply']}" if seen["last_failure"]
                   else "")
        typer.echo(f"smarthost  {name}  last success {ok}{failure}")
    for q in doc["queues"]:
        age = "" if q["oldest_seconds"] is None else f"  oldest {q['oldest_seconds']:g}s"
        typer.echo(f"queue      {q['queue']:<24} {q['messages']:>6}{age}")
    now = time.time()
    for s in status.silences:
        typer.echo(f"silence    {s.id}  {' '.join(str(m) for m in s.matchers)} for {round(s.ends - now)}s more"
                   f"{'  ' + repr(s.comment) if s.comment else ''}")
    raise typer.Exit(status.exit_code)
