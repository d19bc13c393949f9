"""Shared helpers for the fault-injection suites (no tests here).

Every fault test ends with :func:`reconcile`: each (mail, recipient) that was
published is either delivered (seen at the SMTP server, found by the
``X-Opsrelay-Id`` header and checked against a stable ``Message-ID``) or
dead-lettered (in ``<prefix>.dead``), never both; a message that is not a mail
is dead-lettered exactly once; nothing is left in outbound or a retry queue;
and nobody got the same mail twice unless the test allows a bounded number of
duplicates (then :attr:`Reconciliation.duplicates` says how many).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from relay.config.models import Config
from relay.contract.mail import OutboundMail, to_message
from relay.contract.message import Message
from relay.contract.names import dead_queue, outbound_queue, retry_queue
from relay.contract.topology import event_topology
from relay.daemon.relay import relay_topology
from relay.daemon.serve import serve_forever
from relay.delivery.smarthosts import Smarthosts
from relay.engines.base import Engine
from relay.render.mime import build_message
from tests.brokers import Broker, delete_topology
from tests.smtp_server import ReceivedMail, SmtpServer
from tests.waiting import wait_until

__all__ = [
    "SENDER",
    "Ledger",
    "Reconciliation",
    "Rig",
    "Servers",
    "Watch",
    "cleanup_broker",
    "dead_recipients",
    "drain",
    "fill_outbound",
    "history",
    "new_mail",
    "reconcile",
    "relay_settings",
    "retry_queues",
    "running_relay",
    "steady_port",
    "to_config",
    "wait_until",  # tests.waiting's, for the suites that import it from here
    "write_toml",
]

SENDER = "alerts@faults.test"
MSGID_DOMAIN = "faults.test"
ID_HEADER = "X-Opsrelay-Id"


def steady_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range, for a server that goes away and comes back.

    While nothing listens on a port, a client retrying it may be given that same port as its
    own source port and connect to itself (TCP simultaneous open), which then blocks the new
    server's bind. Ports outside the ephemeral range are never handed out as source ports.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low}")


# -- configuration -------------------------------------------------------------------------------


def relay_settings(broker: Broker, server: SmtpServer, *, backoff: Sequence[str] = ("100ms", "200ms"),
                   max_attempts: int = 10, pool_size: int = 2, **smtp: object) -> dict[str, Any]:
    """The config of a relay for ``broker`` and ``server`` as plain data (for Config or a TOML file)."""
    smtp_settings = {**server.client_settings(), "from": SENDER, "pool_size": pool_size, **smtp}
    return {
        "host": "faulthost",
        "broker": {"url": broker.url, "prefix": broker.prefix, "confirm_timeout": 2.0},
        "smtp": {k: (str(v) if isinstance(v, Path) else v) for k, v in smtp_settings.items()},
        "retry": {"max_attempts": max_attempts, "backoff": list(backoff)},
    }


def to_config(settings: Mapping[str, Any]) -> Config:
    return Config.model_validate(settings)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _tables(values: object) -> bool:
    return isinstance(values, list | tuple) and bool(values) and all(isinstance(v, Mapping) for v in values)


def _table(name: str, values: Mapping[str, Any], header: str) -> list[str]:
    """One [table] or [[array item]], its own arrays of tables ([[smtp.fallback]]) after it."""
    lines = ["", header, *(f"{json.dumps(k)} = {_toml(v)}" for k, v in values.items()
                           if not isinstance(v, Mapping) and not _tables(v))]
    for key, items in values.items():
        if _tables(items):
            lines += [line for item in items for line in _table(f"{name}.{key}", item, f"[[{name}.{key}]]")]
    return lines


def write_toml(settings: Mapping[str, Any], path: Path) -> Path:
    """Plain values, tables and arrays of tables ([[subscriptions]], [[smtp.fallback]])."""
    lines = [f"{key} = {_toml(value)}" for key, value in settings.items()
             if not isinstance(value, Mapping) and not _tables(value)]
    for name, values in settings.items():
        if isinstance(values, Mapping):
            lines += _table(name, values, f"[{name}]")
        elif _tables(values):
            lines += [line for item in values for line in _table(name, item, f"[[{name}]]")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def retry_queues(config: Config) -> list[str]:
    return sorted({retry_queue(config.broker.prefix, max(1, round(step * 1000))) for step in config.retry.backoff})


# -- engines ---------------------------------------------------------------------------------------


async def cleanup_broker(config: Config) -> None:
    """Delete what a relay with ``config`` declares on RabbitMQ (a SQLite file goes with tmp_path)."""
    await delete_topology(config.broker.url, relay_topology(config) + event_topology(config.broker.prefix))


# -- mail ------------------------------------------------------------------------------------------


def new_mail(recipients: Sequence[str], *, subject: str = "fault test") -> OutboundMail:
    """A mail whose id is in its headers, so the server side can tell which one arrived."""
    mail_id = str(uuid.uuid4())
    raw = build_message(sender=SENDER, to=recipients, subject=f"{subject} {mail_id[:8]}",
                        body=f"mail {mail_id}\n", message_id=f"<{mail_id}@{MSGID_DOMAIN}>",
                        extra_headers=[(ID_HEADER, mail_id)])
    return OutboundMail(sender=SENDER, recipients=tuple(recipients), raw=raw, message_id=mail_id, origin="test")


@dataclass
class Ledger:
    """What the test published: mail id -> its recipients; () for a message that is not a mail."""

    published: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def mail(self, mail: OutboundMail) -> OutboundMail:
        self.published[mail.message_id] = mail.recipients
        return mail

    def invalid(self, message: Message) -> Message:
        self.published[message.message_id] = ()
        return message


async def fill_outbound(engine: Engine, prefix: str, ledger: Ledger, mails: Iterable[OutboundMail]) -> None:
    for mail in mails:
        await engine.send(outbound_queue(prefix), to_message(ledger.mail(mail)))


async def drain(engine: Engine, queue: str) -> list[Message]:
    """Take (and ack) everything ready in ``queue``."""
    taken: list[Message] = []
    while (delivery := await engine.get(queue)) is not None:
        taken.append(delivery.message)
        await delivery.ack()
    return taken


def _delivered(received: Iterable[ReceivedMail]) -> Counter[tuple[str, str]]:
    copies: Counter[tuple[str, str]] = Counter()
    parser = BytesHeaderParser()
    for mail in received:
        headers = parser.parsebytes(mail.content)
        mail_id = str(headers.get(ID_HEADER, "")).strip()
        # The Message-ID must be the same on every copy and every retry (DESIGN: Delivery).
        assert str(headers.get("Message-ID", "")).strip() == f"<{mail_id}@{MSGID_DOMAIN}>", headers
        for rcpt in mail.rcpt_tos:
            copies[(mail_id, rcpt)] += 1
    return copies


def dead_recipients(message: Message) -> tuple[str, ...]:
    """The recipients a dead letter was given up for; () when it is not a mail."""
    if message.headers.get("x-dead-kind") != "mail":
        return ()
    recipients = json.loads(str(message.headers["x-recipients"]))
    assert isinstance(recipients, list)
    return tuple(str(r) for r in recipients)


def history(message: Message) -> list[tuple[str, str, list[str]]]:
    """``x-history`` of a mail: (at, reply, recipients) per attempt."""
    entries = json.loads(str(message.headers.get("x-history") or "[]"))
    return [(str(at), str(reply), list(rcpts)) for at, reply, rcpts, *_ in entries]


def _unaccounted(ledger: Ledger, delivered: Counter[tuple[str, str]],
                 dead: Sequence[Message]) -> list[tuple[str, str]]:
    """(message id, recipient) pairs neither delivered nor dead-lettered yet ("" for a non-mail)."""
    dead_pairs = {(m.message_id, r) for m in dead for r in dead_recipients(m)}
    dead_ids = {m.message_id for m in dead}
    missing: list[tuple[str, str]] = []
    for mail_id, recipients in ledger.published.items():
        if not recipients and mail_id not in dead_ids:
            missing.append((mail_id, ""))
        missing += [(mail_id, r) for r in recipients if delivered[(mail_id, r)] == 0 and (mail_id, r) not in dead_pairs]
    return missing


# -- waiting ---------------------------------------------------------------------------------------


class Watch:
    """Collects dead letters as they come (the relay never consumes them) and tells when all is settled."""

    def __init__(self, engine: Engine, config: Config, ledger: Ledger,
                 received: Callable[[], list[ReceivedMail]]) -> None:
        self.engine, self.config, self.ledger, self.received = engine, config, ledger, received
        self.dead: list[Message] = []
        self.alive: Callable[[], None] = lambda: None

    async def collect(self) -> bool:
        """Take the new dead letters; True once every published message is accounted for."""
        self.dead += await drain(self.engine, dead_queue(self.config.broker.prefix))
        return not _unaccounted(self.ledger, _delivered(self.received()), self.dead)

    async def poll(self) -> bool:
        self.alive()
        return await self.collect()

    def summary(self) -> str:
        missing = _unaccounted(self.ledger, _delivered(self.received()), self.dead)
        return (f"published {len(self.ledger.published)} message(s), received {len(self.received())} "
                f"mail(s), {len(self.dead)} dead letter(s); {len(missing)} (message, recipient) pair(s) "
                f"not accounted for, e.g. {missing[:3]}")

    async def until_settled(self, within: float, *, quiet: float = 0.25) -> None:
        """Wait until every message is accounted for, then ``quiet`` seconds more.

        The ack follows the server's 250 by a few milliseconds; the pause lets it land so that
        stopping the relay afterwards does not exercise the stop-while-delivering path (the
        process tests do that on purpose).
        """
        await wait_until(self.poll, within, what="every published mail to be delivered or dead-lettered",
                         diagnostics=self.summary, interval=0.05)
        # Kept: no assert depends on it (stopping the relay finishes in-flight work either way),
        # and the relay's unacked deliveries cannot be seen from here to be waited for.
        await asyncio.sleep(quiet)


@dataclass(frozen=True)
class Reconciliation:
    delivered: Counter[tuple[str, str]]
    dead: tuple[Message, ...]
    duplicates: int

    def dead_letter(self, mail_id: str) -> Message:
        found = [m for m in self.dead if m.message_id == mail_id]
        assert len(found) == 1, f"{len(found)} dead letter(s) for {mail_id}"
        return found[0]


async def reconcile(watch: Watch, *, max_duplicates: int = 0) -> Reconciliation:
    """Call once the relay has stopped (so nothing is unacked): the ledger must balance exactly."""
    engine, config, ledger = watch.engine, watch.config, watch.ledger
    await watch.collect()
    prefix = config.broker.prefix
    leftovers = {q: await engine.depth(q) for q in [outbound_queue(prefix), *retry_queues(config)]}
    assert not any(leftovers.values()), f"mail left behind: {leftovers}"
    delivered = _delivered(watch.received())
    dead_count: Counter[tuple[str, str]] = Counter()
    dead_ids: Counter[str] = Counter()
    for message in watch.dead:
        dead_ids[message.message_id] += 1
        for rcpt in dead_recipients(message):
            dead_count[(message.message_id, rcpt)] += 1

    unknown = ({i for i, _ in delivered} | set(dead_ids)) - set(ledger.published)
    assert not unknown, f"delivered or dead-lettered but never published: {sorted(unknown)}"
    duplicates = 0
    for mail_id, recipients in ledger.published.items():
        if not recipients:  # not a mail: dead-lettered once, as it was, never sent
            assert dead_ids[mail_id] == 1, f"invalid message {mail_id} dead-lettered {dead_ids[mail_id]} time(s)"
            assert not any(i == mail_id for i, _ in delivered), f"invalid message {mail_id} was sent"
            continue
        stray = {r for i, r in delivered if i == mail_id} - set(recipients)
        assert not stray, f"mail {mail_id} reached {stray}, who were never its recipients"
        for rcpt in recipients:
            copies, dead = delivered[(mail_id, rcpt)], dead_count[(mail_id, rcpt)]
            assert copies or dead, f"mail {mail_id} to {rcpt}: lost (neither delivered nor dead-lettered)"
            assert not (copies and dead), f"mail {mail_id} to {rcpt}: delivered {copies}x AND dead-lettered"
            assert dead <= 1, f"mail {mail_id} to {rcpt}: dead-lettered {dead} times"
            duplicates += max(0, copies - 1)
    assert duplicates <= max_duplicates, f"{duplicates} duplicate deliveries (allowed: {max_duplicates})"
    return Reconciliation(delivered, tuple(watch.dead), duplicates)


# -- the relay in-process ------------------------------------------------------------------------


@dataclass
class RunningRelay:
    task: asyncio.Task[None]
    stop: asyncio.Event
    mailer: Smarthosts

    def check(self) -> None:
        """Raise when the relay ended on its own (it must run until stopped)."""
        if self.task.done():
            self.task.result()
            raise AssertionError("the relay returned before it was stopped")


@asynccontextmanager
async def running_relay(config: Config, *, stop_timeout: float = 20.0,
                        mailer: Smarthosts | None = None) -> AsyncIterator[RunningRelay]:
    """``serve_forever`` on this loop with the relay's real Mailer (``mailer``: one the test watches);
    stopped through its stop Event on exit."""
    stop = asyncio.Event()
    mailer = mailer or Smarthosts(config.smtp)
    task = asyncio.create_task(serve_forever(config, mailer, stop), name="relay-under-test")
    relay = RunningRelay(task, stop, mailer)
    try:
        yield relay
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), stop_timeout)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise AssertionError(f"the relay did not stop within {stop_timeout:g}s of its stop Event") from None
        finally:
            await mailer.close()



# -- per-test resources ------------------------------------------------------------------------------


class Servers:
    """SMTP servers a test starts (all on 127.0.0.1); stopped in reverse order by the fixture."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[SmtpServer] = []

    def make(self, **options: Any) -> SmtpServer:
        server = SmtpServer(self.root / f"smtp{len(self.started)}", **options).start()
        self.started.append(server)
        return server

    def received(self) -> list[ReceivedMail]:
        """What every server of the test received (one smarthost, replaced during the test)."""
        return [mail for server in self.started for mail in server.received]

    def stop_all(self) -> None:
        for server in reversed(self.started):
            server.stop()


class Rig:
    """Relay configs on the test's broker (tests/brokers.py), which closes and deletes what they opened."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def open(self, settings: Mapping[str, Any]) -> tuple[Config, Engine]:
        """The config, and the test's own connection (as another process would have) with its topology declared."""
        config = to_config(settings)
        engine = await self.broker.open(confirm_timeout=config.broker.confirm_timeout)
        await self.broker.declare(engine, relay_topology(config))
        return config, engine
