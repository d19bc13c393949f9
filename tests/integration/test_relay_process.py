"""``opsrelay serve`` as a real process under faults: SIGTERM and kill -9 in the middle of a burst,
and a RabbitMQ restart while it delivers (plus the listener's publisher during that outage).

Each relay is ``.venv/bin/opsrelay serve --config <tmp>/opsrelay.toml``; the SMTP server answers
every DATA after a short pause so that the fault lands while mail is in flight. Every test ends
with :func:`tests.integration.faults.reconcile`.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from listeners.publish import EnginePublisher
from relay.contract.event import Event
from relay.contract.names import unrouted_queue
from relay.errors import RelayError
from tests.brokers import rabbitmqctl
from tests.integration.faults import (
    Ledger,
    Rig,
    Servers,
    Watch,
    drain,
    fill_outbound,
    new_mail,
    reconcile,
    relay_settings,
    write_toml,
)
from tests.processes import RelayProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

POOL_SIZE = 2
# The relay's outbound consumer (relay/daemon/relay.py): pool_size deliveries at once, prefetch twice that.
# A mail can be sent and not yet acked only inside this window.
IN_FLIGHT_WINDOW = POOL_SIZE + 2 * POOL_SIZE


async def until_received(servers: Servers, count: int, relay: RelayProcess, within: float = 20.0) -> None:
    def enough() -> bool:
        relay.alive()
        return len(servers.received()) >= count

    await wait_until(enough, within, what=f"{count} mails at the server", diagnostics=relay.log)


async def test_sigterm_mid_burst_exits_0_promptly_and_loses_nothing(
        rig: Rig, servers: Servers, tmp_path: Path) -> None:
    total = 150
    server = servers.make()
    server.reply_to_data("250 2.0.0 OK, slowly", times=total * 2, delay=0.02)
    settings = relay_settings(rig.broker, server, pool_size=POOL_SIZE)
    config, engine = await rig.open(settings)
    path = write_toml(settings, tmp_path / "opsrelay.toml")
    ledger = Ledger()
    await fill_outbound(engine, rig.broker.prefix, ledger, (new_mail([f"ops{i % 5}@example.test"])
                                                            for i in range(total)))
    watch = Watch(engine, config, ledger, servers.received)

    with RelayProcess(path, tmp_path / "relay1.log") as first:
        await until_received(servers, 20, first)
        code, took = await first.terminate()
        assert code == 0, first.log()
        assert took < 10.0
        print(f"\nSIGTERM mid-burst [{rig.broker.kind}]: exit {code} after {took:.2f}s")
        stopped_at = len(servers.received())
        assert stopped_at < total, "SIGTERM came after the burst: nothing was in flight"
        assert "finishing" in first.text(), "the relay had deliveries in flight to finish"

    with RelayProcess(path, tmp_path / "relay2.log") as second:
        watch.alive = second.alive
        await watch.until_settled(30)
        code, _ = await second.terminate()
        assert code == 0, second.log()
    result = await reconcile(watch)
    assert not result.dead
    assert sum(result.delivered.values()) == total


async def test_kill_9_mid_burst_then_restart_delivers_all_with_bounded_duplicates(
        rig: Rig, servers: Servers, tmp_path: Path) -> None:
    total = 500
    server = servers.make()
    server.reply_to_data("250 2.0.0 OK, slowly", times=total * 2, delay=0.005)
    settings = relay_settings(rig.broker, server, pool_size=POOL_SIZE)
    config, engine = await rig.open(settings)
    path = write_toml(settings, tmp_path / "opsrelay.toml")
    ledger = Ledger()
    await fill_outbound(engine, rig.broker.prefix, ledger, (new_mail([f"ops{i % 5}@example.test"])
                                                            for i in range(total)))
    watch = Watch(engine, config, ledger, servers.received)

    with RelayProcess(path, tmp_path / "relay1.log") as first:
        await until_received(servers, 120, first)
        await first.kill()
        assert first.process.returncode == -signal.SIGKILL
    killed_at = len(servers.received())
    assert killed_at < total, "the kill came after the burst"

    with RelayProcess(path, tmp_path / "relay2.log") as second:
        watch.alive = second.alive
        await watch.until_settled(40)
        code, _ = await second.terminate()
        assert code == 0, second.log()
    result = await reconcile(watch, max_duplicates=IN_FLIGHT_WINDOW)
    print(f"\nkill -9 mid-burst [{rig.broker.kind}]: {result.duplicates} duplicate(s) of {total} mails "
          f"(killed after {killed_at} delivered; bound {IN_FLIGHT_WINDOW} = pool_size + prefetch)")
    assert not result.dead
    assert len(result.delivered) == total


@dataclass
class Outcome:
    event: Event
    ok: bool
    at: float


def publish_steadily(publisher: EnginePublisher, outcomes: list[Outcome], stop: threading.Event) -> None:
    """The listener's side: one event every 50 ms, as supervisord would hand them over."""
    number = 0
    while not stop.is_set():
        number += 1
        event = Event(host="faulthost", group="workers", process=f"w{number}", event="PROCESS_STATE_EXITED",
                      state="EXITED", from_state="RUNNING", expected=False, pid=1000 + number)
        try:
            publisher.publish(event)
        except RelayError:
            outcomes.append(Outcome(event, False, time.monotonic()))  # the listener answers FAIL
        else:
            outcomes.append(Outcome(event, True, time.monotonic()))
        stop.wait(0.05)


@pytest.mark.parametrize("broker", [pytest.param("amqp", marks=pytest.mark.rabbitmq)], indirect=True)
async def test_rabbitmq_restart_mid_burst_relay_reconnects_and_publisher_fails_then_recovers(
        rig: Rig, servers: Servers, tmp_path: Path) -> None:
    total = 300
    server = servers.make()
    server.reply_to_data("250 2.0.0 OK, slowly", times=total * 2, delay=0.01)
    settings = relay_settings(rig.broker, server, pool_size=POOL_SIZE)
    config, engine = await rig.open(settings)
    path = write_toml(settings, tmp_path / "opsrelay.toml")
    ledger = Ledger()
    await fill_outbound(engine, rig.broker.prefix, ledger, (new_mail([f"ops{i % 5}@example.test"])
                                                            for i in range(total)))
    await engine.close()  # the broker is about to go away under it; a fresh one inspects afterwards

    publisher = EnginePublisher(rig.broker.url, rig.broker.prefix, timeout=1.0)
    outcomes: list[Outcome] = []
    stop_publishing = threading.Event()
    publishing = threading.Thread(target=publish_steadily, args=(publisher, outcomes, stop_publishing),
                                  name="publish-steadily", daemon=True)
    try:
        with RelayProcess(path, tmp_path / "relay.log") as relay:
            publishing.start()
            await until_received(servers, 40, relay)
            down_at = time.monotonic()
            try:
                await asyncio.to_thread(rabbitmqctl, "stop_app")
                during = len(servers.received())
                await asyncio.sleep(2.0)  # the outage itself: RabbitMQ stays down this long
            finally:
                await asyncio.to_thread(rabbitmqctl, "start_app")
                await asyncio.to_thread(rabbitmqctl, "await_startup")
            up_at = time.monotonic()
            assert during < total, "the outage came after the burst"

            def published_again() -> bool:
                return any(o.ok and o.at > up_at for o in outcomes)

            await wait_until(published_again, 30, what="the publisher to succeed after the restart")
            stop_publishing.set()
            await asyncio.to_thread(publishing.join, 10)
            _, engine = await rig.open(settings)
            watch = Watch(engine, config, ledger, servers.received)
            watch.alive = relay.alive
            await watch.until_settled(40)
            code, _ = await relay.terminate()
            assert code == 0, relay.log()
    finally:
        stop_publishing.set()
        if publishing.is_alive():
            publishing.join(10)
        publisher.close()

    result = await reconcile(watch, max_duplicates=IN_FLIGHT_WINDOW)
    print(f"\nRabbitMQ restart mid-burst: {result.duplicates} duplicate(s) of {total} mails "
          f"(bound {IN_FLIGHT_WINDOW} = pool_size + prefetch)")
    assert not result.dead
    assert len(result.delivered) == total

    # The listener's side: FAIL while the broker was down, OK again after; every OK is in the queue.
    failed = [o for o in outcomes if not o.ok]
    assert failed and all(o.at > down_at for o in failed), [(o.ok, o.at - down_at) for o in outcomes]
    acknowledged = {o.event.id for o in outcomes if o.ok}
    queued = {m.message_id for m in await drain(engine, unrouted_queue(rig.broker.prefix))}
    assert acknowledged <= queued, f"{len(acknowledged - queued)} event(s) answered OK but not in the queue"
