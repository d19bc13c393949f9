"""The relay under temporary failures: throughput with 5% of first attempts answered 451, and memory
with 10,000 mails waiting in retry queues, on the embedded sqlite engine and on RabbitMQ.

The smarthost is this module's own (:class:`Smarthost`: aiosmtpd, trustme certificate, STARTTLS
required, AUTH PLAIN/LOGIN only over TLS) in a process of its own, so that it never shares a GIL
with the relay. It keys each mail by its ``X-Bench-Seq`` header, else its ``Message-ID`` (which
the relay keeps across attempts), counts every distinct mail once, stamps it with
``time.monotonic()`` (one clock for every process on Linux) and checks it came over TLS after AUTH.
Its failure mode is set per run: ``clean`` takes everything; ``fail5`` answers 451 at the end of
DATA to the first attempt of every mail whose key hashes into one bucket of 20 (:func:`fails_first`;
:func:`bench_mails` picks Message-IDs so that exactly every 20th mail does); ``failall`` answers 451
to every first attempt.

Throughput: ``opsrelay serve`` drains ``--retry-mails`` crash mails pre-filled on its outbound queue,
with ``retry.backoff = ["200ms"]``, until the server has taken every mail once; the clean and the
failing runs of each engine alternate round by round. Memory: VmRSS / VmHWM of an ``opsrelay serve``
that has settled with its queues empty, with ``--retry-waiting`` mails written straight into its
retry queue (TTL 1h), and optionally (``--retry-via-relay``) after it failed that many mails itself.

``python -m bench.retry_load smtp-server DIR`` is the server process; ``python -m bench.retry_load``
runs the benchmark alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from bench.common import (
    AMQP_URL,
    REPO,
    child_env,
    delete_broker_objects,
    print_table,
    process_cpu,
    tail,
    unique_prefix,
    wait_for_broker,
)

if TYPE_CHECKING:
    from relay.contract.mail import OutboundMail
    from relay.contract.message import Message
    from relay.contract.topology import Topology

__all__ = ["Smarthost", "SmarthostChild", "Window", "bench_mails", "deployed_env", "fails_first", "mail_key", "run",
           "serve_smtp"]

OPSRELAY = REPO / ".venv" / "bin" / "opsrelay"
USER = "relay@bench.test"
PASSWORD = "bench-pw-7c21"  # a throwaway account of the bench's own server
HELO = "client.test"
SENDER = "opsrelay@web1.example.com"
FAIL_ONE_IN = 20  # 5% of mails
REPLY_451 = "451 4.3.0 bench: try again later"
THROUGHPUT_TARGET = 0.80
MEMORY_TARGET_MB = 100.0
_SEQ = re.compile(rb"^X-Bench-Seq:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
MODES = ("clean", "fail5", "failall")


def mail_key(content: bytes) -> bytes:
    found = _SEQ.search(content) or _MESSAGE_ID.search(content)
    return found.group(1) if found else content


def fails_first(key: bytes) -> bool:
    """Whether ``fail5`` answers 451 to this mail's first attempt: 1 in FAIL_ONE_IN, by hash, deterministic."""
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % FAIL_ONE_IN == 0


def bench_mails(count: int) -> list[OutboundMail]:
    """``count`` crash mails rendered by the relay's templates, with fixed Message-IDs.

    Rendering costs ~2 ms a mail, so ten are rendered and copied; each copy gets a Message-ID of
    the same length made from its number and a counter, the counter chosen so that exactly every
    FAIL_ONE_IN-th mail falls in :func:`fails_first`'s bucket: the server keeps its pure hash rule,
    and the failing mails are exactly 5% and evenly spread, the same in every run.
    """
    from bench.relay_throughput import crash_mails

    rendered = crash_mails(min(count, 10))
    mails = []
    for i in range(count):
        mail = rendered[i % len(rendered)]
        fail = i % FAIL_ONE_IN == FAIL_ONE_IN - 1
        unique = next(key for j in range(10_000)
                      if fails_first(key := f"<{i:08d}-{j:04d}-4000-8000-{i:012d}@opsrelay.web1>".encode()) == fail)
        raw = _MESSAGE_ID.sub(b"Message-ID: " + unique, mail.raw, count=1)
        mails.append(dataclasses.replace(mail, raw=raw, message_id=str(uuid.uuid4())))
    return mails


def deployed_env(**extra: str) -> dict[str, str]:
    """:func:`child_env` without PYTHONDONTWRITEBYTECODE, for the opsrelay processes measured.

    An installed opsrelay has its bytecode compiled (pip does it); with the variable set, every
    module edited since its .pyc was written is compiled again at each start (~20 ms for
    relay/config/fast.py), which no deployment pays. The first run writes the missing .pyc files.
    """
    env = child_env(**extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


# -- the smarthost (runs in its own process) ----------------------------------------------------

class Smarthost:
    """aiosmtpd in a thread of this process; thread-safe counters behind one condition."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.ca_pem = state_dir / "ca.pem"
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_pem))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
        self.took = threading.Condition()
        self.mode = "clean"
        self.stamps: list[float] = []
        self.seen: set[bytes] = set()
        self.failed: set[bytes] = set()
        self.insecure = self.duplicates = self.sessions = 0
        self.cpu_mark = time.process_time()
        with socket.socket() as probe:  # aiosmtpd's controller checks its port by connecting: no port 0
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self._controller = _Controller(
            _Hooks(self), hostname="127.0.0.1", port=self.port, server_hostname="localhost", tls_context=context,
            require_starttls=True, auth_required=True, auth_require_tls=True, authenticator=self._authenticate,
            decode_data=False)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def take(self, content: bytes, secure: bool) -> str:
        """The reply to one end of DATA."""
        key = mail_key(content)
        with self.took:
            if key not in self.failed and (self.mode == "failall" or (self.mode == "fail5" and fails_first(key))):
                self.failed.add(key)  # only the first attempt fails
                self.took.notify_all()
                return REPLY_451
            if key in self.seen:
                self.duplicates += 1
            else:
                self.seen.add(key)
                self.stamps.append(time.monotonic())
                self.insecure += not secure
                self.took.notify_all()
        return "250 2.0.0 OK queued"

    def command(self, line: str) -> str:
        """``mark MODE``: forget the last run; ``wait N SECONDS`` / ``waitfail N SECONDS``: until N taken / 451ed."""
        command, *args = line.split()
        with self.took:
            if command == "mark":
                self.mode = args[0] if args and args[0] in MODES else "clean"
                self.stamps.clear()
                self.seen.clear()
                self.failed.clear()
                self.insecure = self.duplicates = self.sessions = 0
                self.cpu_mark = time.process_time()
                return "ok"
            want, within = int(args[0]), float(args[1])
            count: Callable[[], int] = (lambda: len(self.failed)) if command == "waitfail" else (
                lambda: len(self.stamps))
            self.took.wait_for(lambda: count() >= want, timeout=within)
            last = self.stamps[want - 1] if 0 < want <= len(self.stamps) else 0.0
            return (f"{len(self.stamps)} {self.insecure} {self.stamps[0] if self.stamps else 0.0} {last} "
                    f"{time.process_time() - self.cpu_mark} {self.duplicates} {len(self.failed)} {self.sessions}")

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
              and auth_data.password == PASSWORD.encode())
        with self.took:
            self.sessions += ok  # one per SMTP session: the relay reconnects only when it must
        # handled=False: aiosmtpd answers 535 itself on failure.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


class _Controller(Controller):
    def factory(self) -> SMTP:
        # Our own loop: otherwise aiosmtpd probes for one under warnings.catch_warnings().
        return SMTP(self.handler, loop=self.loop, **self.SMTP_kwargs)



class _Hooks:
    """aiosmtpd's handler; a class of its own, as aiosmtpd takes every ``handle_*``/``auth_*`` member."""

    def __init__(self, owner: Smarthost) -> None:
        self.owner = owner

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        return self.owner.take(bytes(envelope.original_content or b""), tls and bool(session.authenticated))


def serve_smtp(state_dir: str) -> int:
    """The server process: prints ``ready PORT CA``, then answers one line per command on stdin."""
    # aiosmtpd 1.4 logs "Session.login_data is deprecated" on every AUTH it completes.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    smarthost = Smarthost(Path(state_dir))
    smarthost.start()
    try:
        print(f"ready {smarthost.port} {smarthost.ca_pem}", flush=True)
        for line in sys.stdin:
            if line.strip():
                print(smarthost.command(line), flush=True)
    finally:
        smarthost.stop()
    return 0


@dataclass(frozen=True)
class Window:
    received: int  # distinct mails taken since the mark
    insecure: int  # of them, taken without TLS or AUTH: must be 0
    first: float
    last: float  # when the N-th distinct mail was taken (0.0 if not yet)
    server_cpu: float
    duplicates: int  # mails taken again (same key), not counted in ``received``
    failed: int  # first attempts answered 451
    sessions: int  # SMTP sessions authenticated


class SmarthostChild:
    """The server process, seen from the benchmark."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, ca: Path) -> None:
        self.proc, self.port, self.ca = proc, port, ca

    @classmethod
    async def start(cls, state_dir: Path) -> SmarthostChild:
        log = state_dir.with_name(state_dir.name + ".log")
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.retry_load", "smtp-server", str(state_dir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO,
                env=child_env())
        assert proc.stdout is not None
        ready = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
        if not ready or ready[0] != "ready":
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"the SMTP server process did not start: {ready!r}\n{tail(log)}")
        return cls(proc, int(ready[1]), Path(ready[2]))

    async def _ask(self, line: str, seconds: float = 10.0) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return (await asyncio.wait_for(self.proc.stdout.readline(), seconds + 5)).decode().strip()

    async def mark(self, mode: str = "clean") -> None:
        await self._ask(f"mark {mode}")

    async def wait(self, count: int, within: float = 120.0, *, failures: bool = False) -> Window:
        """Once ``count`` distinct mails were taken (or, with ``failures``, 451ed) since the mark, or ``within`` s."""
        words = (await self._ask(f"{'waitfail' if failures else 'wait'} {count} {within}", within)).split()
        return Window(int(words[0]), int(words[1]), float(words[2]), float(words[3]), float(words[4]),
                      int(words[5]), int(words[6]), int(words[7]))

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def smtp_config(self, pool_size: int) -> dict[str, object]:
        return {"host": "127.0.0.1", "port": self.port, "security": "starttls", "username": USER,
                "password": PASSWORD, "ca_file": str(self.ca), "helo": HELO, "timeout": 30.0,
                "pool_size": pool_size, "from": SENDER}


# -- one relay, one engine ------------------------------------------------------------------------

ENGINES = ("sqlite", "RabbitMQ")


@dataclass
class RelaySetup:
    """A relay config of its own (unique prefix; for sqlite a queue file of its own) and its topology."""

    engine: str
    url: str
    prefix: str
    config: Path
    log: Path
    topology: Topology

    @classmethod
    def make(cls, engine: str, server: SmarthostChild, work: Path, *, backoff: str, pool_size: int) -> RelaySetup:
        from relay.config.models import load_config
        from relay.daemon.relay import relay_topology

        prefix = unique_prefix("retry")
        url = f"sqlite:///{work / prefix}.db" if engine == "sqlite" else AMQP_URL
        smtp = "\n".join(f"{key} = {json.dumps(value)}" for key, value in server.smtp_config(pool_size).items())
        config = work / f"{prefix}.toml"
        config.write_text(f'host = "bench"\n\n[broker]\nurl = {json.dumps(url)}\nprefix = "{prefix}"\n\n'
                          f'[retry]\nbackoff = ["{backoff}"]\n\n[smtp]\n{smtp}\n', encoding="utf-8")
        return cls(engine, url, prefix, config, work / f"{prefix}.log", relay_topology(load_config(config, env={})))

    def queue(self, kind: str) -> str:
        from relay.contract.names import dead_queue, outbound_queue

        return outbound_queue(self.prefix) if kind == "outbound" else dead_queue(self.prefix)

    def retry_queue(self) -> str:
        names = [q.name for q in self.topology.queues if ".retry." in q.name]
        assert len(names) == 1, names
        return names[0]

    async def fill(self, queue: str, messages: Sequence[Message]) -> None:
        """Declare the topology and put ``messages`` on ``queue``, fast (the bench's writes need not be durable)."""
        if self.engine == "sqlite":
            await asyncio.to_thread(self._fill_sqlite, queue, messages)
            return
        from relay.engines.amqp import AmqpEngine

        await wait_for_broker(AMQP_URL)
        async with AmqpEngine(AMQP_URL) as engine:
            await engine.declare(self.topology)
            for start in range(0, len(messages), 1000):  # confirms awaited in batches, not one by one
                await asyncio.gather(*(engine.send(queue, m) for m in messages[start:start + 1000]))

    def _fill_sqlite(self, queue: str, messages: Sequence[Message]) -> None:
        from relay.engines import sqlite_rows
        from relay.engines import sqlite_store as store
        from relay.engines.sqlite import db_path

        conn = sqlite_rows.connect(db_path(self.url), 15.0)
        try:
            # The engine's own schema and INSERT, without the fsync per row that a relay pays.
            conn.execute("PRAGMA synchronous = OFF")
            store.declare(conn, self.topology)
            for message in messages:
                store.publish(conn, "", queue, message)
        finally:
            conn.close()

    async def depths(self, queues: Sequence[str]) -> dict[str, int]:
        from relay.engines import open_engine

        if self.engine == "RabbitMQ":
            await wait_for_broker(AMQP_URL)
        async with open_engine(self.url) as engine:
            return {q: await engine.depth(q) for q in queues}

    async def spawn(self) -> asyncio.subprocess.Process:
        with self.log.open("ab") as stderr:
            return await asyncio.create_subprocess_exec(
                str(OPSRELAY), "serve", "--config", str(self.config),
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr, cwd=REPO, env=deployed_env())

    async def cleanup(self) -> None:
        if self.engine == "RabbitMQ":
            await delete_broker_objects(AMQP_URL, [q.name for q in self.topology.queues],
                                        [e.name for e in reversed(self.topology.exchanges)])


async def stop_relay(proc: asyncio.subprocess.Process) -> int:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        return await proc.wait()


# -- (a) throughput with 5% failing -------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    engine: str
    mode: str
    mails: int
    started: float
    window: Window
    relay_cpu: float  # seconds per mail, between the first and the last mail
    left: int  # messages on outbound, retry and dead after the run: must be 0

    @property
    def rate(self) -> float:
        return (self.mails - 1) / (self.window.last - self.window.first)

    @property
    def rate_from_start(self) -> float:
        return self.mails / (self.window.last - self.started)


async def throughput_run(engine: str, mode: str, server: SmarthostChild, mails: Sequence[OutboundMail],
                         expect_failed: int, work: Path, pool_size: int) -> Run:
    """``opsrelay serve`` draining a pre-filled outbound queue, until the server took every mail once."""
    from relay.contract.mail import to_message

    setup = RelaySetup.make(engine, server, work, backoff="200ms", pool_size=pool_size)
    what = f"{engine}, {mode}"
    try:
        await setup.fill(setup.queue("outbound"), [to_message(m) for m in mails])
        await server.mark(mode)
        started = time.monotonic()
        proc = await setup.spawn()
        try:
            await server.wait(1)
            cpu_first = process_cpu(proc.pid)
            window = await server.wait(len(mails))
            cpu = process_cpu(proc.pid) - cpu_first
        finally:
            await stop_relay(proc)
        if window.received != len(mails) or window.insecure:
            raise RuntimeError(f"{what}: the server took {window.received} of {len(mails)} mails, "
                               f"{window.insecure} without TLS+AUTH; the relay's log:\n{tail(setup.log)}")
        if window.failed != (expect_failed if mode == "fail5" else 0):
            raise RuntimeError(f"{what}: the server answered 451 {window.failed} times, expected {expect_failed}")
        queues = [setup.queue("outbound"), setup.retry_queue(), setup.queue("dead")]
        left = sum((await setup.depths(queues)).values())
        return Run(engine, mode, len(mails), started, window, cpu / (len(mails) - 1), left)
    finally:
        await setup.cleanup()


# -- (b) memory with mails waiting in retry -----------------------------------------------------

@dataclass(frozen=True)
class Memory:
    engine: str
    case: str
    waiting: int  # messages on the retry queue when the relay was read (checked)
    settle: float  # seconds from the relay's "consuming" log line until its RSS held still
    status: dict[str, int]  # /proc/PID/status, kB
    fill: float  # seconds it took to put the mails there


def proc_status(pid: int) -> dict[str, int]:
    """The Vm* and Rss* lines of /proc/PID/status, in kB."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name.startswith(("Vm", "Rss")):
                found[name] = int(value.split()[0])
    return found


async def settled(pid: int, patience: float = 20.0) -> tuple[dict[str, int], float]:
    """Read /proc every 0.5 s until four readings in a row (1.5 s) agree on VmRSS within 1%."""
    began = time.monotonic()
    readings: list[int] = []
    while True:
        status = proc_status(pid)
        readings.append(status["VmRSS"])
        recent = readings[-4:]
        if (len(recent) == 4 and max(recent) - min(recent) <= max(recent) / 100) \
                or time.monotonic() - began > patience:
            return status, time.monotonic() - began
        await asyncio.sleep(0.5)


async def _consuming(setup: RelaySetup, proc: asyncio.subprocess.Process, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while b"relay: consuming" not in setup.log.read_bytes():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{setup.engine}: opsrelay serve did not start consuming:\n{tail(setup.log)}")
        await asyncio.sleep(0.05)


async def memory_run(engine: str, case: str, server: SmarthostChild, mails: Sequence[OutboundMail],
                     work: Path) -> Memory:
    """``case``: ``empty`` (queues empty), ``direct`` (written into the retry queue), ``relay`` (451ed by it)."""
    from relay.contract.mail import Attempt, to_message

    setup = RelaySetup.make(engine, server, work, backoff="1h", pool_size=2)
    retry, outbound = setup.retry_queue(), setup.queue("outbound")
    want = 0 if case == "empty" else len(mails)
    try:
        began = time.monotonic()
        if case == "direct":
            # What the relay would have written after a first attempt answered 451.
            tried = [m.after(Attempt("2026-01-01T00:00:00+00:00", REPLY_451, m.recipients), recipients=m.recipients)
                     for m in mails]
            await setup.fill(retry, [to_message(m) for m in tried])
        elif case == "relay":
            await setup.fill(outbound, [to_message(m) for m in mails])
        else:
            await setup.fill(outbound, [])
        await server.mark("failall")
        proc = await setup.spawn()
        try:
            await _consuming(setup, proc)
            if case == "relay":
                window = await server.wait(want, within=300.0, failures=True)
                for _ in range(100):  # the last retry publishes land just after the last 451
                    if (await setup.depths([retry]))[retry] >= want:
                        break
                    await asyncio.sleep(0.1)
            fill = time.monotonic() - began
            status, settle = await settled(proc.pid)
            depths = await setup.depths([retry, outbound, setup.queue("dead")])
            window = await server.wait(0, within=0.0)
        finally:
            await stop_relay(proc)
        if depths[retry] != want or depths[outbound] or window.received:
            raise RuntimeError(f"{engine}, {case}: expected {want} waiting in {retry}, found {depths} and "
                               f"{window.received} delivered; the relay's log:\n{tail(setup.log)}")
        return Memory(engine, case, depths[retry], settle, status, fill)
    finally:
        await setup.cleanup()


# -- the run ------------------------------------------------------------------------------------

def _throughput_cells(runs: list[Run], clean: list[Run] | None) -> list[str]:
    best, worst = max(runs, key=lambda r: r.rate), min(runs, key=lambda r: r.rate)
    ratio = best.rate / max(r.rate for r in clean) if clean is not None else None
    label = "no failures" if best.mode == "clean" else f"{100 // FAIL_ONE_IN}% of first attempts 451"
    return [f"{best.engine}: {label}", f"{len(runs)}x{best.mails:,}", f"{best.window.failed:,}",
            f"{best.window.sessions:,}",
            f"{best.window.first - best.started:.2f}", f"{best.rate:,.0f}", f"{worst.rate:,.0f}",
            f"{best.rate_from_start:,.0f}", "" if ratio is None else f"{ratio:.0%}",
            "" if ratio is None else ("yes" if ratio >= THROUGHPUT_TARGET else "NO"),
            f"{best.relay_cpu * 1e3:.2f}", f"{best.window.server_cpu / best.mails * 1e3:.2f}"]


def _memory_cells(m: Memory) -> list[str]:
    label = {"empty": "idle, queues empty", "direct": "waiting in retry (written there)",
             "relay": "waiting in retry (relay got 451 for each)"}[m.case]
    rss, hwm = m.status["VmRSS"] / 1024, m.status["VmHWM"] / 1024
    return [f"{m.engine}: {label}", f"{m.waiting:,}", f"{m.fill:.1f}", f"{m.settle:.1f}", f"{rss:.1f}",
            f"{hwm:.1f}", f"{m.status.get('RssAnon', 0) / 1024:.1f}", "yes" if rss < MEMORY_TARGET_MB else "NO"]


async def _run(mails_n: int, rounds: int, waiting: int, via_relay: bool, pool_size: int) -> None:
    mails = bench_mails(mails_n) if mails_n else []
    expect_failed = sum(fails_first(mail_key(m.raw)) for m in mails)
    runs: dict[tuple[str, str], list[Run]] = defaultdict(list)
    memory: list[Memory] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opsrelay-bench-") as tmp:
        work = Path(tmp)
        server = await SmarthostChild.start(work / "smtp")
        try:
            plan: list[tuple[tuple[str, str], Callable[[], Awaitable[Run]]]] = [
                ((engine, mode), functools.partial(throughput_run, engine, mode, server, mails, expect_failed,
                                                   work, pool_size))
                for engine in ENGINES for mode in ("clean", "fail5")
            ]
            # Interleaved rounds, each starting one row later: load from elsewhere falls on every row alike.
            for turn in range(rounds if mails else 0):
                shift = turn % len(plan)
                for key, step in plan[shift:] + plan[:shift]:
                    runs[key].append(await step())
            many = bench_mails(waiting) if waiting else []
            cases = ["empty"] + (["direct"] if waiting else []) + (["relay"] if waiting and via_relay else [])
            for engine in ENGINES:
                for case in cases:
                    memory.append(await memory_run(engine, case, server, many, work))
        finally:
            await server.stop()
    load_after = os.getloadavg()[0]

    load = (f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs "
            "(anything above ~2 means other work shared the machine).")
    if mails:
        _print_throughput(runs, mails, expect_failed, rounds, pool_size, load)
    if memory:
        _print_memory(memory, via_relay, load)


def _print_throughput(runs: dict[tuple[str, str], list[Run]], mails: Sequence[OutboundMail], expect_failed: int,
                      rounds: int, pool_size: int, load: str) -> None:
    size = sum(len(m.raw) for m in mails) / len(mails)
    rows = []
    for engine in ENGINES:
        rows += [_throughput_cells(runs[engine, "clean"], None),
                 _throughput_cells(runs[engine, "fail5"], runs[engine, "clean"])]
    print_table(
        f"Retry load: mails/s through opsrelay serve with {100 // FAIL_ONE_IN}% of first attempts answered 451 "
        f"({size:,.0f}-byte crash mails, retry.backoff = [\"200ms\"], smtp.pool_size = {pool_size})",
        ["row", "mails", "451s", "SMTP sessions", "start->1st s", "mails/s", "worst", "incl. start", "vs clean",
         f">= {THROUGHPUT_TARGET:.0%}", "CPU ms/mail: relay", "server"],
        rows,
        notes=[
            "`opsrelay serve` as deployed drains a pre-filled <prefix>.outbound until the server (this bench's own, "
            "in a process of its own; STARTTLS + AUTH checked on every mail) has taken every mail once.",
            f"451s: first attempts the server answered 451 at the end of DATA (the same {expect_failed} of "
            f"{len(mails)} mails every run: the server picks them by a hash of their Message-ID, which the bench "
            "chose so that every 20th mail is one); each retry waits 200 ms in <prefix>.retry.200ms, then goes "
            "back to outbound.",
            f"each row ran {rounds} round(s), interleaved with the other rows; figures are from its fastest round, "
            "'worst' is its slowest round's mails/s.",
            "mails/s: (N-1) / (last - first distinct mail taken by the server), so it includes the wait for the last "
            "retries; incl. start: N / (last mail - spawn of opsrelay serve). vs clean: against the clean row of "
            "the same engine.",
            "SMTP sessions: sessions that authenticated at the server: 1 when the relay kept its connection "
            "throughout; each one more cost a new connect + STARTTLS + AUTH.",
            "CPU per mail: relay is opsrelay serve between its first and last mail (RabbitMQ's own CPU not "
            "counted); server is the SMTP server process, 451 answers included.",
            f"over all runs: {sum(r.window.duplicates for v in runs.values() for r in v)} mails taken twice "
            f"(counted once), {sum(r.left for v in runs.values() for r in v)} messages left on outbound, "
            "retry or dead at stop.",
            load,
        ],
    )


def _print_memory(memory: list[Memory], via_relay: bool, load: str) -> None:
    print_table(
        f"Retry load: memory of opsrelay serve with mails waiting in its retry queue (TTL 1h; target < "
        f"{MEMORY_TARGET_MB:.0f} MB)",
        ["row", "waiting", "fill s", "settle s", "VmRSS MB", "VmHWM MB", "RssAnon MB",
         f"< {MEMORY_TARGET_MB:.0f} MB"],
        [_memory_cells(m) for m in memory],
        notes=[
            "fill s: from the first write to the queue until the relay logged 'consuming' (relay case: "
            "until it had moved every mail to the retry queue).",
            "read from /proc/PID/status once the relay logged 'consuming' and its VmRSS held within 1% over "
            "four readings 0.5 s apart ('settle s'); VmHWM is its peak RSS since it started.",
            "written there: the bench put each mail, as the relay would after a first 451, straight into "
            "<prefix>.retry.3600000ms (the engine's own publish) before the relay started, so the relay "
            "never held them: the row shows what waiting mails cost an idle relay.",
            *(["relay got 451 for each: the relay drained that many mails from outbound and the server "
               "answered 451 to every first attempt, so the relay itself moved them to the retry queue; "
               "VmHWM includes that work."] if via_relay else []),
            "checked each time: the retry queue held every mail and nothing was delivered or dead-lettered.",
            "no consumer reads a retry queue: RabbitMQ holds those messages in the broker, the embedded engine "
            "in its queue file, until their TTL moves them back to outbound.",
            load,
        ],
    )


def run(mails: int = 1000, rounds: int = 3, waiting: int = 10_000, via_relay: bool = False,
        pool_size: int = 1) -> None:
    """Both tables; ``mails`` per throughput round, ``waiting`` mails for the memory rows (0: idle rows only)."""
    asyncio.run(_run(mails, rounds, waiting, via_relay, pool_size))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retry_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--retry-mails", type=int, default=1000,
                        help="mails per throughput round (1000; 0: memory rows only)")
    parser.add_argument("--retry-rounds", type=int, default=3, help="interleaved rounds per throughput row (3)")
    parser.add_argument("--retry-waiting", type=int, default=10_000,
                        help="mails waiting in retry for the memory rows (10000; 0: idle rows only)")
    parser.add_argument("--retry-via-relay", action="store_true",
                        help="memory: also let the relay fail that many mails itself (~1 min more)")
    parser.add_argument("--retry-pool-size", type=int, default=1, help="throughput: smtp.pool_size (1)")
    args = parser.parse_args(argv)
    if args.retry_mails == 1 or args.retry_mails < 0 or args.retry_rounds < 1 or args.retry_waiting < 0:
        parser.error("--retry-mails must be 0 (no throughput rows) or at least 2, --retry-rounds at least 1 "
                     "and --retry-waiting at least 0")
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    run(args.retry_mails, args.retry_rounds, args.retry_waiting, args.retry_via_relay, args.retry_pool_size)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["smtp-server"] and len(sys.argv) == 3:
        sys.exit(serve_smtp(sys.argv[2]))
    sys.exit(main())
