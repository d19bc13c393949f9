"""``opsrelay-sendmail``: read one message on stdin, queue it durably, exit 0; the relay delivers it.

Also ``opsrelay sendmail``, any symlink named ``sendmail`` (or ``mailq``: the queue listing).
Exit codes are sysexits.h: 64 usage, 65 bad message, 75 temporary failure (nothing was
queued: the caller still has the message, e.g. cron logs it, mailx keeps dead.letter),
78 configuration.

The queue path is the one every cron job and alert pays for, so on the embedded engine it
imports the standard library and our pure helpers only (no pydantic, typer, aio-pika,
aiosmtplib, jinja2; see ``python -X importtime -m relay.sendmail``): the config comes from
:mod:`relay.fastconfig`, and the row is written with ``sqlite3`` directly, with the schema,
pragmas and INSERT of :mod:`relay.engines.sqlite_store` (importing that module would pull
the whole engine package; a test checks the two write the same row). One transaction writes
the whole message or nothing; WAL with ``synchronous=FULL`` makes the commit durable before we
exit 0. Then the relay's consumers are poked through their wake sockets
(:mod:`relay.engines.sqlite_wake`), so delivery starts within milliseconds.

The first write to a new queue file, an AMQP broker and ``sendmail.mode = "direct"`` take the
slow path through the engines (and, for direct, through the relay's own delivery plan).
"""

from __future__ import annotations

import os
import sys

from relay.addresses import AddressError, envelope_sender, parse_address_list, qualify, resolve_recipient
from relay.errors import ConfigurationError, RelayError
from relay.message_prep import MessageError, prepare, read_message
from relay.sendmail_args import LIST_QUEUE, UsageError, parse_argv

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, BinaryIO, TextIO

    from relay.fastconfig import FastConfig
    from relay.sendmail_args import Invocation

    Say = Callable[[str], None]

__all__ = ["EX_CONFIG", "EX_DATAERR", "EX_OK", "EX_TEMPFAIL", "EX_USAGE", "main", "outbound_headers", "run"]

# sysexits.h
EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 0, 64, 65, 75, 78

# As relay.mail.CONTENT_TYPE and relay.engines.sqlite_store.SCHEMA_VERSION (tests compare).
CONTENT_TYPE = "message/rfc822"
SCHEMA_VERSION = 1
_INSERT = ("INSERT INTO messages (queue, body, message_id, content_type, headers, routing_key, expires_at)"
           " VALUES (?, ?, ?, ?, ?, ?, ?)")
# Seconds a submission waits for the queue's write lock.
_LOCK_WAIT = 15.0
# As sqlite_wake: sun_path holds 108 bytes on Linux, NUL included.
_SUN_PATH_MAX = 100


class _Fail(Exception):
    """Ends the run with this exit code and one line on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _uuid4() -> str:
    """A random UUID, as relay.mail's default message_id, without importing uuid."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _json_str(text: str) -> str:
    """A JSON string literal as ``json.dumps(text, ensure_ascii=False)`` writes it."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}.get(ch, f"\\u{code:04x}"))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_ascii(text: str) -> str:
    """As ``json.dumps(text)`` (ensure_ascii): non-ASCII as \\uXXXX, astral planes as surrogate pairs."""
    out = []
    for ch in _json_str(text):
        code = ord(ch)
        if code < 0x80:
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            out.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
    return "".join(out)


def outbound_headers(sender: str, recipients: Sequence[str]) -> str:
    """The row's ``headers`` column for a new mail: what ``sqlite_store.publish`` stores for
    ``relay.mail.to_message(OutboundMail(sender, recipients, raw, origin="sendmail"))``."""
    rcpts = "[" + ", ".join(_json_ascii(r) for r in recipients) + "]"
    return ('{"x-opsrelay-v":1,"x-sender":' + _json_str(sender) + ',"x-recipients":' + _json_str(rcpts)
            + ',"x-attempts":0,"x-history":"[]","x-origin":"sendmail","x-holds":0}')


def _db_path(url: str) -> str:
    return os.path.abspath(url.partition(":///")[2])


def write_sqlite(path: str, queue: str, body: bytes, message_id: str, headers: str, busy_timeout: float) -> None:
    """Store one message row in ``queue``, durably, in one transaction: all of it or nothing.

    As sqlite_store.connect + publish for a file whose schema exists: WAL, ``synchronous=FULL``
    (the commit is fsynced before we return), ``BEGIN IMMEDIATE`` like every writer of the file.
    ``_sqlite3`` is the module ``sqlite3`` wraps; the wrapper adds datetime adapters we never
    use and 5-10 ms of imports.
    """
    import _sqlite3

    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o700)
    if not os.path.exists(path):
        _first_write(path, queue, body, message_id, headers, busy_timeout)
        return
    conn = _sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            conn.close()
            _first_write(path, queue, body, message_id, headers, busy_timeout)  # older schema: the engine's code
            return
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("SELECT ttl_ms FROM queues WHERE name = ?", (queue,)).fetchone()
            if found is None:
                conn.execute("INSERT INTO queues VALUES (?, NULL, NULL)", (queue,))  # declare, as the relay does
            ttl = None if found is None else found[0]
            expires = None if ttl is None else _now_ms() + ttl
            conn.execute(_INSERT, (queue, body, message_id, CONTENT_TYPE, headers, queue, expires))
            conn.execute("COMMIT")
        except BaseException:
            # SQLITE_FULL and I/O errors may have rolled back already; a second ROLLBACK would hide them.
            if conn.in_transaction:
                try:  # noqa: SIM105 - contextlib is not imported on this path
                    conn.execute("ROLLBACK")
                except _sqlite3.Error:
                    pass
            raise
    finally:
        conn.close()


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def _first_write(path: str, queue: str, body: bytes, message_id: str, headers: str, busy_timeout: float) -> None:
    """A new (or older-schema) file: let the engine's own code make the schema, once per host."""
    import json

    from relay.engines import sqlite_store as store
    from relay.engines.base import Message
    from relay.topology import QueueSpec, Topology

    conn = store.connect(path, busy_timeout)
    try:
        store.declare(conn, Topology(queues=(QueueSpec(queue),)))
        store.publish(conn, "", queue, Message(body, message_id, CONTENT_TYPE, json.loads(headers)))
    finally:
        conn.close()


def poke(path: str, queue: str) -> int:
    """Wake the relay's consumers (sqlite_wake's datagram sockets); best effort. Returns sockets poked."""
    run = os.path.realpath(path) + ".run"
    try:
        names = [n for n in os.listdir(run) if n.endswith(".sock")]
    except OSError:
        return 0
    if not names:
        return 0
    # _socket, not socket: the wrapper module imports enum & co. (5 ms) for nothing we use here.
    import _socket

    poked = 0
    fd = None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for name in names:
            address = os.path.join(run, name)
            if len(os.fsencode(address)) > _SUN_PATH_MAX:
                if fd is None:
                    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
                address = f"/proc/self/fd/{fd}/{name}"
            try:
                sock.sendto(queue.encode("utf-8"), address)
                poked += 1
            except OSError:
                pass  # a dead consumer (the engine removes its file) or a full buffer (it is awake)
    finally:
        sock.close()
    if fd is not None:
        os.close(fd)
    return poked


def _user() -> tuple[str, str]:
    """The invoking user's login name and the first field of its GECOS (the full name)."""
    import pwd

    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return os.environ.get("LOGNAME") or os.environ.get("USER") or str(os.getuid()), ""
    return entry.pw_name, entry.pw_gecos.split(",")[0]


def _recipients(words: Sequence[str], found: Sequence[str], cfg: FastConfig, from_headers: bool) -> tuple[str, ...]:
    addresses: list[str] = []
    for word in words:
        try:
            addresses += parse_address_list(word)
        except AddressError as exc:
            raise _Fail(EX_USAGE, f"recipient {exc}") from None
    addresses += found
    resolved = dict.fromkeys(resolve_recipient(a, cfg.aliases, cfg.domain) for a in addresses)
    if not resolved:
        if from_headers:
            raise _Fail(EX_DATAERR, "no recipients: the message has no To, Cc or Bcc and none was named")
        raise _Fail(EX_USAGE, "no recipients: name them on the command line, or use -t to read To/Cc/Bcc")
    return tuple(resolved)


def run(argv: Sequence[str], stdin: BinaryIO | None, stderr: TextIO,
        env: dict[str, str] | None = None) -> int:
    """One submission; returns the exit status. ``argv[0]`` decides sendmail or mailq."""
    prog = os.path.basename(argv[0]) if argv else "opsrelay-sendmail"

    def say(message: str) -> None:
        stderr.write(f"{prog}: {message}\n")
        stderr.flush()

    try:
        invocation = parse_argv(argv[1:], prog)
    except UsageError as exc:
        say(str(exc))
        return EX_USAGE
    from relay import fastconfig

    try:
        cfg = fastconfig.load(os.environ if env is None else env)
    except ConfigurationError as exc:
        say(f"config error: {exc}")
        return EX_CONFIG
    if invocation.mode == LIST_QUEUE:
        return list_queue(cfg, sys.stdout, say)
    try:
        return _submit(invocation, cfg, stdin, say)
    except _Fail as exc:
        say(str(exc))
        return exc.code
    except KeyboardInterrupt:
        say("interrupted; nothing was queued")
        return EX_TEMPFAIL


def _submit(invocation: Invocation, cfg: FastConfig, stdin: BinaryIO | None, say: Say) -> int:
    import time

    user, gecos = _user()
    try:
        sender = envelope_sender(invocation.sender, user, cfg.senders, cfg.smtp_from, cfg.domain)
    except AddressError as exc:
        raise _Fail(EX_USAGE, f"sender {exc}") from None
    try:
        # sys.stdin.buffer is a BufferedReader: read1 returns what is there, so "." can end the input.
        data = read_message(stdin, dot_ends=invocation.dot_ends, max_size=cfg.max_size) if stdin else b""  # type: ignore[arg-type]
    except OSError as exc:
        raise _Fail(EX_TEMPFAIL, f"cannot read the message: {exc.strerror or exc}") from None
    except MessageError as exc:
        raise _Fail(EX_DATAERR, str(exc)) from None
    from_address = sender or qualify(user, cfg.domain)
    now = time.time()
    try:
        prepared = prepare(data, from_address=from_address,
                           full_name=invocation.full_name if invocation.full_name is not None else gecos,
                           extract_recipients=invocation.from_headers, from_line_override=cfg.from_line_override,
                           now=now, unique=f"{os.getpid()}.{os.urandom(5).hex()}",
                           domain=from_address.rpartition("@")[2] or cfg.domain)
    except MessageError as exc:
        raise _Fail(EX_DATAERR, str(exc)) from None
    recipients = _recipients(invocation.recipients, prepared.header_recipients, cfg, invocation.from_headers)
    message_id = _uuid4()
    if cfg.mode == "direct":
        return deliver_now(cfg, sender, recipients, prepared.raw, message_id, say, verbose=invocation.verbose)
    queue = f"{cfg.prefix}.outbound"
    try:
        if cfg.url.startswith("sqlite:"):
            path = _db_path(cfg.url)
            # Wait for the write lock longer than a publisher's confirm bound: a burst of cron
            # mail at the top of the hour is better queued a little late than refused with 75.
            write_sqlite(path, queue, prepared.raw, message_id, outbound_headers(sender, recipients),
                         max(cfg.busy_timeout, _LOCK_WAIT))
            try:
                poked = poke(path, queue)
            except KeyboardInterrupt:  # queued already: only the wake-up is lost (the relay's timer finds it)
                poked = 0
        else:
            enqueue_engine(cfg, sender, recipients, prepared.raw, message_id)
            poked = 0
    except ConfigurationError as exc:
        raise _Fail(EX_CONFIG, f"config error: {exc}") from None
    except (OSError, RelayError) as exc:
        raise _Fail(EX_TEMPFAIL, f"cannot queue the mail ({_reason(exc)}); nothing was queued") from None
    except Exception as exc:  # sqlite3.Error, without importing sqlite3 here
        if type(exc).__module__ != "sqlite3":
            raise
        raise _Fail(EX_TEMPFAIL, f"cannot queue the mail ({_reason(exc)}); nothing was queued") from None
    if invocation.verbose:
        say(f"queued {message_id} ({len(prepared.raw)} bytes) from <{sender}> to {', '.join(recipients)} "
            f"in {queue}" + (f"; relay woken ({poked})" if poked else "; no relay is listening right now"))
    return EX_OK


# -- slow paths: the queue listing, AMQP, direct delivery --------------------------------------


def _quiet_logging() -> None:
    """Our one line is the report: keep library and relay log records (aiormq's connection
    errors, the relay's delivery lines) from Python's last-resort stderr handler."""
    import logging

    logging.getLogger().addHandler(logging.NullHandler())


def list_queue(cfg: FastConfig, out: TextIO, say: Say) -> int:
    """``-bp`` / ``mailq``: what waits for delivery (outbound and retry queues), one mail per entry."""
    if not cfg.url.startswith("sqlite:"):
        return _list_engine(cfg, out, say)
    import json
    import sqlite3
    import time

    path = _db_path(cfg.url)
    if not os.path.exists(path):
        out.write("Mail queue is empty\n")
        return EX_OK
    retry = f"{cfg.prefix}.retry."
    try:
        conn = sqlite3.connect(path, timeout=cfg.busy_timeout)
        try:
            rows = conn.execute(
                "SELECT queue, message_id, length(body), headers, owner IS NOT NULL, expires_at FROM messages"
                " WHERE queue = ? OR substr(queue, 1, ?) = ? ORDER BY id",
                (f"{cfg.prefix}.outbound", len(retry), retry)).fetchall()
            dead = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (f"{cfg.prefix}.dead",)).fetchone()[0]
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        say(f"cannot read the queue {path}: {_reason(exc)}")
        return EX_TEMPFAIL
    now = time.time()
    for queue, message_id, size, raw_headers, leased, expires in rows:
        headers = json.loads(raw_headers)
        if leased:
            state = "being delivered"
        elif queue.startswith(retry):
            wait = max(0, round((expires or 0) / 1000 - now))
            last = json.loads(headers.get("x-history") or "[]")[-1:] or [["", ""]]
            held = " held" if headers.get("x-held") else ""
            state = f"{held.strip() or 'retry'} in {wait}s (attempt {headers.get('x-attempts')}: {last[0][1]})"
        else:
            state = "waiting"
        out.write(f"{message_id}  {size} bytes  <{headers.get('x-sender', '')}>  {state}\n")
        out.write(f"        -> {', '.join(json.loads(headers.get('x-recipients') or '[]'))}\n")
    if rows:
        out.write(f"{len(rows)} mail(s) waiting in {path}\n")
    else:
        out.write("Mail queue is empty\n")
    if dead:
        out.write(f"{dead} dead letter(s): opsrelay dlq list\n")
    return EX_OK


def _list_engine(cfg: FastConfig, out: TextIO, say: Say) -> int:
    import asyncio

    from relay.engines import open_engine
    from relay.engines.base import mask_url

    _quiet_logging()
    async def depth() -> int:
        async with open_engine(cfg.url, confirm_timeout=cfg.busy_timeout) as engine:
            return await engine.depth(f"{cfg.prefix}.outbound")

    try:
        waiting = asyncio.run(depth())
    except RelayError as exc:
        say(f"cannot read the queue: {exc}")
        return EX_TEMPFAIL
    out.write(f"{waiting} mail(s) waiting in {cfg.prefix}.outbound on {mask_url(cfg.url)} "
              "(retries and dead letters: opsrelay queue)\n" if waiting else "Mail queue is empty\n")
    return EX_OK


def enqueue_engine(cfg: FastConfig, sender: str, recipients: Sequence[str], raw: bytes, message_id: str) -> None:
    """Queue through the configured engine (RabbitMQ): publisher confirms, persistent, durable queue."""
    import asyncio

    from relay.engines import open_engine
    from relay.mail import OutboundMail, to_message
    from relay.topology import full_topology, outbound_queue

    _quiet_logging()
    mail = OutboundMail(sender=sender, recipients=tuple(recipients), raw=raw, message_id=message_id,
                        origin="sendmail")

    async def send() -> None:
        async with open_engine(cfg.url, confirm_timeout=cfg.busy_timeout) as engine:
            await engine.declare(full_topology(cfg.prefix, [], []))
            await engine.send(outbound_queue(cfg.prefix), to_message(mail))

    asyncio.run(send())


class _Submitted:
    """The submission as a delivery, so the relay's own handler applies its plan to it."""

    redelivered = False

    def __init__(self, message: Any) -> None:
        self.message = message

    async def ack(self) -> None:
        return None

    async def reject(self, *, requeue: bool) -> None:
        return None


class _Recorder:
    """A Mailer that remembers the outcome of its one send."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.outcome: Any = None

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> Any:
        try:
            self.outcome = await self.inner.send(sender, recipients, raw)
        except RelayError as exc:
            self.outcome = exc
            raise
        return self.outcome

    async def check(self) -> Any:
        return await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()


def deliver_now(cfg: FastConfig, sender: str, recipients: Sequence[str], raw: bytes, message_id: str,
                say: Say, *, verbose: bool) -> int:
    """``sendmail.mode = "direct"``: the relay's first attempt, made here and now.

    The relay's handler sends and applies its plan: delivered; a temporary failure or a held
    delivery goes to the retry queue with the relay's backoff; a permanent refusal to the
    dead-letter queue (and a line on stderr). The queue is opened first, so a mail that fails
    is never left with nowhere to go; if it cannot be, nothing is sent and we exit 75.
    """
    import asyncio

    from relay.config import load_config
    from relay.daemon import Relay, relay_topology
    from relay.delivery import DeadLetter, Delivered, Hold, Retry, decide
    from relay.engines import open_engine
    from relay.mail import OutboundMail, to_message
    from relay.smtp import SmtpPool

    _quiet_logging()
    try:
        config = load_config()
    except ConfigurationError as exc:
        say(f"config error: {exc}")
        return EX_CONFIG
    mail = OutboundMail(sender=sender, recipients=tuple(recipients), raw=raw, message_id=message_id,
                        origin="sendmail")

    async def attempt() -> Any:
        engine = open_engine(config.broker.url, confirm_timeout=config.broker.confirm_timeout)
        recorder = _Recorder(SmtpPool(config.smtp))
        try:
            await engine.connect()
            await engine.declare(relay_topology(config))
            await Relay(config, engine, recorder).handle_mail(_Submitted(to_message(mail)))
        finally:
            await recorder.close()
            await engine.close()
        return recorder.outcome

    try:
        outcome = asyncio.run(attempt())
    except ConfigurationError as exc:
        say(f"config error: {exc}")
        return EX_CONFIG
    except RelayError as exc:
        say(f"cannot queue the mail ({exc}); nothing was queued")
        return EX_TEMPFAIL
    for decision in decide(outcome, mail.recipients, 1, config.retry, holds=0):
        rcpts = ", ".join(decision.recipients)
        if isinstance(decision, Delivered):
            if verbose:
                say(f"delivered {message_id} to {rcpts}: {decision.reply}")
        elif isinstance(decision, Retry):
            say(f"not delivered to {rcpts} yet ({decision.reason}); queued, retry in {decision.delay:g}s")
        elif isinstance(decision, Hold):
            say(f"delivery to {rcpts} held ({decision.fault}); queued, retry in {decision.delay:g}s")
        elif isinstance(decision, DeadLetter):
            say(f"not delivered to {rcpts}: {decision.reason}; kept in {config.broker.prefix}.dead "
                "(opsrelay dlq list)")
    return EX_OK


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """The console script (and a symlink named sendmail or mailq to it)."""
    return run(sys.argv if argv is None else argv, sys.stdin.buffer if sys.stdin else None, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
