"""Store-and-forward against a real RabbitMQ that goes away (``rabbitmqctl stop_app``) and comes back.

(a) The listener's publisher: events published while the broker is stopped return
promptly (spooled), and once it is back every one reaches a queue bound to the
events exchange, in order.
(b) A real supervisord with crash-looping programs while the broker is stopped:
supervisord's event buffer never overflows, and after the broker is back every
EXITED event supervisord logged reaches the broker, once and in order.

RabbitMQ is always started again (``start_app`` + ``await_startup``), even when a
test fails.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from listeners.factory import make_publisher
from listeners.spool import SpoolingPublisher
from relay.config.models import BrokerConfig, Config
from relay.contract.event import Event, decode_event
from relay.contract.names import events_exchange
from relay.contract.topology import BindingSpec, QueueSpec, Topology, event_topology
from relay.engines.amqp import AmqpEngine
from tests.brokers import RabbitControl, delete_topology
from tests.e2e.harness import Program, Supervisor
from tests.smtp_server import SmtpServer
from tests.waiting import wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(90)]

CONFIRM = 2.0


def probe_topology(prefix: str) -> Topology:
    """The events exchange plus our own queue bound with ``proc.#``, as anyone may bind one."""
    probe = f"{prefix}.probe"
    return event_topology(prefix) + Topology(
        queues=(QueueSpec(probe),), bindings=(BindingSpec(probe, events_exchange(prefix), "proc.#"),))


def declare(url: str, prefix: str) -> None:
    async def go() -> None:
        async with AmqpEngine(url) as engine:
            await engine.declare(probe_topology(prefix))

    asyncio.run(go())


def probe_events(url: str, prefix: str) -> list[Event]:
    """Everything in the probe queue, in queue order (consumed)."""
    async def go() -> list[Event]:
        events = []
        async with AmqpEngine(url) as engine:
            while (delivery := await engine.get(f"{prefix}.probe")) is not None:
                events.append(decode_event(delivery.message.body))
                await delivery.ack()
        return events

    return asyncio.run(go())


def delete(url: str, prefix: str) -> None:
    asyncio.run(delete_topology(url, probe_topology(prefix)))


def new_event(i: int) -> Event:
    return Event(host="saf", group="workers", process=f"w{i}", event="PROCESS_STATE_EXITED", state="EXITED",
                 from_state="RUNNING", expected=False, pid=100 + i)


def test_events_published_while_the_broker_is_stopped_arrive_in_order(
        tmp_path: Path, amqp_url: str, prefix: str, rabbit: RabbitControl) -> None:
    declare(amqp_url, prefix)
    broker = BrokerConfig(url=amqp_url, prefix=prefix, spool=f"sqlite:///{tmp_path}/spool.db",
                          confirm_timeout=CONFIRM)
    publisher = make_publisher(Config(host="saf", broker=broker))
    assert isinstance(publisher, SpoolingPublisher)
    try:
        events = [new_event(i) for i in range(51)]
        publisher.publish(events[0])  # the broker is up: straight through
        assert publisher.pending == 0
        rabbit.stop()
        took = []
        for event in events[1:]:
            started = time.monotonic()
            publisher.publish(event)
            took.append(time.monotonic() - started)
        # The first may wait for the confirm bound; once the outage is known, only the spool's fsync.
        assert max(took) < CONFIRM + 1.0, took
        assert sorted(took)[-2] < 0.5, took
        assert publisher.pending == 50
        rabbit.start()

        def drained() -> bool:
            publisher.tick()  # as supervisord's TICK_5 would
            return publisher.pending == 0

        wait_for(drained, 30, interval=0.2, what="the spool to drain")
        received = probe_events(amqp_url, prefix)
        assert [e.id for e in received] == [e.id for e in events]
        assert received == events
    finally:
        rabbit.start()
        publisher.close()
        delete(amqp_url, prefix)


# Each program lives 50 ms, exits 1 and is restarted at once (startsecs=0: every exit is EXITED, never
# BACKOFF): five of them make 60-70 exits a second here, about 2000 events in 10 s, twice the harness's
# buffer_size=1024, so a listener that stopped taking events during the outage would overflow it.
# Not a bare /bin/false: supervisord restarts an exited program on its next loop pass, and a busy
# listener's pipe wakes that loop, so a zero-lifetime crash loop speeds up with the listener's own
# traffic; it overflowed the buffer within seconds even with the broker up and every event confirmed.
CRASH_LOOP = 'sh -c "sleep 0.05; exit 1"'
CRASHERS = tuple(f"crash_{i}" for i in range(5))
BUFFER_SIZE = 1024  # tests/e2e/harness.py
LOG_LINE = re.compile(r"spawned: '(crash_[0-9])' with pid ([0-9]+)"
                      r"|exited: (crash_[0-9]) \(exit status 1; not expected\)")


def logged_exits(log: str) -> list[tuple[str, int]]:
    """(program, pid) of every EXITED supervisord logged, in its order (the pid is the last one spawned)."""
    last_pid: dict[str, int] = {}
    exits = []
    for spawned, pid, exited in LOG_LINE.findall(log):
        if spawned:
            last_pid[spawned] = int(pid)
        else:
            exits.append((exited, last_pid[exited]))
    return exits


def stop_all(sv: Supervisor, names: tuple[str, ...]) -> None:
    """Stop the programs for good: ``stop`` fails (NOT_RUNNING) on a program caught between its exit
    and its restart, and autorestart then starts it again."""
    def stopped() -> bool:
        states = sv.status()  # empty while supervisord does not answer
        running = [name for name in names if states.get(name) != "STOPPED"]
        if running:
            sv.ctl("stop", *running)
        return not running

    sv.wait_for(stopped, 30, interval=0.1, what="the crash loops to stop")


@pytest.mark.supervisord
def test_a_crash_loop_during_an_outage_loses_no_event(
        tmp_path: Path, amqp_url: str, prefix: str, rabbit: RabbitControl, smtp_server: SmtpServer) -> None:
    crash = {"startsecs": 0, "autorestart": True, "startretries": 0}
    sv = Supervisor(tmp_path / "sv", broker_url=amqp_url, prefix=prefix, smtp=smtp_server.client_settings(),
                    subscriptions=[], host="saf",
                    programs=[Program(name, CRASH_LOOP, crash) for name in CRASHERS])
    # The harness keeps OPSRELAY_* out of supervisord's environment; the spool goes in the test's directory.
    sv.env["OPSRELAY_BROKER__SPOOL"] = f"sqlite:///{tmp_path}/spool.db"
    try:
        sv.start()
        declare(amqp_url, prefix)
        rabbit.stop()
        sv.ctl("start", *CRASHERS, check=True)
        time.sleep(10)  # the outage: the programs crash-loop this long while RabbitMQ is stopped
        stop_all(sv, CRASHERS)
        log = sv.supervisord_log()
        assert "overflowed" not in log
        assert sv.state("opsrelay") == "RUNNING", sv.diagnostics()
        exits = logged_exits(log)
        # STARTING, RUNNING, EXITED per exit: more events than the buffer holds, or the test shows nothing.
        assert 3 * len(exits) > BUFFER_SIZE, f"the crash loop was too slow to test anything: {len(exits)} exits"
        rabbit.start()
        received: list[Event] = []

        def collect() -> int:
            received.extend(e for e in probe_events(amqp_url, prefix)
                            if e.state == "EXITED" and e.process in CRASHERS)
            return len(received)

        sv.wait_for(lambda: collect() >= len(exits), 40, interval=0.5,
                    what=f"{len(exits)} EXITED events to reach the probe queue")
        time.sleep(0.5)  # anything beyond the expected count (a duplicate) would show up now
        collect()
        assert [(e.process, e.pid) for e in received] == exits  # each exit once, in supervisord's order
        assert len({e.id for e in received}) == len(received)
        assert "overflowed" not in sv.supervisord_log()
        listener = sv.listener_log()
        assert "spooling events" in listener and "answered FAIL" not in listener
    finally:
        try:
            rabbit.start()
        finally:
            try:
                sv.stop()
            finally:
                delete(amqp_url, prefix)
