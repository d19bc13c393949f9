"""Mails per second into a real STARTTLS + AUTH smarthost: the relay against bare aiosmtplib.

The smarthost is ``tests.smtp_server.SmtpServer`` (aiosmtpd, trustme certificate,
AUTH PLAIN/LOGIN only over TLS) run in a process of its own, for every row alike,
so that server and client never share a GIL. That process counts the mails it
took (and those that came without TLS or AUTH: there must be none) and stamps
each with ``time.monotonic()``, which on Linux is the same clock in every process.

Rows (same rendered ~1.5 KB crash mails throughout):

* bare loop: one aiosmtplib connection per task (connect, STARTTLS, AUTH once), then
  ``sendmail`` per mail: the ceiling for that many connections;
* bare, new connection per mail: ``aiosmtplib.send`` each time, what a naive relay does;
* ``relay.delivery.smtp.SmtpPool``: the relay's own client, without the broker;
* ``opsrelay serve``: the whole relay, as deployed, draining a pre-filled
  ``<prefix>.outbound`` queue on RabbitMQ (consume, send, ack; INFO log per mail).

``mails/s`` is steady throughput measured at the server, (N-1) / (last - first mail);
``incl. start`` is N / (last mail - start), where start is before the client's first
connect, or before ``opsrelay serve`` was spawned (its imports, broker connect and declare).
Rows run in interleaved rounds, so load from elsewhere on the machine spreads over all of
them; each row shows its fastest round. CPU per mail is counted for the client, the server
and (for the relay) RabbitMQ, as the wall clock alone hides who paid.

``python -m bench.relay_throughput smtp-server DIR`` is the server process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    AMQP_URL,
    REPO,
    broker_pid,
    child_env,
    delete_broker_objects,
    print_table,
    process_cpu,
    queue_depths,
    tail,
    unique_prefix,
    wait_for_broker,
)
from relay.contract.mail import OutboundMail
from tests.smtp_server import DEFAULT_PASSWORD, DEFAULT_USER

__all__ = ["run", "serve_smtp"]

OPSRELAY = REPO / ".venv" / "bin" / "opsrelay"
SENDER = "opsrelay@web1.example.com"
RECIPIENT = "oncall@example.com"
HELO = "client.test"
TARGET = 0.80
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
LOG_TAIL = "\n".join([
    "2024-05-02 03:14:07,112 INFO worker_03 picked job 88123 (invoice-render)",
    "2024-05-02 03:14:07,540 WARNING pool: 3 of 4 connections busy for 12.1s",
    "Traceback (most recent call last):",
    '  File "/srv/app/worker/jobs.py", line 211, in run',
    "    result = handler(job.payload, deadline=job.deadline)",
    '  File "/srv/app/worker/render.py", line 88, in render_invoice',
    "    pdf = self.engine.render(template, context, timeout=30)",
    '  File "/srv/app/vendor/pdfkit/engine.py", line 402, in render',
    "    raise RenderTimeout(f'render exceeded {timeout}s')",
    "pdfkit.engine.RenderTimeout: render exceeded 30s",
    "2024-05-02 03:14:37,611 CRITICAL worker_03 unrecoverable, exiting with status 70",
])


# -- the mails --------------------------------------------------------------------------------

def crash_mails(count: int) -> list[OutboundMail]:
    """Rendered by the relay's own templates: what a crash of a busy worker looks like."""
    from relay.config.models import Config, SmtpConfig, Subscription
    from relay.contract.event import Event
    from relay.render.renderer import Renderer

    sub = Subscription(name="oncall", to=(RECIPIENT,))
    renderer = Renderer(Config(host="web1", smtp=SmtpConfig.model_validate({"from": SENDER}),
                               subscriptions=(sub,)))
    return [
        renderer.render(sub, Event(host="web1", group="workers", process="worker_03", event="PROCESS_STATE_EXITED",
                                   state="EXITED", from_state="RUNNING", expected=False, pid=20000 + i,
                                   log_tail=LOG_TAIL))
        for i in range(count)
    ]


# -- the smarthost in its own process -----------------------------------------------------------

def serve_smtp(state_dir: str) -> int:
    """The server process: ``ready PORT CA``, then answers ``mark`` and ``wait N TIMEOUT`` on stdin.

    Mails are counted once per Message-ID: the relay delivers at least once, and after a broker
    restart it may send a mail again; a run ends when every distinct mail has arrived.
    """
    from tests.smtp_server import ReceivedMail, SmtpServer

    # aiosmtpd 1.4 logs "Session.login_data is deprecated" on every AUTH it completes.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    took = threading.Condition()
    stamps: list[float] = []
    seen: set[bytes] = set()
    insecure = duplicates = 0
    cpu_mark = time.process_time()

    def on_receive(mail: ReceivedMail) -> None:
        nonlocal insecure, duplicates
        found = _MESSAGE_ID.search(mail.content)
        key = found.group(1) if found else mail.content
        with took:
            if key in seen:
                duplicates += 1
                return
            seen.add(key)
            stamps.append(time.monotonic())
            insecure += not (mail.tls and mail.auth_user == DEFAULT_USER)
            took.notify_all()

    with SmtpServer(state_dir, on_receive=on_receive) as server:
        print(f"ready {server.port} {server.ca_pem_path}", flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            with took:
                if command == "mark":
                    stamps.clear()
                    seen.clear()
                    insecure = duplicates = 0
                    cpu_mark = time.process_time()
                    print("ok", flush=True)
                elif command == "wait":
                    want = int(args[0])
                    took.wait_for(functools.partial(_at_least, stamps, want), timeout=float(args[1]))
                    last = stamps[want - 1] if len(stamps) >= want else 0.0
                    print(f"{len(stamps)} {insecure} {stamps[0] if stamps else 0.0} {last} "
                          f"{time.process_time() - cpu_mark} {duplicates}", flush=True)
    return 0


def _at_least(stamps: list[float], want: int) -> bool:
    return len(stamps) >= want


@dataclass(frozen=True)
class Window:
    received: int
    insecure: int
    first: float
    last: float
    server_cpu: float  # CPU seconds the server process spent since the mark
    duplicates: int  # mails received again (same Message-ID), not counted in ``received``


class SmtpChild:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, ca: Path) -> None:
        self.proc, self.port, self.ca = proc, port, ca

    @classmethod
    async def start(cls, state_dir: Path) -> SmtpChild:
        log = state_dir.with_name(state_dir.name + ".log")  # SmtpServer creates state_dir itself
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.relay_throughput", "smtp-server", str(state_dir),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO,
                env=child_env())
        assert proc.stdout is not None
        ready = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
        if not ready or ready[0] != "ready":
            proc.kill()
            raise RuntimeError(f"the SMTP server process did not start: {ready!r}\n{tail(log)}")
        return cls(proc, int(ready[1]), Path(ready[2]))

    async def _ask(self, line: str, seconds: float = 10.0) -> str:
        """One command, one answer line; the server bounds its own wait by ``seconds``, we add slack."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        return (await asyncio.wait_for(self.proc.stdout.readline(), seconds + 5)).decode().strip()

    async def mark(self) -> None:
        await self._ask("mark")

    async def wait(self, count: int, within: float = 120.0) -> Window:
        """Once the server has taken ``count`` mails since the mark, or ``within`` seconds passed."""
        received, insecure, first, last, cpu, again = (await self._ask(f"wait {count} {within}", within)).split()
        return Window(int(received), int(insecure), float(first), float(last), float(cpu), int(again))

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def smtp_config(self, pool_size: int) -> dict[str, object]:
        return {"host": "127.0.0.1", "port": self.port, "security": "starttls", "username": DEFAULT_USER,
                "password": DEFAULT_PASSWORD, "ca_file": str(self.ca), "helo": HELO, "timeout": 30.0,
                "pool_size": pool_size, "from": SENDER}


# -- the clients --------------------------------------------------------------------------------

def _split(raws: Sequence[bytes], ways: int) -> list[Sequence[bytes]]:
    return [raws[i::ways] for i in range(ways)]


async def bare_loop(server: SmtpChild, raws: Sequence[bytes], connections: int) -> None:
    import aiosmtplib

    async def one(share: Sequence[bytes]) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=True,
                                 tls_context=server.tls_context(), local_hostname=HELO, timeout=30)
        await client.connect()
        await client.login(DEFAULT_USER, DEFAULT_PASSWORD)
        for raw in share:
            refused, reply = await client.sendmail(SENDER, [RECIPIENT], raw)
            if refused or not reply.startswith("2"):
                raise RuntimeError(f"bare loop: mail not taken: {refused} {reply}")
        await client.quit()

    await asyncio.gather(*(one(share) for share in _split(raws, connections)))


async def bare_fresh(server: SmtpChild, raws: Sequence[bytes]) -> None:
    import aiosmtplib

    context = server.tls_context()
    for raw in raws:
        await aiosmtplib.send(raw, sender=SENDER, recipients=[RECIPIENT], hostname="127.0.0.1", port=server.port,
                              start_tls=True, tls_context=context, username=DEFAULT_USER,
                              password=DEFAULT_PASSWORD, local_hostname=HELO, timeout=30)


async def smtp_pool(server: SmtpChild, raws: Sequence[bytes], pool_size: int) -> None:
    from relay.config.models import SmtpConfig
    from relay.delivery.smtp import SmtpPool

    pool = SmtpPool(SmtpConfig.model_validate(server.smtp_config(pool_size)))

    async def one(share: Sequence[bytes]) -> None:
        for raw in share:
            result = await pool.send(SENDER, [RECIPIENT], raw)
            if result.refused or not result.accepted:
                raise RuntimeError(f"SmtpPool: mail not taken: {result}")

    try:
        # As the relay drives it: pool_size deliveries in flight.
        await asyncio.gather(*(one(share) for share in _split(raws, pool_size)))
    finally:
        await pool.close()


@dataclass(frozen=True)
class Row:
    name: str
    connections: int
    mails: int
    started: float
    window: Window
    client_cpu: float  # CPU seconds per mail of the sending process
    broker_cpu: float | None = None  # RabbitMQ's CPU seconds per mail, for the rows that use it

    @property
    def rate(self) -> float:
        return (self.mails - 1) / (self.window.last - self.window.first)

    @property
    def rate_from_start(self) -> float:
        return self.mails / (self.window.last - self.started)


def _check(name: str, window: Window, count: int) -> None:
    if window.received != count or window.insecure:
        raise RuntimeError(f"{name}: the server took {window.received} mails of {count}, "
                           f"{window.insecure} without TLS+AUTH")


async def measure(server: SmtpChild, name: str, connections: int, count: int,
                  client: Callable[[], Awaitable[None]]) -> Row:
    """A client in this process; its CPU per mail includes its connection setup (once, or per mail for (b))."""
    await server.mark()
    started, cpu = time.monotonic(), time.process_time()
    await client()
    cpu = time.process_time() - cpu
    window = await server.wait(count)
    _check(name, window, count)
    return Row(name, connections, count, started, window, cpu / count)


@dataclass(frozen=True)
class RelayRun:
    row: Row
    outbound_left: int
    dead: int


async def full_relay(server: SmtpChild, mails: Sequence[OutboundMail], pool_size: int, work: Path, *,
                     metrics_listen: str = "", broker: Mapping[str, object] | None = None) -> RelayRun:
    """``opsrelay serve`` draining a pre-filled outbound queue, timed until the server has every mail.

    Its CPU per mail is read from /proc between the first and the last mail, so the
    interpreter's start-up and imports are left out of it (they are in ``incl. start``).
    ``metrics_listen`` (HOST:PORT) turns on its ``[metrics]`` (bench/metrics_scrape.py scrapes it).
    ``broker``: its ``[broker]`` keys besides ``prefix`` (default: ``url`` = AMQP_URL), e.g. a cluster's
    ``urls`` and ``queue_type`` (bench/quorum.py); the queues are pre-filled and deleted through the
    engine that config names, so they are declared as the relay declares them.
    """
    from relay.config.models import load_config
    from relay.contract.mail import to_message
    from relay.contract.names import dead_queue, outbound_queue
    from relay.daemon.relay import relay_topology
    from relay.engines import open_engine

    name = f"(d) opsrelay serve, pool_size={pool_size}"
    prefix = unique_prefix(f"relay{pool_size}")
    config_path = work / f"relay-{pool_size}.toml"
    smtp = "\n".join(f"{key} = {_toml(value)}" for key, value in server.smtp_config(pool_size).items())
    keys = {**(broker or {"url": AMQP_URL}), "prefix": prefix}
    broker_keys = "\n".join(f"{key} = {_toml(value)}" for key, value in keys.items())
    config_path.write_text(f'host = "bench"\n\n[broker]\n{broker_keys}\n\n'
                           f"[smtp]\n{smtp}\n"
                           + (f'\n[metrics]\nlisten = "{metrics_listen}"\n' if metrics_listen else ""),
                           encoding="utf-8")
    config = load_config(config_path, env={})
    url = config.broker.url  # with urls: the first node (shuffle_urls = false keeps it the relay's first too)
    topology = relay_topology(config)
    outbound, dead = outbound_queue(prefix), dead_queue(prefix)
    log = work / f"relay-{pool_size}.log"
    try:
        await wait_for_broker(url)
        async with open_engine(url, **config.broker.engine_options) as engine:
            await engine.declare(topology)
            for start in range(0, len(mails), 200):  # confirms awaited in batches, not one by one
                await asyncio.gather(*(engine.send(outbound, to_message(m)) for m in mails[start:start + 200]))
        await server.mark()
        started = time.monotonic()
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                str(OPSRELAY), "serve", "--config", str(config_path),
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr, cwd=REPO, env=child_env())
        broker = broker_pid()
        try:
            await server.wait(1)
            cpu_first = process_cpu(proc.pid)
            broker_first = process_cpu(broker) if broker else 0.0
            window = await server.wait(len(mails))
            cpu = process_cpu(proc.pid) - cpu_first
            broker_cpu = (process_cpu(broker) - broker_first) / (len(mails) - 1) if broker else None
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if window.received < len(mails):
            raise RuntimeError(f"opsrelay serve delivered {window.received} of {len(mails)}; its log:\n{tail(log)}")
        _check(name, window, len(mails))
        depths = await queue_depths(url, [outbound, dead])
        row = Row(name, pool_size, len(mails), started, window, cpu / (len(mails) - 1), broker_cpu)
        return RelayRun(row, depths[outbound], depths[dead])
    finally:
        await delete_broker_objects(url, [q.name for q in topology.queues],
                                    [e.name for e in reversed(topology.exchanges)])


def _toml(value: object) -> str:
    if isinstance(value, bool):  # before int: bool is one
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value) if isinstance(value, int | float) else '"' + str(value).replace("\\", "\\\\") + '"'


# -- reporting ----------------------------------------------------------------------------------

def _cells(rounds: list[Row], bare: list[Row] | None, target: bool) -> list[str]:
    """The fastest round of a row (as timeit reports the minimum), and its slowest for the spread."""
    best, worst = max(rounds, key=lambda r: r.rate), min(rounds, key=lambda r: r.rate)
    ratio = best.rate / max(r.rate for r in bare) if bare is not None else None
    return [best.name, str(best.connections), f"{len(rounds)}x{best.mails:,}",
            f"{best.window.first - best.started:.2f}", f"{best.rate:,.0f}", f"{worst.rate:,.0f}",
            f"{best.rate_from_start:,.0f}",
            "" if ratio is None else f"{ratio:.0%}",
            ("yes" if ratio >= TARGET else "NO") if target and ratio is not None else "",
            f"{best.client_cpu * 1e3:.2f}", f"{best.window.server_cpu / best.mails * 1e3:.2f}",
            "" if best.broker_cpu is None else f"{best.broker_cpu * 1e3:.2f}"]


async def _run(mails_n: int, fresh_n: int, rounds: int) -> None:
    per_round, fresh_per_round = max(2, mails_n // rounds), max(2, fresh_n // rounds)
    mails = crash_mails(per_round)
    raws = [m.raw for m in mails]
    rows: dict[str, list[Row]] = defaultdict(list)
    relay_runs: list[RelayRun] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opsrelay-bench-") as tmp:
        work = Path(tmp)
        server = await SmtpChild.start(work / "smtp")
        try:
            await bare_loop(server, raws[:20], 1)  # warm-up: imports, first handshake; not measured

            async def relay(pool_size: int) -> Row:
                relay_runs.append(await full_relay(server, mails, pool_size, work))
                return relay_runs[-1].row

            plan: list[tuple[str, Callable[[], Awaitable[Row]]]] = [
                ("a1", lambda: measure(server, "(a) bare aiosmtplib loop", 1, per_round,
                                       lambda: bare_loop(server, raws, 1))),
                ("b", lambda: measure(server, "(b) bare aiosmtplib, connection per mail", 1, fresh_per_round,
                                      lambda: bare_fresh(server, raws[:fresh_per_round]))),
                ("c1", lambda: measure(server, "(c) SmtpPool, pool_size=1", 1, per_round,
                                       lambda: smtp_pool(server, raws, 1))),
                ("d1", lambda: relay(1)),
                ("a2", lambda: measure(server, "(a) bare aiosmtplib loop, 2 tasks", 2, per_round,
                                       lambda: bare_loop(server, raws, 2))),
                ("c2", lambda: measure(server, "(c) SmtpPool, pool_size=2", 2, per_round,
                                       lambda: smtp_pool(server, raws, 2))),
                ("d2", lambda: relay(2)),
            ]
            # Rounds interleave the rows, each round starting one row later, so load from elsewhere
            # on the machine and any after-effect of the previous row fall on all of them alike.
            for turn in range(rounds):
                shift = turn % len(plan)
                for key, step in plan[shift:] + plan[:shift]:
                    rows[key].append(await step())
        finally:
            await server.stop()
    load_after = os.getloadavg()[0]

    size = sum(len(r) for r in raws) / len(raws)
    print_table(
        f"Relay: mails/s into a STARTTLS + AUTH smarthost ({size:,.0f}-byte crash mails)",
        ["row", "conns", "mails", "start->1st s", "mails/s", "worst", "incl. start", "vs bare", f">= {TARGET:.0%}",
         "CPU ms/mail: client", "server", "RabbitMQ"],
        [_cells(rows["a1"], None, False), _cells(rows["b"], rows["a1"], False),
         _cells(rows["c1"], rows["a1"], True), _cells(rows["d1"], rows["a1"], True),
         _cells(rows["a2"], None, False), _cells(rows["c2"], rows["a2"], True), _cells(rows["d2"], rows["a2"], True)],
        notes=[
            "server: tests.smtp_server.SmtpServer (aiosmtpd) in its own process for every row; every mail "
            "was checked to arrive over TLS after AUTH.",
            f"each row ran {rounds} rounds, interleaved with the other rows (each round starting one row later); "
            "figures are from its fastest round, 'worst' is the slowest round's mails/s.",
            "mails/s: (N-1) / (last - first mail taken by the server); incl. start: N / (last mail - start). "
            "vs bare: mails/s against the bare loop with the same number of connections.",
            "(d) is `opsrelay serve` as deployed, draining a pre-filled <prefix>.outbound on RabbitMQ, one INFO "
            "log line per mail (to a file); its start is before the spawn (interpreter, imports, broker "
            "connect and declare).",
            "CPU per mail: client is the sending process (this one for (a)-(c), opsrelay serve for (d), "
            "between its first and last mail); server is the SMTP server process; RabbitMQ is the broker "
            "between (d)'s first and last mail.",
            f"(d) over its {len(relay_runs)} runs: {sum(r.row.window.duplicates for r in relay_runs)} mails "
            f"delivered twice (counted once), {sum(r.outbound_left for r in relay_runs)} messages left on "
            f"outbound at stop, {sum(r.dead for r in relay_runs)} dead letters.",
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs "
            "(anything above ~2 means other work shared the machine).",
        ],
    )


def run(mails: int = 2000, fresh_mails: int = 300, rounds: int = 4) -> None:
    asyncio.run(_run(mails, min(fresh_mails, mails), rounds))


if __name__ == "__main__":
    if sys.argv[1:2] == ["smtp-server"] and len(sys.argv) == 3:
        sys.exit(serve_smtp(sys.argv[2]))
    sys.exit("usage: python -m bench.relay_throughput smtp-server STATE_DIR (the benchmark is python -m bench relay)")
