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
from tests.doubles import RecordingMailer
from tests.integration.test_engine_contract import Broker

pytestmark = pytest.mark.timeout(60)


@dataclass
class RunningRelay:
    relay: Relay
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def end(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 20)


@pytest.fixture
async def start(broker: Broker, prefix: str) -> AsyncIterator[Callable[..., Any]]:
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
        # Declared and owning its state once the consumers run.
        await asyncio.sleep(0.5)
        running.append(RunningRelay(relay, stop, task))
        return running[-1]

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


async def wait_until(predicate: Callable[[], bool], seconds: float) -> None:
    # Polling: the recording mailer has no event to wait on.
    async with asyncio.timeout(seconds):
        while not predicate():  # noqa: ASYNC110  (the recording mailer has no event)
            await asyncio.sleep(0.05)


def text_of(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    part = message.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    assert part is not None
    return str(part.get_content())


async def test_a_digest_pending_at_stop_goes_out_once_complete_from_the_next_relay(
        broker: Broker, prefix: str, start: Callable[..., Any]) -> None:
    mailer = RecordingMailer()
    first = await start(mailer, group_wait="3s")
    publisher = await broker.open()
    events = [await crash(publisher, prefix, n) for n in range(4)]
    await asyncio.sleep(1.0)
    await first.end()
    assert mailer.sent == []
    await start(mailer, group_wait="3s")
    await wait_until(lambda: len(mailer.sent) >= 1, 15)
    await asyncio.sleep(1.5)
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
    await wait_until(lambda: sent() == 3, 10)
    await a.end()
    await wait_until(lambda: b.relay.owned == {"ops"}, 15)
    for n in range(3, 5):
        await crash(publisher, prefix, n)
    await wait_until(lambda: sent() == 5, 15)
    await asyncio.sleep(1.0)
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
    await wait_until(lambda: len(mailer.sent) == 1, 15)
    assert failures and event.id.encode() in mailer.sent[0].raw
    await asyncio.sleep(0.5)
    assert len(mailer.sent) == 1


async def test_a_digest_whose_template_fails_on_real_events_is_dead_lettered_and_the_relay_goes_on(
        broker: Broker, prefix: str, start: Callable[..., Any]) -> None:
    mailer = RecordingMailer()
    # Fine on the sample (exit status 3), fails where the exit status is unknown (None).
    running = await start(mailer, group_wait="1s", digest_body="{{ events|map(attribute='exit_status')|sum }}")
    publisher = await broker.open()
    events = [await crash(publisher, prefix, n) for n in range(2)]
    dead = dead_queue(prefix)
    await wait_until_async(lambda: publisher.depth(dead), 2, 15)
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
    await wait_until(lambda: len(mailer.sent) == 1, 15)
    assert f"X-Opsrelay-Event: {lone.id}".encode() in mailer.sent[0].raw


async def wait_until_async(count: Callable[[], Any], expected: int, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while await count() < expected:  # noqa: ASYNC110  (a queue depth: nothing to wait on)
            await asyncio.sleep(0.05)


async def test_a_subscription_that_dropped_its_digests_says_what_state_it_left(
        broker: Broker, prefix: str, start: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    mailer = RecordingMailer()
    first = await start(mailer, group_wait="60s")
    publisher = await broker.open()
    await crash(publisher, prefix, 1)
    await asyncio.sleep(1.0)
    await first.end()
    await start(mailer)  # the same subscription, now one mail per event
    assert f"{prefix}.state.ops holds state saved when this subscription had digests" in caplog.text
