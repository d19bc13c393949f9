"""The ``opsrelay`` command line (typer). Each command imports what it needs inside itself,
so ``opsrelay listen`` never pays for aiosmtplib or Jinja2."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from relay.config import Config, load_config
from relay.errors import ConfigurationError, RelayError

__all__ = ["app", "main"]

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 69, 75, 78

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


@app.command()
def listen(config: ConfigOption = None,
           verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """The supervisord eventlistener: PROCESS_STATE events to the events exchange."""
    from listeners.eventlistener import run, text_streams
    from listeners.publish import make_publisher

    cfg = _config(config)
    _logging(verbose)
    # UTF-8 whatever the locale, newlines untouched: supervisord's len: counts characters.
    stdin, stdout = text_streams(sys.stdin.buffer, sys.stdout.buffer)
    try:
        publisher = make_publisher(cfg)
    except ConfigurationError as exc:
        _fail(f"config error: {exc}", EX_CONFIG)
    try:
        code = run(stdin, stdout, publisher, host=cfg.host)
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
    failed = False
    if connect:
        report["connect"], failed = asyncio.run(_probe(cfg))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"config ok: host {report['host']}, broker {report['broker']}, smtp {report['smtp']}")
        for name, sub in report["subscriptions"].items():
            typer.echo(f"  subscription {name} -> {', '.join(sub['to'])}: {' '.join(sub['bindings'])}")
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
        reached.append({"subscription": sub.name, "bindings": bound, "reached": accepted})
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
        typer.echo(f"{key} -> {r['subscription']} (binding {r['bindings'][0]})")


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


def main() -> None:
    app()
