"""The ``opsrelay`` command line (typer). Each command imports what it needs inside itself,
so ``opsrelay listen`` never pays for aiosmtplib or Jinja2. The queue, dead-letter and
unrouted commands are in :mod:`relay.cli.queues`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from relay.cli import queues, silences
from relay.cli.common import (
    EX_CONFIG,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    ConfigOption,
    JsonOption,
    app,
    config_or_exit,
    fail,
    setup_logging,
    with_engine,
)
from relay.config.models import Config, load_config
from relay.config.smarthost import SmarthostConfig
from relay.errors import ConfigurationError, RelayError

if TYPE_CHECKING:
    from relay.observe.observer import Observer
    from relay.observe.server import MetricsServer

__all__ = ["app", "main", "queues", "silences"]


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
    from listeners.factory import make_publisher
    from relay.config.crashmail import CrashmailFlags, FlagError, config_with_crashmail, local_mta_env
    from relay.config.loader import find_config

    try:
        flags = CrashmailFlags.parse(programs=program or (), any_program=any_program, email=email,
                                     optional_header=optionalheader, sendmail=sendmail_program, ignored=ignored or ())
    except FlagError as exc:
        fail(str(exc), EX_USAGE)
    setup_logging(verbose)
    # crashmail used the host's sendmail: with -m and no config file, the local MTA on port 25.
    env = local_mta_env(os.environ) if flags.mails and find_config(config) is None else None
    try:
        cfg = config_with_crashmail(load_config(config, env), flags)
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    for note in flags.notes():
        logging.getLogger("opsrelay.listener").warning("%s", note)
    # UTF-8 whatever the locale, newlines untouched: supervisord's len: counts characters.
    stdin, stdout = text_streams(sys.stdin.buffer, sys.stdout.buffer)
    try:
        publisher = make_publisher(cfg)
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    hosting: AbstractContextManager[object] = nullcontext()
    if flags.mails:
        from relay.daemon.hosted import hosted_relay

        hosting = hosted_relay(cfg)
    ingesting: AbstractContextManager[object] = nullcontext()
    if os.geteuid() == 0:
        from relay.maildrop.ingest import in_background

        ingesting = in_background(cfg.source, cfg.broker.url, cfg.broker.engine_options)
    code = EX_OK
    try:
        with hosting, ingesting:
            code = run(stdin, stdout, publisher, host=cfg.host, enrich=make_enricher(cfg, os.environ))
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    except RelayError as exc:
        fail(f"crashmail relay: {exc}", EX_TEMPFAIL)
    finally:
        publisher.close()
    raise typer.Exit(code)


@app.command()
def serve(config: ConfigOption = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """The relay daemon: subscriptions -> mail -> delivery, with retries and dead letters."""
    cfg = config_or_exit(config)
    setup_logging(verbose)
    from relay.daemon.serve import serve_forever
    from relay.delivery.smarthosts import Smarthosts
    from relay.maildrop.ingest import for_relay
    from relay.render.renderer import Renderer

    try:
        renderer = Renderer(cfg)
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        mailer = Smarthosts(cfg.smtp)
        observer, server = _metrics(cfg)
        try:
            await serve_forever(cfg, mailer, stop, renderer=renderer, maildrop=for_relay(cfg.source),
                                observer=observer)
        finally:
            if server is not None:
                server.close()
            await mailer.close()

    try:
        asyncio.run(main())
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    logging.getLogger("opsrelay.relay").info("relay: stopped")


@app.command("migrate-queues")
def migrate_queues(config: ConfigOption = None) -> None:
    """Remake each queue made with another type or arguments as broker.queue_type says, keeping its messages.

    Stop the relays and listeners first (a queue with a consumer is refused).
    """
    from relay.daemon.relay import relay_topology
    from relay.ops.migrate import migrate

    cfg = config_or_exit(config)
    setup_logging()
    moved = with_engine(cfg, lambda engine: migrate(engine, relay_topology(cfg)))
    for done in moved:
        typer.echo(f"{done.queue}: now {cfg.broker.queue_type}, {done.messages} message(s) kept")
    if not moved:
        from relay.contract.urls import is_amqp

        typer.echo(f"every queue is already {cfg.broker.queue_type}" if is_amqp(cfg.broker.url)
                   else "the embedded queue has one kind of queue: nothing to do")


def _metrics(cfg: Config) -> tuple[Observer | None, MetricsServer | None]:
    """``[metrics] listen``: the Prometheus observer and its HTTP server (prometheus_client only then)."""
    address = cfg.metrics.address
    if address is None:
        return None, None
    from relay.observe.prom import PromObserver
    from relay.observe.server import MetricsServer

    observer = PromObserver([s.name for s in cfg.subscriptions])
    try:
        server = MetricsServer(observer, *address)
    except OSError as exc:
        fail(f"metrics: cannot listen on {cfg.metrics.listen}: {exc.strerror or exc}", EX_CONFIG)
    server.start()
    logging.getLogger("opsrelay.relay").info("relay: metrics on http://%s:%d/metrics", *server.address)
    return observer, server


@app.command()
def check(config: ConfigOption = None,
          connect: Annotated[bool, typer.Option("--connect", help="also reach the broker and the SMTP server")] = False,
          role: Annotated[str | None, typer.Option(
              "--role", help="with --connect: check the broker login has this role's permissions "
                             "(listener, relay, sendmail); listener and sendmail skip the SMTP check")] = None,
          as_json: JsonOption = False) -> None:
    """Validate the config; with --connect reach the broker and the smarthost (EHLO, TLS, AUTH, no mail)."""
    from relay.contract.urls import mask_url
    from relay.ops.roles import ROLES
    from relay.render.renderer import Renderer

    if role is not None and role not in ROLES:
        fail(f"--role {role!r}: one of {', '.join(ROLES)}", EX_USAGE)
    cfg = config_or_exit(config)
    try:
        Renderer(cfg)
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    report: dict[str, Any] = {
        "host": cfg.host,
        "broker": mask_url(cfg.broker.url),
        "smtp": _describe(cfg.smtp),
        "subscriptions": {s.name: {"to": list(s.to), "bindings": list(s.bindings())} for s in cfg.subscriptions},
    }
    if cfg.smtp.fallback:
        report["fallback"] = [_describe(f) for f in cfg.smtp.fallback]
    if cfg.smtp.ssmtp_conf is not None:
        from relay.config.models import ssmtp_notes

        report["ssmtp"] = ssmtp_notes(config)
    failed = False
    if connect:
        report["connect"], failed = asyncio.run(_probe(cfg, role))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(f"config ok: host {report['host']}, broker {report['broker']}, smtp {report['smtp']}")
        for n, fallback in enumerate(report.get("fallback", []), 1):
            typer.echo(f"  fallback {n}: {fallback}")
        for name, sub in report["subscriptions"].items():
            typer.echo(f"  subscription {name} -> {', '.join(sub['to'])}: {' '.join(sub['bindings'])}")
        for note in report.get("ssmtp", []):
            typer.echo(f"  from {cfg.smtp.ssmtp_conf}: {note}")
        for part, result in report.get("connect", {}).items():
            typer.echo(f"  {part}: {result}")
    if failed:
        raise typer.Exit(EX_UNAVAILABLE)


def _describe(host: SmarthostConfig) -> str:
    """A smarthost in one line, no secret: where, TLS, and how we authenticate."""
    if host.oauth2 is not None:
        auth = f"XOAUTH2 as {host.username}, token from {host.oauth2.source}"
    else:
        auth = f"AUTH as {host.username}" if host.username else "no AUTH"
    budget = ", ".join(f"{n} per {w}" for w, n in (("minute", host.max_per_minute), ("day", host.max_per_day)) if n)
    return f"{host.name} ({host.security.value}, {auth}{', at most ' + budget if budget else ''})"


async def _probe(cfg: Config, role: str | None) -> tuple[dict[str, str], bool]:
    from relay.contract.urls import mask_url, url_user
    from relay.delivery.smarthosts import Smarthosts
    from relay.engines import open_engine
    from relay.ops.roles import check_role, permissions

    results: dict[str, str] = {}
    failed = False
    options = dict(cfg.broker.engine_options)
    if len(cfg.broker.urls) > 1:
        # Each node of the cluster the config names: a dead one is worth knowing before it is needed.
        for url in cfg.broker.urls:
            node = open_engine(url, **{**options, "alternates": (), "shuffle": False})
            try:
                await node.connect()
                results[f"broker node {mask_url(url)}"] = "ok"
            except RelayError as exc:
                results[f"broker node {mask_url(url)}"] = f"FAILED: {exc}"
            finally:
                await node.close()
    engine = open_engine(cfg.broker.url, **options)
    part = "broker"
    try:
        await engine.connect()
        results[part] = "ok"
        if role is not None:
            part = f"broker role {role}"
            results[part] = "ok: " + await check_role(engine, role, cfg)
    except RelayError as exc:
        results[part], failed = f"FAILED: {exc}", True
        if role is not None and part != "broker":
            results["broker role needs"] = permissions(role, cfg.broker.prefix).rabbitmqctl(
                url_user(cfg.broker.url) or "USER")
    finally:
        await engine.close()
    if role in ("listener", "sendmail"):
        return results, failed  # their hosts send no mail
    mailer = Smarthosts(cfg.smtp)
    try:
        for n, (name, info) in enumerate(await mailer.check_all()):
            part = "smtp" if n == 0 else f"smtp fallback {name}"
            if isinstance(info, Exception):
                results[part], failed = f"FAILED: {info}", True
                continue
            auth = info.mechanism + (f" (token from {info.token_source})" if info.token_source else "")
            results[part] = (f"ok: {info.host}:{info.port}, tls={'yes' if info.tls else 'no'}, "
                             f"auth={'yes' if info.authenticated else 'no'}, mechanism={auth}")
    finally:
        await mailer.close()
    return results, failed


@app.command()
def routes(key: Annotated[str, typer.Argument(help="a routing key, e.g. proc.web1.workers.worker_03.FATAL")],
           config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Which subscriptions a routing key reaches (bindings, then the residual filter)."""
    from relay.contract.keys import key_fields, topic_matches

    cfg = config_or_exit(config)
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
    from relay.contract.mail import OutboundMail
    from relay.ops.submit import submit
    from relay.render.mime import build_message
    from relay.render.renderer import default_sender

    cfg = config_or_exit(config)
    sender = default_sender(cfg)
    raw = build_message(sender=sender, to=[address], subject=f"[opsrelay] test mail from {cfg.host}",
                        body=f"This is a test mail from opsrelay on {cfg.host}.\n"
                             "If you can read it, the whole path works.\n")
    mail = OutboundMail(sender=sender, recipients=(address,), raw=raw, origin="send-test")

    try:
        asyncio.run(submit(cfg.broker.url, cfg.broker.prefix, mail, options=cfg.broker.engine_options))
    except RelayError as exc:
        fail(f"could not queue the test mail: {exc}", EX_TEMPFAIL)
    typer.echo(f"queued test mail {mail.message_id} to {address}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "allow_interspersed_args": False, "help_option_names": []})
def sendmail(ctx: typer.Context) -> None:
    """The sendmail front end: sendmail's options (-t -i -f ADDR ...) and recipients; the message on stdin."""
    from relay.sendmail.main import run

    # sendmail's argv exactly as given: click would swallow "--" and re-read "-f" words.
    argv = sys.argv[sys.argv.index("sendmail") + 1:] if "sendmail" in sys.argv else ctx.args
    raise typer.Exit(run(["opsrelay sendmail", *argv], sys.stdin.buffer, sys.stderr))


@app.command("maildrop")
def maildrop_command(config: ConfigOption = None,
                     keep_watching: Annotated[bool, typer.Option(
                         "--watch", help="keep ingesting (on every submission, and every few seconds)")] = False,
                     verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Queue what users left in the maildrop (on a host that runs no relay: systemd's opsrelay-maildrop.path)."""
    from relay.contract.urls import is_sqlite
    from relay.engines import open_engine
    from relay.maildrop.ingest import for_relay, watch

    cfg = config_or_exit(config)
    setup_logging(verbose)
    maildrop = for_relay(cfg.source)
    if maildrop is None:
        fail(f"the maildrop {cfg.sendmail.maildrop} is not there or not ours to ingest", EX_UNAVAILABLE)

    async def run() -> tuple[int, int]:
        engine = None if is_sqlite(cfg.broker.url) else open_engine(cfg.broker.url,
                                                                     **cfg.broker.engine_options)
        try:
            if engine is not None:
                await engine.connect()
            if keep_watching:
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(signum, stop.set)
                await watch(maildrop, engine, stop)
                return 0, 0
            report = await maildrop.ingest(engine)
            return len(report.queued), len(report.rejected)
        finally:
            if engine is not None:
                await engine.close()

    try:
        queued, rejected = asyncio.run(run())
    except ConfigurationError as exc:
        fail(f"config error: {exc}", EX_CONFIG)
    except RelayError as exc:
        fail(f"broker unavailable: {exc}; the files stay in the maildrop", EX_TEMPFAIL)
    if not keep_watching:
        typer.echo(f"queued {queued} mail(s) from {maildrop.folder}" + (f", refused {rejected}" if rejected else ""))


oauth2_app = typer.Typer(no_args_is_help=True, help="OAuth2 for XOAUTH2 smarthosts (Gmail, Microsoft 365).")
app.add_typer(oauth2_app, name="oauth2")


@oauth2_app.command("login")
def oauth2_login(config: ConfigOption = None,
                 smarthost: Annotated[str | None, typer.Option(
                     "--smarthost", help="host:port of the smarthost whose [oauth2] to use (default: the first "
                                         "with a refresh_token grant)")] = None) -> None:
    """Grant opsrelay access once: open the printed URL, paste the code; the refresh token goes to
    refresh_token_file (mode 0600)."""
    from relay.config.smarthost import Grant
    from relay.delivery.oauth2 import authorization_url, exchange_code
    from relay.errors import TokenError

    cfg = config_or_exit(config)
    chosen = [h for h in cfg.smtp.smarthosts if h.oauth2 is not None and h.oauth2.grant is Grant.REFRESH_TOKEN
              and (smarthost is None or h.name == smarthost)]
    if not chosen or chosen[0].oauth2 is None:
        fail("no smarthost with [oauth2] grant = 'refresh_token'" + (f" named {smarthost}" if smarthost else ""),
             EX_USAGE)
    oauth = chosen[0].oauth2
    try:
        typer.echo(f"Open this URL, sign in as {chosen[0].username} and allow access:\n\n  "
                   f"{authorization_url(oauth)}\n", err=True)
        code = typer.prompt("Then paste the code here", hide_input=True, err=True)
        asyncio.run(exchange_code(oauth, code))
    except TokenError as exc:
        fail(str(exc), EX_TEMPFAIL)
    typer.echo(f"refresh token written to {oauth.refresh_token_file} (mode 0600)")


def main() -> None:
    app()
