"""Stateful subscriptions through the whole relay, on both engines.

Events are published to the events exchange as a listener does; the relay runs
on the test's loop with a RecordingMailer (the SMTP path has its own suites).
What must hold: a digest pending when the relay stops goes out once, complete,
from the next relay; two relays never both own one subscription's state.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from relay.config.models import Config
from relay.contract.event import Event, event_message
from relay.contract.message import Message
from relay.contract.names import dead_queue, events_exchange, outbound_queue, subscription_queue
from relay.daemon.relay import Relay
from relay.engines.base import Engine
from relay.errors import BrokerUnavailable
from tests.brokers import Broker
from tests.doubles import RecordingMailer
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


@dataclass
class RunningRelay:
    relay: Relay
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def end(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


def kept_for_a_digest(caplog: pytest.LogCaptureFixture, events: list[Event]) -> bool:
    """Every one of ``events`` was taken into a relay's saved state (logged after the save, before the ack)."""
    kept = [r.getMessage() for r in caplog.records if "kept for a digest" in r.getMessage()]
    return all(any(e.id in line for line in kept) for e in events)


@pytest.fixture
async def start(broker: Broker, prefix: str,
                caplog: pytest.LogCaptureFixture) -> AsyncIterator[Callable[..., Any]]:
    caplog.set_level(logging.INFO, logger="opsrelay.relay")
    running: list[RunningRelay] = []

    async def go(mailer: RecordingMailer, **sub: Any) -> RunningRelay:
        config = Config.model_validate({
            "host": "web1", "broker": {"url": broker.url, "prefix": prefix},
            "subscriptions": [{"name": "ops", "to": ["ops@example.com"], **sub}],
        })
        engine = await broker.open()
        relay = Relay(config, engine, mailer, grace=5.0)
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        started = RunningRelay(relay, stop, task)

        def consuming() -> bool:
            if task.done():
                task.result()
                raise AssertionError("the relay returned before it was stopped")
            return logged(caplog, "relay: consuming") > len(running)

        # Declared (what is published now is queued for it) once it says it consumes.
        await wait_until(consuming, 10, what="the relay to declare its queues and consume")
        if config.subscriptions[0].stateful:
            others = [r for r in running if not r.task.done()]
            if any("ops" in r.relay.owned for r in others):
                # Standing by: nothing to wait for; a negative check that it does not take over.
                await asyncio.sleep(0.5)
            else:
                await wait_until(lambda: relay.owned == {"ops"}, 10, what="the relay to own the subscription")
        running.append(started)
        return started

    yield go
    for r in reversed(running):
        if not r.task.done():
            await r.end()


async def crash(engine: Engine, prefix: str, n: int) -> Event:
    event = Event(host="web1", group="worker", process="worker", event="PROCESS_STATE_EXITED", state="EXITED",
                  from_state="RUNNING", expected=False, pid=1000 + n, id=str(uuid.uuid4()))
    key, message = event_message(event)
    await engine.publish(events_exchange(prefix), key, message)
    return event


async def depth_at_least(engine: Engine, queue: str, count: int) -> bool:
    return await engine.depth(queue) >= count


def text_of(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    part = message.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    assert part is not None
    return str(part.get_content())


async def test_a_digest_pending_at_stop_goes_out_once_complete_from_the_next_relay(
        broker: Broker, prefix: str, start: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    mailer = RecordingMailer()
    first = await start(mailer, group_wait="3s")
    publisher = await broker.open()
    events = [await crash(publisher, prefix, n) for n in range(4)]
    await wait_until(lambda: kept_for_a_digest(caplog, events), 10, what="the first relay to keep the four events")
    await first.end()
    assert mailer.sent == []
    await start(mailer, group_wait="3s")
    await wait_until(lambda: len(mailer.sent) >= 1, 15, what="the digest")
    await asyncio.sleep(1.5)  # a negative check: no second digest may follow
    [digest] = mailer.sent
    text = text_of(digest.raw)
    assert all(str(e.pid) in text or e.at[11:19] in text for e in events)
    assert text.count("EXITED") >= 4, text


async def test_two_relays_one_owner_and_the_standby_takes_over(
        broker: Broker, prefix: str, start: Callable[..., Any]) -> None:
    mailer_a, mailer_b = RecordingMailer(), RecordingMailer()
    a = await start(mailer_a, max_mails_per_hour=100)
    b = await start(mailer_b, max_mails_per_hour=100)
    assert a.relay.owned == {"ops"} and b.relay.owned == set()  # b stands by
    publisher = await broker.open()
    for n in range(3):
        await crash(publisher, prefix, n)
    sent = lambda: len(mailer_a.sent) + len(mailer_b.sent)  # noqa: E731  (both deliver from outbound)
    await wait_until(lambda: sent() == 3, 10, what="three mails")
    await a.end()
    await wait_until(lambda: b.relay.owned == {"ops"}, 15, what="the standby to take over")
    for n in range(3, 5):
        await crash(publisher, prefix, n)
    await wait_until(lambda: sent() == 5, 15, what="five mails")
    await asyncio.sleep(1.0)  # a negative check: no duplicate may follow
    assert sent() == 5


@pytest.mark.parametrize("sub", [{}, {"max_mails_per_hour": 10}], ids=["stateless", "stateful"])
async def test_an_event_whose_mail_could_not_be_queued_is_mailed_on_redelivery(
        broker: Broker, prefix: str, start: Callable[..., Any], sub: dict[str, Any]) -> None:
    mailer = RecordingMailer()
    running = await start(mailer, **sub)
    engine = running.relay.engine
    real_send = engine.send
    failures: list[str] = []

    async def send_failing_once(queue: str, message: Message) -> None:
        if queue == outbound_queue(prefix) and not failures:
            failures.append(message.message_id)
            raise BrokerUnavailable("outbound refused once (test)")
        await real_send(queue, message)

    engine.send = send_failing_once  # type: ignore[method-assign]
    publisher = await broker.open()
    event = await crash(publisher, prefix, 1)
    await wait_until(lambda: len(mailer.sent) == 1, 15, what="the mail on redelivery")
    assert failures and event.id.encode() in mailer.sent[0].raw
    await asyncio.sleep(0.5)  # a negative check: no second mail may follow
    assert len(mailer.sent) == 1


async def test_a_digest_whose_template_fails_on_real_events_is_dead_lettered_and_the_relay_goes_on(
        broker: Broker, prefix: str, start: Callable[..., Any]) -> None:
    mailer = RecordingMailer()
    # Fine on the sample (exit status 3), fails where the exit status is unknown (None).
    running = await start(mailer, group_wait="1s", digest_body="{{ events|map(attribute='exit_status')|sum }}")
    publisher = await broker.open()
    events = [await crash(publisher, prefix, n) for n in range(2)]
    dead = dead_queue(prefix)
    await wait_until(lambda: depth_at_least(publisher, dead, 2), 15, what="two dead letters")
    assert not running.task.done() and mailer.sent == []
    ids = set()
    while (delivery := await publisher.get(dead)) is not None:
        assert delivery.message.headers["x-dead-kind"] == "event"
        assert delivery.message.headers["x-dead-from"] == subscription_queue(prefix, "ops")
        ids.add(delivery.message.message_id)
        await delivery.ack()
    assert ids == {e.id for e in events}
    # The relay still works: a single event (no digest template involved) is mailed.
    lone = await crash(publisher, prefix, 9)
    await wait_until(lambda: len(mailer.sent) == 1, 15, what="the lone event's mail")
    assert f"X-Opsrelay-Event: {lone.id}".encode() in mailer.sent[0].raw


async def test_a_subscription_that_dropped_its_digests_says_what_state_it_left(
        broker: Broker, prefix: str, start: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    mailer = RecordingMailer()
    first = await start(mailer, group_wait="60s")
    publisher = await broker.open()
    event = await crash(publisher, prefix, 1)
    await wait_until(lambda: kept_for_a_digest(caplog, [event]), 10, what="the relay to keep the event")
    await first.end()
    await start(mailer)  # the same subscription, now one mail per event
    assert f"{prefix}.state.ops holds state saved when this subscription had digests" in caplog.text
