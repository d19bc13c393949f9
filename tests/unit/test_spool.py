"""listeners.spool: store-and-forward over a real SQLite spool, with a broker twin that fails on command.

The twin (:class:`FakeBroker`) confirms, refuses at once, hangs without a confirm,
or holds a confirm until the test lets it go, and records which thread sent what.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from listeners.eventlistener import run
from listeners.factory import make_publisher
from listeners.publish import EnginePublisher
from listeners.spool import Spool, SpoolingPublisher
from relay.config.models import BrokerConfig, Config
from relay.contract.event import Event, decode_event
from relay.contract.keys import event_key
from relay.contract.message import Message
from relay.contract.names import spool_name
from relay.errors import BrokerUnavailable, RelayError
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
PREFIX = "opsrelay"
CONFIRM = 0.5
WAIT = 5.0  # seconds a test waits for the forwarder


class FakeBroker:
    """The upstream twin: ``up`` or not; ``hang`` makes a refusal wait (no confirm); ``gate`` holds confirms."""

    def __init__(self, *, up: bool = True, hang: float = 0.0) -> None:
        self.up = up
        self.hang = hang
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a send starts waiting at the gate
        self.received: list[tuple[str, Message]] = []
        self.calls: list[tuple[str, str, bool]] = []  # (thread, message_id, confirmed)
        self.closed = False
        self._lock = threading.Lock()

    def send(self, routing_key: str, message: Message, *, timeout: float) -> None:
        thread = threading.current_thread().name
        confirmed = False
        try:
            if not self.up:
                time.sleep(min(self.hang, timeout))  # a broker that never confirms: the try costs this long
                raise BrokerUnavailable("fake broker: connection refused")
            self.entered.set()
            if not self.gate.wait(timeout):
                raise BrokerUnavailable(f"fake broker: no confirm within {timeout}s")
            with self._lock:
                self.received.append((routing_key, message))
            confirmed = True
        finally:
            with self._lock:
                self.calls.append((thread, message.message_id, confirmed))

    def close(self) -> None:
        self.closed = True

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [m.message_id for _, m in self.received]

    def calls_from(self, thread: str) -> list[tuple[str, str, bool]]:
        with self._lock:
            return [c for c in self.calls if c[0] == thread]


def new_event(i: int, *, tail: str | None = None) -> Event:
    return Event(host="web1", group="workers", process=f"w.{i}", event="PROCESS_STATE_EXITED",
                 state="EXITED", from_state="RUNNING", expected=False, pid=1000 + i, log_tail=tail)


def rows(path: Path) -> int:
    """Rows in the spool file, leased ones included (what a crash would leave)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (spool_name(PREFIX),)).fetchone()[0])


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "spool.db"


@pytest.fixture
def make(spool_path: Path) -> Iterator[Callable[..., SpoolingPublisher]]:
    made: list[SpoolingPublisher] = []

    def factory(broker: FakeBroker, *, confirm: float = CONFIRM, first: float = 0.02,
                cap: float = 0.1) -> SpoolingPublisher:
        publisher = SpoolingPublisher(broker, Spool(f"sqlite:///{spool_path}", PREFIX), confirm_timeout=confirm,
                                      first_backoff=first, max_backoff=cap)
        made.append(publisher)
        return publisher

    yield factory
    for publisher in reversed(made):
        publisher.close()


def assert_forwarded_intact(broker: FakeBroker, events: list[Event]) -> None:
    assert broker.ids == [e.id for e in events]
    for (key, message), event in zip(broker.received, events, strict=True):
        assert key == event_key(event.host, event.group, event.process, event.state)
        assert decode_event(message.body) == event
        assert message.content_type == "application/json"


def test_healthy_broker_gets_events_directly_and_the_spool_file_is_0600(
        make: Callable[..., SpoolingPublisher], spool_path: Path) -> None:
    broker = FakeBroker()
    publisher = make(broker)
    events = [new_event(i) for i in range(3)]
    for event in events:
        publisher.publish(event)
    assert_forwarded_intact(broker, events)
    assert {thread for thread, _, _ in broker.calls} == {threading.current_thread().name}
    assert rows(spool_path) == 0 and publisher.pending == 0
    assert os.stat(spool_path).st_mode & 0o777 == 0o600


def test_order_is_kept_across_an_outage(make: Callable[..., SpoolingPublisher], spool_path: Path) -> None:
    broker = FakeBroker()
    publisher = make(broker)
    events = [new_event(i) for i in range(10)]
    for event in events[:2]:
        publisher.publish(event)
    broker.up = False
    for event in events[2:7]:
        publisher.publish(event)  # returns: the event is in the spool
    assert broker.ids == [e.id for e in events[:2]]
    assert rows(spool_path) == 5 and publisher.pending == 5
    broker.up = True
    for event in events[7:]:
        publisher.publish(event)
    wait_for(lambda: publisher.pending == 0, WAIT, what="the spool to drain")
    assert_forwarded_intact(broker, events)
    assert rows(spool_path) == 0


def test_new_events_go_behind_spooled_ones_while_the_head_is_in_flight(
        make: Callable[..., SpoolingPublisher], spool_path: Path) -> None:
    broker = FakeBroker(up=False)
    publisher = make(broker, confirm=3.0)
    events = [new_event(i) for i in range(6)]
    for event in events[:3]:
        publisher.publish(event)
    main = threading.current_thread().name
    assert len(broker.calls_from(main)) == 1  # the first event tried the broker, the next two did not
    broker.gate.clear()
    broker.up = True
    # The forwarder leased the oldest row and waits for its confirm: the spool looks empty to a
    # depth count (a leased row is not ready), yet new events must not overtake it.
    assert broker.entered.wait(5.0)
    for event in events[3:]:
        started = time.monotonic()
        publisher.publish(event)
        assert time.monotonic() - started < 0.5
    assert len(broker.calls_from(main)) == 1
    assert rows(spool_path) == 6
    broker.gate.set()
    wait_for(lambda: publisher.pending == 0, WAIT, what="the spool to drain")
    assert_forwarded_intact(broker, events)


def test_a_row_leaves_the_spool_only_after_the_confirm(
        make: Callable[..., SpoolingPublisher], spool_path: Path) -> None:
    broker = FakeBroker(up=False)
    publisher = make(broker, confirm=0.3)
    events = [new_event(i) for i in range(3)]
    for event in events:
        publisher.publish(event)
    broker.gate.clear()
    broker.up = True
    assert broker.entered.wait(5.0)
    assert rows(spool_path) == 3  # leased for forwarding, still on disk
    # The confirm never comes: the forwarder gives up on this try and keeps the row.
    wait_for(lambda: any(not ok for thread, _, ok in broker.calls if thread == "opsrelay-forwarder"), WAIT,
             what="a forward without a confirm")
    assert rows(spool_path) == 3 and publisher.pending == 3 and broker.received == []
    broker.gate.set()
    wait_for(lambda: publisher.pending == 0, WAIT, what="the spool to drain")
    assert rows(spool_path) == 0
    assert_forwarded_intact(broker, events)


def test_spooled_events_are_forwarded_by_the_next_listener(
        make: Callable[..., SpoolingPublisher], spool_path: Path) -> None:
    down = FakeBroker(up=False)
    first = make(down, first=60.0)
    events = [new_event(i) for i in range(5)]
    for event in events[:4]:
        first.publish(event)
    first.close()
    assert down.closed and rows(spool_path) == 4

    broker = FakeBroker()
    second = make(broker)  # forwards the earlier rows without waiting for an event
    wait_for(lambda: second.pending == 0, WAIT, what="the earlier spool to drain")
    second.publish(events[4])
    assert_forwarded_intact(broker, events)
    assert rows(spool_path) == 0


CHILD = textwrap.dedent("""
    import sys, time
    from listeners.spool import Spool, SpoolingPublisher
    from relay.errors import BrokerUnavailable
    from relay.contract.event import Event

    class StuckBroker:  # refuses until up, then never confirms
        up = False
        def send(self, key, message, *, timeout):
            if not self.up:
                raise BrokerUnavailable("down")
            print("in flight", flush=True)
            time.sleep(3600)  # leased, never confirmed: killed here
        def close(self):
            pass

    broker = StuckBroker()
    publisher = SpoolingPublisher(broker, Spool(sys.argv[1], "opsrelay"), confirm_timeout=3600,
                                  first_backoff=0.01, max_backoff=0.01)
    for i in range(3):
        event = Event(host="web1", group="g", process=f"p{i}", event="PROCESS_STATE_EXITED", state="EXITED")
        publisher.publish(event)
        print(event.id, flush=True)
    broker.up = True
    time.sleep(3600)  # the forwarder thread runs meanwhile, until the test kills this process
""")


def test_a_listener_killed_mid_forward_loses_nothing(make: Callable[..., SpoolingPublisher],
                                                     spool_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"sqlite:///{spool_path}"], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline().strip() for _ in range(4)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        if child.stdout is not None:
            child.stdout.close()
    ids, marker = lines[:3], lines[3]
    assert marker == "in flight", lines
    assert rows(spool_path) == 3  # the leased row included

    broker = FakeBroker()
    publisher = make(broker)
    wait_for(lambda: publisher.pending == 0, WAIT, what="the dead listener's spool to drain")
    assert broker.ids == ids
    assert rows(spool_path) == 0


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A disk that is full for files past ``limit`` bytes (RLIMIT_FSIZE, EFBIG instead of SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def envelope(payload: str, serial: int) -> str:
    return (f"ver:3.0 server:supervisor serial:{serial} pool:opsrelay poolserial:{serial} "
            f"eventname:PROCESS_STATE_EXITED len:{len(payload)}\n{payload}")


def test_when_the_spool_cannot_be_written_either_the_answer_is_fail(
        make: Callable[..., SpoolingPublisher], spool_path: Path) -> None:
    broker = FakeBroker(up=False)
    publisher = make(broker, first=60.0)  # the broker stays "known down": no probe meddles
    wal = Path(f"{spool_path}-wal")

    class DiskFullOnce:
        """The second publish runs on a full disk (the WAL cannot grow); the resend does not."""

        calls = 0

        def publish(self, event: Event) -> None:
            self.calls += 1
            if self.calls != 2:
                publisher.publish(event)
                return
            with file_size_limit(wal.stat().st_size):
                publisher.publish(event)

    payloads = [f"processname:p{i} groupname:g from_state:RUNNING expected:0 pid:{i + 1}" for i in range(2)]
    # supervisord re-buffers a FAILed event and sends it again (the same payload, the same serial).
    stream = envelope(payloads[0], 1) + envelope(payloads[1], 2) + envelope(payloads[1], 2)
    stdout = io.StringIO()
    assert run(io.StringIO(stream), stdout, DiskFullOnce(), host="web1", sleep=lambda _: None) == 0
    assert stdout.getvalue() == "READY\nRESULT 2\nOKREADY\nRESULT 4\nFAILREADY\nRESULT 2\nOKREADY\n"
    assert rows(spool_path) == 2
    publisher.close()

    up = FakeBroker()
    after = make(up)
    wait_for(lambda: after.pending == 0, WAIT, what="the spool to drain")
    assert [decode_event(m.body).process for _, m in up.received] == ["p0", "p1"]


def test_a_broken_spool_with_a_healthy_broker_still_publishes(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool's directory should be")
    broker = FakeBroker()
    publisher = SpoolingPublisher(broker, Spool(f"sqlite:///{blocker}/spool.db", PREFIX),
                                  confirm_timeout=CONFIRM)
    try:
        events = [new_event(i) for i in range(2)]
        for event in events:
            publisher.publish(event)
        assert_forwarded_intact(broker, events)
        broker.up = False
        with pytest.raises(RelayError, match="not stored"):
            publisher.publish(new_event(9))
    finally:
        publisher.close()


def test_a_known_down_broker_is_not_waited_for_again(make: Callable[..., SpoolingPublisher]) -> None:
    broker = FakeBroker(up=False, hang=10.0)  # never confirms: each try costs the whole confirm_timeout
    publisher = make(broker, confirm=1.0, first=0.5, cap=2.0)
    started = time.monotonic()
    publisher.publish(new_event(0))
    first = time.monotonic() - started
    assert 0.9 <= first < 1.5
    durations = []
    for i in range(1, 21):
        started = time.monotonic()
        publisher.publish(new_event(i))
        durations.append(time.monotonic() - started)
    assert max(durations) < 0.25, durations  # a spool commit, not the 1 s confirm bound
    assert len(broker.calls_from(threading.current_thread().name)) == 1
    assert publisher.pending == 21


def test_tick_events_reach_the_publisher_and_are_answered_at_once(
        make: Callable[..., SpoolingPublisher]) -> None:
    broker = FakeBroker(up=False, hang=10.0)
    publisher = make(broker, confirm=1.0)
    publisher.publish(new_event(0))  # now known down; the forwarder probes in the background
    ticks = 0
    real_tick = publisher.tick

    def counting_tick() -> None:
        nonlocal ticks
        ticks += 1
        real_tick()

    publisher.tick = counting_tick  # type: ignore[method-assign]
    payload = "when:1700000000"
    stream = "".join(
        f"ver:3.0 server:supervisor serial:{i} pool:opsrelay poolserial:{i} eventname:TICK_5 "
        f"len:{len(payload)}\n{payload}" for i in range(3)
    )
    stdout = io.StringIO()
    started = time.monotonic()
    assert run(io.StringIO(stream), stdout, publisher, host="web1") == 0
    assert time.monotonic() - started < 0.5
    assert ticks == 3
    assert stdout.getvalue().count("RESULT 2\nOK") == 3


def test_a_dead_forwarder_ends_the_listener(make: Callable[..., SpoolingPublisher]) -> None:
    class Buggy(FakeBroker):
        def send(self, routing_key: str, message: Message, *, timeout: float) -> None:
            if threading.current_thread().name == "opsrelay-forwarder":
                raise KeyError("a bug")
            super().send(routing_key, message, timeout=timeout)

    broker = Buggy(up=False)
    publisher = make(broker)
    publisher.publish(new_event(0))
    broker.up = True
    wait_for(lambda: publisher._crashed is not None, WAIT, what="the forwarder to die")
    with pytest.raises(RuntimeError, match="forwarder"):
        publisher.publish(new_event(1))
    with pytest.raises(RuntimeError, match="forwarder"):
        publisher.tick()


def test_make_publisher_spools_only_for_amqp(tmp_path: Path) -> None:
    plain = make_publisher(Config(broker=BrokerConfig(url=f"sqlite:///{tmp_path}/queue.db")))
    try:
        assert type(plain) is EnginePublisher
    finally:
        plain.close()
    assert not (tmp_path / "spool.db").exists()

    # Nothing listens on port 1: the real AMQP engine is refused, the event goes to the spool.
    broker = BrokerConfig(url="amqp://guest:guest@127.0.0.1:1/", spool=f"sqlite:///{tmp_path}/spool.db",
                          confirm_timeout=1.0)
    spooling = make_publisher(Config(broker=broker))
    try:
        assert isinstance(spooling, SpoolingPublisher)
        started = time.monotonic()
        spooling.publish(new_event(0))
        assert time.monotonic() - started < 1.5
        assert spooling.pending == 1
    finally:
        spooling.close()
    assert rows(tmp_path / "spool.db") == 1
    assert os.stat(tmp_path / "spool.db").st_mode & 0o777 == 0o600
