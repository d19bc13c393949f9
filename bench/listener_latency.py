"""How long supervisord waits for an answer: ``opsrelay listen`` against superlance's crashmail.

This process plays supervisord over the listener's stdin/stdout pipes: wait for
``READY``, write one envelope, time until the whole ``RESULT`` has arrived.
The envelopes are built by supervisord's own code (``ProcessStateExitedEvent.payload``
and ``EventListenerPool._eventEnvelope``, then UTF-8 as ``process.write(as_bytes(...))``
does), so ``len:`` counts characters exactly as supervisord's does; one program
name in four is non-ASCII to keep that honest.

``opsrelay listen`` answers OK only after RabbitMQ confirmed the event persistent (or, while
the broker is away, after its spool, kept in the run's temporary directory, fsynced it).
crashmail answers after its sendmail pipe closed; with ``/bin/cat >/dev/null`` as
sendmail that is a lower bound of its cost, and it answers OK whatever sendmail did
(a third row shows it with a sendmail that fails every mail).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from bench.common import (
    AMQP_URL,
    REPO,
    broker_pid,
    child_env,
    delete_broker_objects,
    percentile,
    print_table,
    process_cpu,
    queue_depths,
    tail,
    unique_prefix,
    wait_for_broker,
)
from relay.contract.names import unrouted_queue
from relay.contract.topology import event_topology

__all__ = ["Listener", "drive", "envelopes", "run"]

OPSRELAY = REPO / ".venv" / "bin" / "opsrelay"
CRASHMAIL = REPO / ".venv" / "bin" / "crashmail"
PROGRAMS = (("web", "web"), ("workers", "worker_03"), ("queue-consumer", "queue-consumer"), ("späti", "kühlung"))
FAILING_SENDMAIL = "sh -c 'cat >/dev/null; exit 75'"  # EX_TEMPFAIL: the mail was not taken


def envelopes(count: int) -> list[bytes]:
    """``count`` unexpected PROCESS_STATE_EXITED envelopes, byte for byte as supervisord writes them."""
    from supervisor.compat import as_bytes
    from supervisor.events import ProcessStateExitedEvent
    from supervisor.process import EventListenerPool
    from supervisor.states import ProcessStates

    # Stand-ins with just the attributes those two methods read.
    pool = SimpleNamespace(config=SimpleNamespace(name="opsrelay", options=SimpleNamespace(identifier="supervisor")))
    out = []
    for serial in range(1, count + 1):
        group, name = PROGRAMS[serial % len(PROGRAMS)]
        process = SimpleNamespace(config=SimpleNamespace(name=name), pid=20000 + serial % 30000,
                                  group=SimpleNamespace(config=SimpleNamespace(name=group)))
        payload = ProcessStateExitedEvent(process, ProcessStates.RUNNING, expected=False).payload()
        envelope = EventListenerPool._eventEnvelope(pool, ProcessStateExitedEvent, serial, serial, payload)
        out.append(as_bytes(envelope))
    return out


@dataclass
class Listener:
    """One listener process and what was measured of it."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    limit: int | None = None  # serve only the first ``limit`` events
    children: bool = False  # count the CPU of its waited-for children (crashmail's sendmail)
    latencies_ns: list[int] = field(default_factory=list)
    busy_ns: int = 0
    ok: int = 0
    cpu_s: float = 0.0
    broker: int | None = None  # RabbitMQ's pid: its CPU while serving this listener's events is counted
    broker_cpu_s: float = 0.0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as stderr:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                         env=self.env, cwd=REPO)
        self._expect_ready()
        self.cpu_s = -process_cpu(self.proc.pid, children=self.children)  # its start-up is left out

    def _line(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: stdout closed (exit {self.proc.poll()}); its stderr:\n{tail(self.log)}")
        return line

    def _expect_ready(self) -> None:
        if (line := self._line()) != b"READY\n":
            raise RuntimeError(f"{self.name}: sent {line!r} where READY was due")

    def exchange(self, envelope: bytes) -> None:
        """One event as supervisord sends it; the listener is READY again when this returns."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        broker_before = process_cpu(self.broker) if self.broker else 0.0
        t0 = time.perf_counter_ns()
        self.proc.stdin.write(envelope)
        self.proc.stdin.flush()
        kind, _, length = self._line().decode("ascii").partition(" ")
        if kind != "RESULT":
            raise RuntimeError(f"{self.name}: sent {kind!r} where RESULT was due")
        body = self.proc.stdout.read(int(length))
        self.latencies_ns.append(time.perf_counter_ns() - t0)
        self.ok += body == b"OK"
        self._expect_ready()
        self.busy_ns += time.perf_counter_ns() - t0
        if self.broker:
            self.broker_cpu_s += process_cpu(self.broker) - broker_before

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.cpu_s += process_cpu(self.proc.pid, children=self.children)
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF: both listeners exit on it
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def drive(listeners: list[Listener], events: list[bytes]) -> None:
    """Be supervisord for every listener at once, event by event in turn.

    Only one listener works at any moment (each answer is awaited before the next
    envelope), and load from elsewhere on the machine falls on all of them alike.
    """
    try:
        for listener in listeners:
            listener.start()
        for i, envelope in enumerate(events):
            for listener in listeners:
                if listener.limit is None or i < listener.limit:
                    listener.exchange(envelope)
    finally:
        for listener in listeners:
            listener.stop()


def _spooled(path: Path, prefix: str) -> int:
    """Events left in the listener's spool (it forwards them on its next start); 0 when never used."""
    if not path.exists():
        return 0
    from listeners.spool import Spool

    spool = Spool(f"sqlite:///{path}", prefix)
    try:
        return spool.depth()
    finally:
        spool.close()


def _outage(log: Path) -> str:
    """The listener's first "broker unavailable" log line, shortened; "" when the broker never failed."""
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if "broker unavailable" in line:
            reason = line.split("broker unavailable", 1)[1].split("): spooling", 1)[0].strip(" :(")
            return reason if len(reason) <= 100 else reason[:100].rsplit(" ", 1)[0] + " ..."
    return ""


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def _row(listener: Listener) -> list[str]:
    ordered = sorted(listener.latencies_ns)
    n = len(ordered)
    return [listener.name, f"{n:,}", f"{listener.ok:,}", _ms(listener.latencies_ns[0]),
            *(_ms(percentile(ordered, p)) for p in (50, 90, 99)), _ms(ordered[-1]),
            f"{n / (listener.busy_ns / 1e9):,.0f}", f"{listener.cpu_s / n * 1e3:.2f}",
            f"{listener.broker_cpu_s / n * 1e3:.2f}" if listener.broker else ""]


def run(events: int = 10_000) -> None:
    payloads = envelopes(events)
    prefix = unique_prefix("listen")
    topology = event_topology(prefix)
    asyncio.run(wait_for_broker(AMQP_URL))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opsrelay-bench-") as tmp:
        work = Path(tmp)
        config = work / "listener.toml"
        spool = work / "spool.db"
        # The spool in our temporary directory: never the shared default beside /var/lib/opsrelay/queue.db.
        config.write_text(f'host = "bench"\n\n[broker]\nurl = "{AMQP_URL}"\nprefix = "{prefix}"\n'
                          f'spool = "sqlite:///{spool}"\n', encoding="utf-8")
        # supervisord sets SUPERVISOR_SERVER_URL for its children; crashmail refuses to run without it.
        crash_env = child_env(SUPERVISOR_SERVER_URL="unix:///nonexistent/supervisor.sock")
        crashmail = [str(CRASHMAIL), "-a", "-m", "x@example.com", "-s"]
        ours = Listener("opsrelay listen -> RabbitMQ", [str(OPSRELAY), "listen", "--config", str(config)],
                        child_env(), work / "listen.log", broker=broker_pid())
        theirs = Listener("crashmail, sendmail = /bin/cat", [*crashmail, "/bin/cat >/dev/null"], crash_env,
                          work / "crashmail.log", children=True)
        broken = Listener("crashmail, sendmail fails (exit 75)", [*crashmail, FAILING_SENDMAIL], crash_env,
                          work / "crashmail-fail.log", limit=min(events, 500), children=True)
        try:
            drive([ours, theirs, broken], payloads)
            stored = asyncio.run(queue_depths(AMQP_URL, [unrouted_queue(prefix)]))[unrouted_queue(prefix)]
            spooled = _spooled(spool, prefix)
            outage = _outage(ours.log)
        finally:
            asyncio.run(delete_broker_objects(AMQP_URL, [q.name for q in topology.queues],
                                              [e.name for e in reversed(topology.exchanges)]))
    load_after = os.getloadavg()[0]

    print_table(
        f"Listener: supervisord event -> RESULT, in ms ({events:,} unexpected PROCESS_STATE_EXITED events)",
        ["listener", "events", "answered OK", "first", "p50", "p90", "p99", "max", "events/s", "CPU ms/event",
         "RabbitMQ CPU ms/event"],
        [_row(ours), _row(theirs), _row(broken)],
        notes=[
            "one envelope at a time per listener, as supervisord sends them; the listeners take turns event by "
            "event, so load from elsewhere falls on each alike.",
            "opsrelay answers OK only once RabbitMQ confirmed the event persistent (or, while the broker is "
            "away, once its spool fsynced it); its first event includes the broker connection and the exchange "
            f"declaration. Checked afterwards: of the {ours.ok:,} events it answered OK for, RabbitMQ held "
            f"{stored:,} and its spool {spooled:,}.",
            *([f"the broker went away during the run; opsrelay spooled events "
               f"until it was back, so some of its figures are spool commits, not broker confirms. Its log: "
               f"{outage}"] if outage else []),
            "crashmail's figures are a lower bound: /bin/cat >/dev/null stands in for a sendmail that would "
            "be slower.",
            f"crashmail answers OK even when the mail failed: its sendmail ({FAILING_SENDMAIL}) failed every "
            f"mail and crashmail answered OK to {broken.ok:,} of {len(broken.latencies_ns):,}; those alerts are lost.",
            "events/s: events / time spent serving them (envelope written until READY again). CPU: the "
            "listener process after its first READY (crashmail: with its sh and cat children); RabbitMQ CPU: "
            "the broker's, read around each opsrelay event (10 ms ticks, so a sum over many events; other "
            "users of the broker would add to it).",
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs "
            "(anything above ~2 means other work shared the machine).",
        ],
    )
