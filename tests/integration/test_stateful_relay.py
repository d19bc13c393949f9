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

from listeners.publish import event_message
from relay.config import Config
from relay.daemon import Relay
from relay.engines.base import Engine
from relay.event import Event
from relay.smtp import RecordingMailer
from relay.topology import events_exchange
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
