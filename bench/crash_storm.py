"""Crash storm: does every unexpected exit reach the queue? opsrelay against crashmail + msmtp.

A real supervisord runs four programs ``command=/bin/false`` with ``startsecs=0`` and
``autorestart=true`` (issue 4): each restarts the moment it exits, so supervisord
emits STARTING, RUNNING and EXITED events as fast as it can fork. While a listener is
busy, later events wait in supervisord's per-pool buffer (``buffer_size``) and the
oldest are thrown away once it is full ("event buffer overflowed").

Rows, one supervisord each, run one after the other:

* ``opsrelay listen`` on the embedded queue, registered as ``supervisord.conf.example``
  registers it (:data:`LISTENERS` processes, ``buffer_size`` :data:`BUFFER_SIZE`,
  ``events=PROCESS_STATE,TICK_5``). The queue of a ``crashes`` subscription (EXITED,
  ``unexpected_only``) is declared first, as ``opsrelay serve`` would; no relay runs,
  so what reached the queue stays there to be counted;
* one listener process with ``buffer_size=4096`` (:data:`SINGLE_BUFFER`, what the example
  set before), for a shorter storm: what one process keeps up with, and what that buffer does;
* superlance's ``crashmail -a`` as its documentation registers it
  (``events=PROCESS_STATE_EXITED``, the default ``buffer_size``) with ``msmtp``
  delivering every mail over STARTTLS + AUTH to ``tests.smtp_server.SmtpServer``;
* no listener at all, for a shorter storm: how fast supervisord alone restarts them.

A second table (issue 6) asks whether the log tails cost events: the listener fetches
exit status and log tail from supervisord's XML-RPC while supervisord waits for its
answer. The programs print a three-line traceback to stderr before they exit
(:data:`STDERR_CRASH`), and the example's pool runs the storm twice: without the
enrichment (the listener's ``SUPERVISOR_ENABLED`` emptied through ``environment=``,
so ``make_enricher`` gives none) and with it (``listener.log_tail_bytes = 4096``).

Every unexpected exit is identified by program and pid: supervisord logs
``spawned: 'storm_1' with pid N`` then ``exited: storm_1 (exit status 1; not expected)``.
An exit counts as delivered when an event (opsrelay: a row of the subscription queue)
or a mail (crashmail: "(pid N)" in its body) names that program and pid.

The :class:`Supervisord` runner and :func:`exits` also serve ``bench.embedded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

if TYPE_CHECKING:
    from relay.engines.base import Delivery

from bench.common import REPO, child_env, print_table, process_cpu, tail

__all__ = [
    "BUFFER_SIZE",
    "LISTENERS",
    "Exit",
    "Supervisord",
    "bench_dir",
    "exits",
    "listener_names",
    "listener_section",
    "overflows",
    "queue_events",
    "run",
]

BIN = REPO / ".venv" / "bin"
PROGRAMS = ("storm_1", "storm_2", "storm_3", "storm_4")
# What supervisord.conf.example sets for [eventlistener:opsrelay]; see its comment.
LISTENERS = 4
BUFFER_SIZE = 65536
MAILTO = "oncall@example.test"
T = TypeVar("T")

# supervisor/loggers.py: "%(asctime)s,%(msecs)03d %(levelname)s %(message)s", local time.
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ (.*)$")
_SPAWNED = re.compile(r"spawned: '([^']+)' with pid (\d+)$")
_EXITED = re.compile(r"exited: (\S+) \((.*)\)$")
_OVERFLOW = "event buffer overflowed"


def bench_dir() -> str | None:
    """Where queue files and supervisord's run go: $OPSRELAY_BENCH_DIR, else the system's temporary directory.

    The figures are those of that directory's file system (an fsync on tmpfs costs nothing).
    """
    return os.environ.get("OPSRELAY_BENCH_DIR") or None


# -- supervisord's log ----------------------------------------------------------------------

@dataclass(frozen=True)
class Exit:
    """One unexpected exit: supervisord's log time (unix seconds, ms resolution), program, pid."""

    at: float
    program: str
    pid: int


def exits(log: str, programs: Iterable[str]) -> list[Exit]:
    """The unexpected exits of ``programs`` in supervisord's log, each with the pid of its spawn."""
    wanted = set(programs)
    running: dict[str, int] = {}
    found = []
    for line in log.splitlines():
        parsed = _LINE.match(line)
        if not parsed:
            continue
        stamp, millis, message = parsed.groups()
        if spawned := _SPAWNED.match(message):
            running[spawned[1]] = int(spawned[2])
        elif (exited := _EXITED.match(message)) and exited[1] in wanted and "not expected" in exited[2]:
            at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp() + int(millis) / 1000
            found.append(Exit(at, exited[1], running.pop(exited[1])))
    return found


def overflows(log: str) -> int:
    return sum(_OVERFLOW in line for line in log.splitlines())


# -- a real supervisord -----------------------------------------------------------------------

def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if fields[0] != "Z" else None


def _descendants(root: int) -> dict[int, str]:
    """Live processes below ``root`` with their start times (a reused pid is then told apart)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if (start := _start_time(pid)) is not None:
            found[pid] = start
        todo.extend(children.get(pid, []))
    return found


class Supervisord:
    """``supervisord -n`` in ``root`` with the given sections; :meth:`stop` ends it and everything below it."""

    def __init__(self, root: Path, sections: str) -> None:
        self.root = root
        self.conf = root / "supervisord.conf"
        self.log_path = root / "supervisord.log"
        sock = root / "supervisor.sock"
        self.conf.write_text(
            f"[unix_http_server]\nfile={sock}\nchmod=0700\n\n"
            # logfile_maxbytes=0: no rotation, the whole storm stays in one file to count.
            f"[supervisord]\nlogfile={self.log_path}\nlogfile_maxbytes=0\npidfile={root / 'supervisord.pid'}\n"
            f"childlogdir={root}\nnodaemon=true\nsilent=true\nloglevel=info\nidentifier=bench\n\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{sock}\n\n{sections}",
            encoding="utf-8",
        )
        # supervisord reads its config in the locale's encoding; its children inherit this.
        self.env = child_env(PYTHONUTF8="1", LC_ALL="C.UTF-8")
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, str] = {}

    def start(self) -> None:
        with (self.root / "supervisord.out").open("wb") as out:
            self.proc = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(self.conf)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.root, start_new_session=True)
        self.wait_for(lambda: self.ctl("pid").stdout.strip().isdigit(), 15, what="supervisord to answer")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(self.conf), *args], capture_output=True,
                              text=True, env=self.env, timeout=30, check=False)

    def states(self) -> dict[str, str]:
        lines = (line.split() for line in self.ctl("status").stdout.splitlines())
        return {words[0]: words[1] for words in lines if len(words) >= 2}

    def stop_programs(self, names: Sequence[str], timeout: float = 30.0) -> None:
        """Stop crash-looping programs: ``stop`` fails on one caught between exit and restart, so repeat."""
        def stopped() -> bool:
            self.ctl("stop", *names)
            return all(self.states().get(n) == "STOPPED" for n in names)

        self.wait_for(stopped, timeout, interval=0.0, what=f"{', '.join(names)} to stop")

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, predicate: Callable[[], T], timeout: float, *, interval: float = 0.1,
                 what: str = "the condition") -> T:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None:
                self._known.update(_descendants(self.proc.pid))
                if self.proc.poll() is not None:
                    raise RuntimeError(f"supervisord exited ({self.proc.returncode}) while waiting for {what}:\n"
                                       f"{tail(self.root / 'supervisord.out')}\n{tail(self.log_path)}")
            if value := predicate():
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:g}s for {what}; supervisord's log:\n{tail(self.log_path)}")
            time.sleep(interval)

    def stop(self) -> None:
        """SIGTERM (supervisord stops every program, then exits); SIGKILL what is left, by pid."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self._known.update(_descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid, start in self._known.items():
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Supervisord:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def listener_section(config: Path, logdir: Path, listeners: int = LISTENERS, buffer_size: int = BUFFER_SIZE,
                     *, enrich: bool = True) -> str:
    """``[eventlistener:opsrelay]`` as supervisord.conf.example registers it (numprocs, buffer_size).

    ``enrich=False``: without the XML-RPC enrichment (``make_enricher`` gives none outside supervisord).
    """
    environment = "" if enrich else 'environment=SUPERVISOR_ENABLED=""\n'
    return (f"[eventlistener:opsrelay]\ncommand={BIN / 'opsrelay'} listen --config {config}\n"
            "process_name=%(program_name)s_%(process_num)02d\n"
            f"numprocs={listeners}\nevents=PROCESS_STATE,TICK_5\nbuffer_size={buffer_size}\nautorestart=true\n"
            f"{environment}stderr_logfile={logdir / 'listener-%(process_num)02d.log'}\n\n")


def listener_names(listeners: int = LISTENERS) -> list[str]:
    """How ``supervisorctl status`` names the listener processes."""
    return [f"opsrelay:opsrelay_{i:02d}" for i in range(listeners)]


# Three lines on stderr, then exit 1: what a crashing Python job leaves for the log tail.
STDERR_CRASH = ("/bin/sh -c 'echo \"Traceback (most recent call last):\" >&2; "
                "echo \"  File job.py, line 7, in run\" >&2; echo \"RuntimeError: storm\" >&2; exit 1'")


def _storm_programs(command: str = "/bin/false") -> str:
    # autostart=false: the storm starts once every listener is up, and its start is known.
    return "".join(f"[program:{name}]\ncommand={command}\nstartsecs=0\nautorestart=true\nautostart=false\n\n"
                   for name in PROGRAMS)


# -- the rows ---------------------------------------------------------------------------------

@dataclass
class StormRow:
    name: str
    exits: list[Exit]
    delivered: Counter[tuple[str, int]]  # (program, pid) -> events or mails naming it
    overflowed: int
    troubles: int  # listener FAIL answers and listener exits: there should be none
    drain_s: float  # from the stop of the storm until the last delivery
    events: int = 0  # opsrelay: every event that reached the queue (all states)
    events_per_s: float = 0.0  # opsrelay: the storm's events per second into the queue, by their ``at``
    listening: bool = True  # False: the reference row without any listener
    listener_cpu_s: float = 0.0  # CPU of the listener processes (crashmail: with its msmtp children)
    supervisord_cpu_s: float = 0.0  # supervisord's own CPU over the storm and the drain
    busy_s: float = 0.0  # wall time of the storm and the drain
    # opsrelay: of the delivered unexpected exits, how many carry each enrichment, and the notes given instead
    with_status: int = 0
    with_tail: int = 0
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def seconds(self) -> float:
        """From the first unexpected exit to the last, by supervisord's log."""
        return self.exits[-1].at - self.exits[0].at if len(self.exits) > 1 else 0.0

    @property
    def exits_per_s(self) -> float:
        return (len(self.exits) - 1) / self.seconds if self.seconds else 0.0

    @property
    def handled(self) -> int:
        """What the listener did work for: events stored (opsrelay) or mails sent (crashmail)."""
        return self.events if self.events else sum(self.delivered.values())

    @property
    def lost(self) -> int:
        wanted = Counter((e.program, e.pid) for e in self.exits)
        return sum((wanted - self.delivered).values())

    @property
    def extra(self) -> int:
        """Deliveries without an exit in the log (there should be none)."""
        wanted = Counter((e.program, e.pid) for e in self.exits)
        return sum((self.delivered - wanted).values())


def _storm(sv: Supervisord, seconds: float) -> float:
    """Run the storm for ``seconds``; returns when its programs were all stopped (monotonic)."""
    began = time.monotonic()
    sv.ctl("start", *PROGRAMS)
    time.sleep(max(0.0, seconds - (time.monotonic() - began)))
    sv.stop_programs(PROGRAMS)
    return time.monotonic()


class _Cpu:
    """CPU seconds of supervisord and of its listener processes from construction until :meth:`stop`."""

    def __init__(self, sv: Supervisord, listeners: Sequence[str], *, children: bool) -> None:
        assert sv.proc is not None
        self.sv, self.children = sv.proc.pid, children
        self.listeners = [int(sv.ctl("pid", name).stdout.strip()) for name in listeners]
        self.began, self.busy = time.monotonic(), 0.0
        self.supervisord = -process_cpu(self.sv)
        self.listener = -sum(process_cpu(pid, children=children) for pid in self.listeners)

    def stop(self) -> None:
        self.busy = time.monotonic() - self.began
        self.supervisord += process_cpu(self.sv)
        # A listener that died is in "troubles"; its CPU is lost with it.
        for pid in self.listeners:
            with contextlib.suppress(OSError):
                self.listener += process_cpu(pid, children=self.children)


def _listener_exits(log: str, names: Iterable[str]) -> int:
    """Exits of listener processes (a crash, or supervisord's UNKNOWN state) in supervisord's log."""
    prefixes = tuple(f"exited: {name} " for name in names)
    return sum(any(p in line for p in prefixes) for line in log.splitlines())


def _settle(count: Callable[[], int], *, quiet: float, limit: float) -> float:
    """Wait until ``count()`` stops growing for ``quiet`` seconds; returns when it last grew (monotonic)."""
    last, grew, began = count(), time.monotonic(), time.monotonic()
    while time.monotonic() - grew < quiet and time.monotonic() - began < limit:
        time.sleep(0.25)
        if (now := count()) != last:
            last, grew = now, time.monotonic()
    return grew


def queue_events(url: str, queues: Sequence[str]) -> list[object]:
    """Every event in ``queues`` of the embedded queue, decoded, read through the Engine interface.

    The rows are leased by a consumer that never acks them and are handed back when it
    closes: the queue is left as it was (marked redelivered).
    """
    from relay.contract.event import decode_event
    from relay.engines.sqlite import SqliteEngine

    async def read() -> list[object]:
        engine = SqliteEngine(url)
        await engine.connect()
        try:
            found: list[object] = []
            for queue in queues:
                want = await engine.depth(queue)
                # The engine's consume is an async generator: closing it hands the leases back.
                stream = cast("AsyncGenerator[Delivery, None]", engine.consume(queue, prefetch=0))
                try:
                    while want:
                        delivery = await anext(stream)
                        found.append(decode_event(delivery.message.body))
                        want -= 1
                finally:
                    await stream.aclose()
            return found
        finally:
            await engine.close()

    return asyncio.run(read())


def _depth(url: str, queues: Sequence[str]) -> int:
    from relay.engines.sqlite import SqliteEngine

    async def count() -> int:
        engine = SqliteEngine(url)
        await engine.connect()
        try:
            return sum([await engine.depth(q) for q in queues])
        finally:
            await engine.close()

    return asyncio.run(count())


def opsrelay_storm(work: Path, seconds: float, listeners: int, buffer_size: int, *, enrich: bool = True,
                   command: str = "/bin/false", label: str = "") -> StormRow:
    from relay.config.models import load_config
    from relay.contract.event import Event
    from relay.contract.names import subscription_queue, unrouted_queue
    from relay.contract.topology import event_topology
    from relay.daemon.relay import relay_topology
    from relay.engines.sqlite import SqliteEngine

    work.mkdir()
    url = f"sqlite:///{work / 'queue' / 'queue.db'}"
    prefix = "storm"
    config = work / "opsrelay.toml"
    config.write_text(f'host = "bench"\n\n[broker]\nurl = "{url}"\nprefix = "{prefix}"\n\n'
                      "[listener]\nlog_tail_bytes = 4096\n\n"
                      f'[[subscriptions]]\nname = "crashes"\nto = ["{MAILTO}"]\nstates = ["EXITED"]\n'
                      "unexpected_only = true\n", encoding="utf-8")

    async def declare() -> None:
        # What `opsrelay serve` declares at start: without the subscription's queue bound,
        # every event would go to <prefix>.unrouted.
        engine = SqliteEngine(url)
        await engine.connect()
        try:
            await engine.declare(relay_topology(load_config(config, env={})) + event_topology(prefix))
        finally:
            await engine.close()

    asyncio.run(declare())
    crashes, unrouted = subscription_queue(prefix, "crashes"), unrouted_queue(prefix)
    sections = listener_section(config, work, listeners, buffer_size, enrich=enrich) + _storm_programs(command)
    with Supervisord(work, sections) as sv:
        sv.wait_for(lambda: all(sv.states().get(n) == "RUNNING" for n in listener_names(listeners)), 15,
                    what="the listeners")
        cpu = _Cpu(sv, listener_names(listeners), children=False)
        stopped = _storm(sv, seconds)
        last = _settle(lambda: _depth(url, [crashes, unrouted]), quiet=2.0, limit=120.0)
        cpu.stop()
        log = sv.log()
    fails = sum(path.read_text(encoding="utf-8", errors="replace").count("answered FAIL")
                for path in work.glob("listener-*.log"))
    events = [e for e in queue_events(url, [crashes, unrouted]) if isinstance(e, Event)]
    crashed = [e for e in events if e.state == "EXITED" and e.expected is False and e.process in PROGRAMS]
    delivered = Counter((e.process, e.pid or 0) for e in crashed)
    # The storm's own events: the stop at its end (STOPPING, STOPPED) trickles in while supervisorctl works.
    stamps = sorted(datetime.strptime(e.at, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() for e in events
                    if e.process in PROGRAMS and e.state in ("STARTING", "RUNNING", "EXITED"))
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    label = label or f"opsrelay listen x{listeners}, buffer_size={buffer_size}"
    troubles = fails + _listener_exits(log, (n.partition(":")[2] for n in listener_names(listeners)))
    return StormRow(label, exits(log, PROGRAMS), delivered, overflows(log), troubles, max(0.0, last - stopped),
                    len(events), rate, listener_cpu_s=cpu.listener, supervisord_cpu_s=cpu.supervisord,
                    busy_s=cpu.busy, with_status=sum(e.exit_status == 1 for e in crashed),
                    with_tail=sum("RuntimeError: storm" in (e.log_tail or "") for e in crashed),
                    notes=Counter(note for e in crashed for note in e.notes))


def bare_storm(work: Path, seconds: float) -> StormRow:
    """No listener at all: how fast supervisord alone restarts the programs on this machine now."""
    work.mkdir()
    with Supervisord(work, _storm_programs()) as sv:
        cpu = _Cpu(sv, [], children=False)
        _storm(sv, seconds)
        cpu.stop()
        log = sv.log()
    return StormRow("no listener (supervisord alone)", exits(log, PROGRAMS), Counter(), overflows(log), 0, 0.0,
                    listening=False, supervisord_cpu_s=cpu.supervisord, busy_s=cpu.busy)


_CRASHMAIL_BODY = re.compile(rb"Process (\S+) in group \S+ exited unexpectedly \(pid (\d+)\)")


def crashmail_storm(work: Path, seconds: float) -> StormRow:
    from tests.smtp_server import ReceivedMail, SmtpServer

    # aiosmtpd 1.4 logs "Session.login_data is deprecated" on every AUTH it completes.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    work.mkdir()
    mails: list[bytes] = []
    lock = threading.Lock()

    def took(mail: ReceivedMail) -> None:
        if not (mail.tls and mail.auth_user):
            raise RuntimeError("msmtp delivered a mail without TLS or AUTH")
        with lock:
            mails.append(mail.content)

    def count() -> int:
        with lock:
            return len(mails)

    with SmtpServer(work / "smtp", on_receive=took) as server:
        msmtprc = work / "msmtprc"
        msmtprc.write_text(
            f"defaults\ntls on\ntls_starttls on\ntls_trust_file {server.ca_pem_path}\n\n"
            f"account bench\nhost {server.host}\nport {server.port}\nauth on\nuser {server.user}\n"
            f"password {server.password}\nfrom crashmail@example.test\n\naccount default : bench\n",
            encoding="utf-8")
        msmtprc.chmod(0o600)  # msmtp refuses a password file others can read
        # As superlance's documentation registers it: EXITED events only, default buffer_size (10).
        sections = (f"[eventlistener:crashmail]\ncommand={BIN / 'crashmail'} -a -m {MAILTO} "
                    f"-s \"msmtp -C {msmtprc} -t\"\nevents=PROCESS_STATE_EXITED\nautorestart=true\n"
                    f"stderr_logfile={work / 'crashmail.log'}\n\n{_storm_programs()}")
        with Supervisord(work, sections) as sv:
            sv.wait_for(lambda: sv.states().get("crashmail") == "RUNNING", 15, what="crashmail")
            # children: crashmail's popen'd sh and msmtp are waited for, so their CPU lands in its cutime.
            cpu = _Cpu(sv, ["crashmail"], children=True)
            stopped = _storm(sv, seconds)
            last = _settle(count, quiet=2.0, limit=60.0)
            cpu.stop()
            log = sv.log()
    delivered: Counter[tuple[str, int]] = Counter()
    for content in mails:
        if found := _CRASHMAIL_BODY.search(content):
            delivered[(found[1].decode(), int(found[2]))] += 1
    return StormRow("crashmail -a + msmtp (STARTTLS+AUTH)", exits(log, PROGRAMS), delivered, overflows(log),
                    _listener_exits(log, ["crashmail"]), max(0.0, last - stopped), listener_cpu_s=cpu.listener,
                    supervisord_cpu_s=cpu.supervisord, busy_s=cpu.busy)


def _cells(row: StormRow) -> list[str]:
    n = len(row.exits)
    if not row.listening:
        return [row.name, f"{row.seconds:.1f}", f"{n:,}", f"{row.exits_per_s:,.0f}", *[""] * 9,
                f"{row.supervisord_cpu_s / row.busy_s:.2f}"]
    return [row.name, f"{row.seconds:.1f}", f"{n:,}", f"{row.exits_per_s:,.0f}", f"{n - row.lost:,}",
            f"{row.lost:,}", f"{100 * row.lost / n:.1f}%" if n else "-", f"{row.overflowed:,}",
            f"{row.events:,}" if row.events else "", f"{row.events_per_s:,.0f}" if row.events else "",
            f"{row.drain_s:.1f}", f"{row.troubles}",
            f"{row.listener_cpu_s / row.handled * 1e3:.2f}" if row.handled else "",
            f"{row.supervisord_cpu_s / row.busy_s:.2f}"]


# The single-listener row: what supervisord.conf.example set before the pool (see README-embedded.md).
SINGLE_BUFFER = 4096


def run(seconds: float = 30.0, short_seconds: float = 10.0) -> None:
    """The pool and crashmail for ``seconds`` each; one listener and no listener for ``short_seconds`` (0: skip)."""
    short_seconds = min(short_seconds, seconds)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opsrelay-storm-", dir=bench_dir()) as tmp:
        work = Path(tmp)
        rows = [opsrelay_storm(work / "pool", seconds, LISTENERS, BUFFER_SIZE)]
        if short_seconds > 0:
            rows.append(opsrelay_storm(work / "single", short_seconds, 1, SINGLE_BUFFER))
        rows.append(crashmail_storm(work / "crashmail", seconds))
        if short_seconds > 0:
            rows.append(bare_storm(work / "bare", short_seconds))
    load_after = os.getloadavg()[0]
    extra = sum(r.extra for r in rows if r.listening)
    print_table(
        f"Crash storm: {len(PROGRAMS)} programs command=/bin/false, startsecs=0, autorestart=true",
        ["listener", "storm s", "unexpected exits", "exits/s", "delivered", "lost", "lost %", "overflowed lines",
         "events stored", "events/s", "drain s", "FAIL/exits", "listener CPU ms/event", "supervisord CPU s/s"],
        [_cells(r) for r in rows],
        notes=[
            "unexpected exits: 'exited: storm_N (exit status 1; not expected)' lines in supervisord's log; storm s "
            "and exits/s: from the first such line to the last. delivered: exits (program and pid) with an event "
            "in the subscription queue of the embedded queue (opsrelay; no relay ran) or a mail at the "
            "STARTTLS + AUTH server (crashmail).",
            "opsrelay: events=PROCESS_STATE,TICK_5, so it also stores every STARTING and RUNNING event (three "
            "events per crash): 'events stored' counts all of them; 'events/s' is the rate of the storm's STARTING, "
            "RUNNING and EXITED events into the queue (first to last `at`, the time a listener read each). With "
            "a drain of more than a second the listeners were behind all along, so it is what they sustain; "
            "with none, it is only the rate the storm made.",
            "crashmail: events=PROCESS_STATE_EXITED and the default buffer_size=10, as superlance documents it; "
            "each mail is one msmtp run (fork, STARTTLS, AUTH) to the local server.",
            "drain s: from the storm's programs all stopped until the last event or mail arrived (what "
            "supervisord still held in its buffer). FAIL/exits: listener FAIL answers and listener process exits.",
            "listener CPU ms/event: all listener processes' CPU over storm and drain, per event stored (opsrelay) "
            "or per mail sent (crashmail, with its sh and msmtp children). supervisord CPU s/s: supervisord's own "
            "CPU per second of storm and drain (1.00 = one core).",
            *([f"{extra} deliveries matched no exit in the log"] if extra else []),
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs.",
        ],
    )
    log_tails(seconds)


def _tail_cells(row: StormRow) -> list[str]:
    n = len(row.exits)
    return [row.name, f"{row.seconds:.1f}", f"{n:,}", f"{row.exits_per_s:,.0f}", f"{n - row.lost:,}",
            f"{row.lost:,}", f"{100 * row.lost / n:.1f}%" if n else "-", f"{row.overflowed:,}",
            f"{row.with_status:,}", f"{row.with_tail:,}", f"{sum(row.notes.values()):,}", f"{row.drain_s:.1f}",
            f"{row.troubles}", f"{row.listener_cpu_s / row.handled * 1e3:.2f}" if row.handled else "",
            f"{row.supervisord_cpu_s / row.busy_s:.2f}"]


def log_tails(seconds: float = 30.0) -> list[StormRow]:
    """The example's pool in a storm of programs that print to stderr: without, then with the log tails."""
    from listeners.enrich import MAIN_LOG_BYTES

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opsrelay-storm-tails-", dir=bench_dir()) as tmp:
        work = Path(tmp)
        rows = [opsrelay_storm(work / "plain", seconds, LISTENERS, BUFFER_SIZE, enrich=False, command=STDERR_CRASH,
                               label=f"opsrelay listen x{LISTENERS}, no enrichment"),
                opsrelay_storm(work / "tails", seconds, LISTENERS, BUFFER_SIZE, enrich=True, command=STDERR_CRASH,
                               label=f"opsrelay listen x{LISTENERS}, exit status + 4 KiB log tail")]
    load_after = os.getloadavg()[0]
    if rows[1].with_tail == 0:
        raise RuntimeError("the enriched storm fetched no log tail: does `opsrelay listen` pass "
                           "listeners.enrich.make_enricher(...) to run()?")
    if rows[0].with_tail or rows[0].with_status:
        raise RuntimeError("the storm without enrichment has enriched events: the switch did not work")
    notes = rows[1].notes.most_common(3)
    print_table(
        f"Crash storm with log tails: {len(PROGRAMS)} programs print 3 lines to stderr, exit 1; startsecs=0, "
        "autorestart=true",
        ["listener", "storm s", "unexpected exits", "exits/s", "delivered", "lost", "lost %", "overflowed lines",
         "with exit status", "with log tail", "notes", "drain s", "FAIL/exits", "listener CPU ms/event",
         "supervisord CPU s/s"],
        [_tail_cells(r) for r in rows],
        notes=[
            f"buffer_size={BUFFER_SIZE}, events=PROCESS_STATE,TICK_5, embedded queue, as the first table. The "
            "enrichment runs while supervisord waits for the listener's answer: one XML-RPC system.multicall per "
            "EXITED/FATAL/BACKOFF event over supervisord's unix socket (getProcessInfo, the 4 KiB stderr and stdout "
            f"tails, the last {MAIN_LOG_BYTES // 1024} KiB of supervisord's own log), bounded by "
            "listener.fetch_timeout (1 s).",
            "with exit status: delivered unexpected exits whose event says exit_status 1 (supervisord had already "
            "respawned the program, so it came from supervisord's log, matched by pid); with log tail: whose "
            "log_tail holds the traceback's last line; notes: events saying what is missing instead.",
            *(f"note x{count:,}: {note}" for note, count in notes),
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs.",
        ],
    )
    return rows
