"""The ``opsrelay`` command line (typer). Each command imports what it needs inside itself,
so ``opsrelay listen`` never pays for aiosmtplib or Jinja2."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from relay.config import Config, load_config
from relay.errors import ConfigurationError, RelayError

if TYPE_CHECKING:
    from relay.engines.base import Engine
    from relay.inspect import DeadEntry, UnroutedReport

__all__ = ["app", "main"]

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 69, 75, 78
# Not in sysexits.h: the command ran, but something it was asked for is not there or could not be done.
EX_FAILED = 1
_T = TypeVar("_T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="supervisord process events to email that reaches a person.")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="config file (TOML)")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"opsrelay: {message}", err=True)
    raise typer.Exit(code)


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)


def _logging(verbose: bool = False) -> None:
    # stderr only: stdout belongs to the supervisord protocol in `listen`.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aio_pika", "aiormq", "aiosmtplib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def listen(config: ConfigOption = None,
           verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
           program: Annotated[list[str] | None, typer.Option(
               "--program", "-p", help="crashmail: mail when this process (NAME or GROUP:NAME) exits "
                                       "unexpectedly; repeatable")] = None,
           any_program: Annotated[bool, typer.Option(
               "--any", "-a", help="crashmail: mail when any process exits unexpectedly (overrides -p)")] = False,
           email: Annotated[str | None, typer.Option(
               "--email", "-m", help="crashmail: mail here; this listener then also runs the relay")] = None,
           optionalheader: Annotated[str | None, typer.Option(
               "--optionalheader", "-o", help="crashmail: subject prefix, 'PREFIX: NAME crashed at TIME'")] = None,
           sendmail_program: Annotated[str | None, typer.Option(
               "--sendmail_program", "-s", help="crashmail: not run; its -f sender is kept")] = None,
           ignored: Annotated[list[str] | None, typer.Argument(hidden=True, metavar="URL")] = None) -> None:
    """The supervisord eventlistener: PROCESS_STATE events to the events exchange.

    It also takes superlance crashmail's flags, so `crashmail -a -m ADDR` becomes
    `opsrelay listen -a -m ADDR`: with -m the listener runs the relay for that mail itself.
    """
    from contextlib import AbstractContextManager, nullcontext

    from listeners.enrich import make_enricher
    from listeners.eventlistener import run, text_streams
    from listeners.publish import make_publisher
    from relay.config import find_config
    from relay.crashmail import CrashmailFlags, FlagError, config_with_crashmail, local_mta_env

    try:
        flags = CrashmailFlags.parse(programs=program or (), any_program=any_program, email=email,
                                     optional_header=optionalheader, sendmail=sendmail_program, ignored=ignored or ())
    except FlagError as exc:
        _fail(str(exc), EX_USAGE)
    _logging(verbose)
    # crashmail used the host's sendmail: with -m and no config file, the local MTA on port 25.
    env = local_mta_env(os.environ) if flags.mails and find_config(config) is None else None
    try:
        cfg = config_with_crashmail(load_config(config, env), flags)
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)
    for note in flags.notes():
        logging.getLogger("opsrelay.listener").warning("%s", note)
    # UTF-8 whatever the locale, newlines untouched: supervisord's len: counts characters.
    stdin, stdout = text_streams(sys.stdin.buffer, sys.stdout.buffer)
    try:
        publisher = make_publisher(cfg)
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)
    hosting: AbstractContextManager[object] = nullcontext()
    if flags.mails:
        from listeners.hosted_relay import hosted_relay

        hosting = hosted_relay(cfg)
    code = EX_OK
    try:
        with hosting:
            code = run(stdin, stdout, publisher, host=cfg.host, enrich=make_enricher(cfg, os.environ))
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)
    except RelayError as exc:
        _fail(f"crashmail relay: {exc}", EX_TEMPFAIL)
    finally:
        publisher.close()
    raise typer.Exit(code)


@app.command()
def serve(config: ConfigOption = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """The relay daemon: subscriptions -> mail -> delivery, with retries and dead letters."""
    cfg = _config(config)
    _logging(verbose)
    from relay.daemon import serve_forever
    from relay.render import Renderer
    from relay.smtp import SmtpPool

    try:
        renderer = Renderer(cfg)
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        mailer = SmtpPool(cfg.smtp)
        try:
            await serve_forever(cfg, mailer, stop, renderer=renderer)
        finally:
            await mailer.close()

    try:
        asyncio.run(main())
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)
    logging.getLogger("opsrelay.relay").info("relay: stopped")


@app.command()
def check(config: ConfigOption = None,
          connect: Annotated[bool, typer.Option("--connect", help="also reach the broker and the SMTP server")] = False,
          as_json: JsonOption = False) -> None:
    """Validate the config; with --connect reach the broker and the smarthost (EHLO, TLS, AUTH, no mail)."""
    from relay.engines.base import mask_url
    from relay.render import Renderer

    cfg = _config(config)
    try:
        Renderer(cfg)
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)
    report: dict[str, Any] = {
        "host": cfg.host,
        "broker": mask_url(cfg.broker.url),
        "smtp": f"{cfg.smtp.host}:{cfg.smtp.effective_port} ({cfg.smtp.security.value}, "
                f"{'AUTH as ' + cfg.smtp.username if cfg.smtp.username else 'no AUTH'})",
        "subscriptions": {s.name: {"to": list(s.to), "bindings": list(s.bindings())} for s in cfg.subscriptions},
    }
    if cfg.smtp.ssmtp_conf is not None:
        from relay.config import ssmtp_notes

        report["ssmtp"] = ssmtp_notes(config)
    failed = False
    if connect:
        report["connect"], failed = asyncio.run(_probe(cfg))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"config ok: host {report['host']}, broker {report['broker']}, smtp {report['smtp']}")
        for name, sub in report["subscriptions"].items():
            typer.echo(f"  subscription {name} -> {', '.join(sub['to'])}: {' '.join(sub['bindings'])}")
        for note in report.get("ssmtp", []):
            typer.echo(f"  from {cfg.smtp.ssmtp_conf}: {note}")
        for part, result in report.get("connect", {}).items():
            typer.echo(f"  {part}: {result}")
    if failed:
        raise typer.Exit(EX_UNAVAILABLE)


async def _probe(cfg: Config) -> tuple[dict[str, str], bool]:
    from relay.engines import open_engine
    from relay.smtp import SmtpPool

    results: dict[str, str] = {}
    failed = False
    engine = open_engine(cfg.broker.url, confirm_timeout=cfg.broker.confirm_timeout)
    try:
        await engine.connect()
        results["broker"] = "ok"
    except RelayError as exc:
        results["broker"], failed = f"FAILED: {exc}", True
    finally:
        await engine.close()
    pool = SmtpPool(cfg.smtp)
    try:
        info = await pool.check()
        results["smtp"] = (f"ok: {info.host}:{info.port}, tls={'yes' if info.tls else 'no'}, "
                           f"auth={'yes' if info.authenticated else 'no'}")
    except RelayError as exc:
        results["smtp"], failed = f"FAILED: {exc}", True
    finally:
        await pool.close()
    return results, failed


@app.command()
def routes(key: Annotated[str, typer.Argument(help="a routing key, e.g. proc.web1.workers.worker_03.FATAL")],
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Which subscriptions a routing key reaches (bindings, then the residual filter)."""
    from relay.routing import key_fields, topic_matches

    cfg = _config(config)
    fields = key_fields(key)
    reached: list[dict[str, Any]] = []
    for sub in cfg.subscriptions:
        bound = [p for p in sub.bindings() if topic_matches(p, key)]
        accepted = bool(bound) and (fields is None or sub.accepts(fields))
        # A RUNNING it does not mail about may still end an outage (send_resolved).
        recovery = bool(bound) and not accepted and fields is not None and sub.watches_recovery(fields)
        reached.append({"subscription": sub.name, "bindings": bound, "reached": accepted or recovery,
                        "recovery_only": recovery})
    if as_json:
        typer.echo(json.dumps(reached, indent=2))
        return
    hits = [r for r in reached if r["reached"]]
    bound = [r["subscription"] for r in reached if r["bindings"]]
    if not hits and bound:
        typer.echo(f"{key}: no subscription (bound to {', '.join(bound)} but filtered out there, then dropped)")
    elif not hits:
        typer.echo(f"{key}: no subscription (kept in {cfg.broker.prefix}.unrouted)")
    for r in hits:
        only = ", recovery notices only" if r["recovery_only"] else ""
        typer.echo(f"{key} -> {r['subscription']} (binding {r['bindings'][0]}{only})")


@app.command("send-test")
def send_test(address: Annotated[str, typer.Argument(help="where to send the test mail")],
              config: ConfigOption = None) -> None:
    """Queue one test mail on outbound: the relay delivers it like any other."""
    from relay.engines import open_engine
    from relay.mail import OutboundMail, build_message, to_message
    from relay.render import default_sender
    from relay.topology import full_topology, outbound_queue

    cfg = _config(config)
    sender = default_sender(cfg)
    raw = build_message(sender=sender, to=[address], subject=f"[opsrelay] test mail from {cfg.host}",
                        body=f"This is a test mail from opsrelay on {cfg.host}.\n"
                             "If you can read it, the whole path works.\n")
    mail = OutboundMail(sender=sender, recipients=(address,), raw=raw, origin="send-test")

    async def enqueue() -> None:
        async with open_engine(cfg.broker.url, confirm_timeout=cfg.broker.confirm_timeout) as engine:
            await engine.declare(full_topology(cfg.broker.prefix, [], []))
            await engine.send(outbound_queue(cfg.broker.prefix), to_message(mail))

    try:
        asyncio.run(enqueue())
    except RelayError as exc:
        _fail(f"could not queue the test mail: {exc}", EX_TEMPFAIL)
    typer.echo(f"queued test mail {mail.message_id} to {address}")


# -- queues, dead letters, unrouted events --------------------------------------------------

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: mail and events that could not be delivered.")
unrouted_app = typer.Typer(no_args_is_help=True, help="Events no subscription matched, kept in <prefix>.unrouted.")
app.add_typer(dlq_app, name="dlq")
app.add_typer(unrouted_app, name="unrouted")

IdsArgument = Annotated[list[str] | None, typer.Argument(metavar="[ID]...", show_default=False,
                                                         help="dead-letter ids, as `opsrelay dlq list` shows them")]
AllOption = Annotated[bool, typer.Option("--all", help="every dead letter")]


def _with_engine(cfg: Config, work: Callable[[Engine], Awaitable[_T]]) -> _T:
    """Run ``work`` on a connected engine: a broker that is away exits 75 with one line."""
    from relay.engines import open_engine

    async def run() -> _T:
        async with open_engine(cfg.broker.url, confirm_timeout=cfg.broker.confirm_timeout) as engine:
            return await work(engine)

    try:
        return asyncio.run(run())
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)
    except RelayError as exc:
        _fail(f"broker unavailable: {exc}", EX_TEMPFAIL)


def _echo_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


_ROLES = {"outbound": "ready to deliver", "retry": "waiting to retry", "dead": "dead letters (opsrelay dlq list)",
          "unrouted": "events no subscription matched (opsrelay unrouted list)", "subscription": "events to render"}


@app.command("queue")
def queue_command(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """What waits in outbound, retry, dead-letter, unrouted and subscription queues; held delivery."""
    cfg = _config(config)
    from relay.daemon import relay_topology
    from relay.inspect import queue_stats

    # The retry steps as the relay names them (one queue per backoff step).
    from relay.topology import outbound_queue

    outbound = outbound_queue(cfg.broker.prefix)
    delays = [q.ttl_ms for q in relay_topology(cfg).queues if q.ttl_ms is not None and q.dead_letter_to == outbound]
    subs = [s.name for s in cfg.subscriptions]
    stats = _with_engine(cfg, lambda engine: queue_stats(engine, cfg.broker.prefix, delays, subs))
    if as_json:
        _echo_json(stats.to_dict())
        return
    faults: dict[str, list[str]] = {}
    for held in stats.held:
        faults.setdefault(held.fault, []).append(held.id)
    for fault, ids in faults.items():
        typer.echo(f"DELIVERY HELD: {fault} ({len(ids)} mail(s) wait until the smarthost or config is fixed)")
    width = max(len(q.name) for q in stats.queues)
    for q in stats.queues:
        ready = "-" if q.ready is None else str(q.ready)
        note = "not declared yet" if q.ready is None else _ROLES[q.role]
        typer.echo(f"{q.name:<{width}}  {ready:>6}  {note}")


def _summary_lines(entry: DeadEntry) -> list[str]:
    who = f"to {', '.join(entry.recipients)}" if entry.recipients else f"from {entry.source or '?'}"
    attempts = "" if entry.attempts is None else f"  {entry.attempts} attempt(s)"
    subject = f"  {entry.subject!r}" if entry.subject else ""
    return [f"{entry.id}  {entry.kind}  {entry.dead_at}{attempts}  {who}{subject}", f"    {entry.reason}"]


@dlq_app.command("list")
def dlq_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Every dead letter, oldest first (left in place)."""
    cfg = _config(config)
    from relay.inspect import list_dead
    from relay.topology import dead_queue

    prefix = cfg.broker.prefix
    entries = _with_engine(cfg, lambda engine: list_dead(engine, prefix))
    if as_json:
        _echo_json([e.summary(prefix) for e in entries])
        return
    typer.echo(f"{len(entries)} dead letter(s) in {dead_queue(prefix)}")
    for entry in entries:
        for line in _summary_lines(entry):
            typer.echo(line)


@dlq_app.command("show")
def dlq_show(dead_id: Annotated[str, typer.Argument(metavar="ID", help="a dead-letter id")],
             config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """One dead letter in full: why, every attempt, and the message itself."""
    cfg = _config(config)
    from relay.inspect import show_dead
    from relay.topology import dead_queue

    prefix = cfg.broker.prefix
    entries = _with_engine(cfg, lambda engine: show_dead(engine, prefix, dead_id))
    if not entries:
        _fail(f"no dead letter {dead_id!r} in {dead_queue(prefix)}", EX_FAILED)
    if as_json:
        # A list: a mail whose recipients failed at different times died in parts, one id.
        _echo_json([e.detail(prefix) for e in entries])
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
            typer.echo(f"  {i}. {attempt['at']}  {', '.join(attempt['recipients'])}: {attempt['reply']}")
        typer.echo("--- message ---")
        # Mail travels with CRLF line ends (RFC 5322); a terminal wants LF.
        typer.echo(detail["message"].replace("\r\n", "\n").rstrip("\n"))


def _ids_or_all(ids: list[str] | None, every: bool) -> list[str] | None:
    if bool(ids) == every:
        _fail("give dead-letter IDs or --all (one of them)", EX_USAGE)
    return None if every else ids


@dlq_app.command("replay")
def dlq_replay(ids: IdsArgument = None, every: AllOption = False, config: ConfigOption = None,
               as_json: JsonOption = False) -> None:
    """Send dead letters back: a mail to outbound with fresh attempts, an event to its subscription.

    A replayed letter leaves the dead-letter queue. Exits 1 if a named ID is missing or cannot be replayed.
    """
    cfg = _config(config)
    from relay.inspect import replay

    chosen = _ids_or_all(ids, every)
    prefix = cfg.broker.prefix
    report = _with_engine(cfg, lambda engine: replay(engine, prefix, chosen))
    if as_json:
        _echo_json({"replayed": [{"id": e.id, "kind": e.kind, "to": q} for e, q in report.replayed],
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
    cfg = _config(config)
    from relay.inspect import purge

    chosen = _ids_or_all(ids, every)
    prefix = cfg.broker.prefix
    report = _with_engine(cfg, lambda engine: purge(engine, prefix, chosen))
    if as_json:
        _echo_json({"purged": [{"id": e.id, "kind": e.kind} for e in report.purged],
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
    cfg = _config(config)
    from relay.inspect import browse, unrouted_summary
    from relay.topology import unrouted_queue

    queue = unrouted_queue(cfg.broker.prefix)
    events = [unrouted_summary(m) for m in _with_engine(cfg, lambda engine: browse(engine, queue))]
    if as_json:
        _echo_json(events)
        return
    typer.echo(f"{len(events)} event(s) in {queue}")
    for event in events:
        typer.echo(f"{event['id']}  {event['key']}  {event.get('event') or event.get('error')}")


@unrouted_app.command("replay")
def unrouted_replay(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Publish the unrouted events again, to reach the subscriptions of this config.

    Declares the config's subscriptions first, as serve does. What still matches nothing stays in unrouted.
    """
    cfg = _config(config)
    from relay.daemon import relay_topology
    from relay.inspect import replay_unrouted
    from relay.topology import unrouted_queue

    async def work(engine: Engine) -> UnroutedReport:
        await engine.declare(relay_topology(cfg))
        return await replay_unrouted(engine, cfg.broker.prefix)

    report = _with_engine(cfg, work)
    queue = unrouted_queue(cfg.broker.prefix)
    if as_json:
        _echo_json({"replayed": report.replayed, "remaining": report.remaining, "keys": dict(report.keys)})
        return
    typer.echo(f"replayed {report.replayed} event(s) from {queue}; it now holds {report.remaining} "
               "(what no subscription matches)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False, "help_option_names": []})
def sendmail(ctx: typer.Context) -> None:
    """The sendmail front end: sendmail's options (-t -i -f ADDR ...) and recipients; the message on stdin."""
    from relay.sendmail import run

    # sendmail's argv exactly as given: click would swallow "--" and re-read "-f" words.
    argv = sys.argv[sys.argv.index("sendmail") + 1:] if "sendmail" in sys.argv else ctx.args
    raise typer.Exit(run(["opsrelay sendmail", *argv], sys.stdin.buffer, sys.stderr))


def main() -> None:
    app()
