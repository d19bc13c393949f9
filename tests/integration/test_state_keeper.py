"""State queues on both engines: single active consumer, one saved copy, ownership passed on when a relay goes."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from relay.contract.event import Event
from relay.contract.message import Message
from relay.contract.topology import QueueSpec, Topology
from relay.engines.base import Engine
from relay.notify.keeper import StateKeeper
from relay.notify.state import Outage, Pending, State
from tests.brokers import Broker, settled_depth
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


async def _state_queue(broker: Broker, engine: Engine, prefix: str) -> str:
    name = f"{prefix}.state.ops"
    await broker.declare(engine, Topology(queues=(QueueSpec(name, single_active=True),)))
    return name


async def _start(keeper: StateKeeper) -> asyncio.Task[None]:
    task = asyncio.create_task(keeper.run())
    waiting = asyncio.create_task(keeper.loaded.wait())
    done, _ = await asyncio.wait([task, waiting], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert waiting in done, "the keeper did not load its state"
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_single_active_consumer_stands_by_until_the_first_goes(broker: Broker, engine: Engine,
                                                                     prefix: str) -> None:
    queue = await _state_queue(broker, engine, prefix)
    second = await broker.open()
    await _state_queue(broker, second, prefix)
    for n in range(3):
        await engine.send(queue, Message(f"m{n}".encode(), message_id=f"m{n}"))
    first_seen: list[str] = []
    second_seen: list[str] = []

    async def consume(e: Engine, seen: list[str]) -> None:
        async for delivery in e.consume(queue, prefetch=10):
            seen.append(delivery.message.body.decode())

    one = asyncio.create_task(consume(engine, first_seen))
    # The first consumer is the active one once it has the messages; only then the second subscribes.
    await wait_until(lambda: len(first_seen) >= 3, 10, what="the first consumer to get the three messages")
    two = asyncio.create_task(consume(second, second_seen))
    await asyncio.sleep(1.5)  # a negative check: the consumer standing by must get nothing meanwhile
    assert sorted(first_seen) == ["m0", "m1", "m2"] and second_seen == []
    await _stop(one)  # unacked: they go back, to the consumer standing by
    try:
        await wait_until(lambda: len(second_seen) >= 3, 10, what="the standby to get the three messages",
                         diagnostics=lambda: f"it got {second_seen}")
    finally:
        await _stop(two)
    assert sorted(second_seen) == ["m0", "m1", "m2"]


async def test_saved_state_is_one_copy_and_a_restarted_keeper_loads_the_newest(broker: Broker, engine: Engine,
                                                                              prefix: str) -> None:
    queue = await _state_queue(broker, engine, prefix)
    keeper = StateKeeper(engine, queue)
    task = await _start(keeper)
    assert keeper.state.pending == {}
    event = Event(host="web1", group="w", process="w", event="PROCESS_STATE_EXITED", state="EXITED", expected=False)
    for n in range(5):
        keeper.state.pending["g"] = Pending({}, due=100.0 + n, events=[event], total=n + 1)
        await keeper.save()
    keeper.state.outages["k"] = Outage(since="2026-11-27T10:00:00.000000Z", thread="<x@opsrelay.web1>")
    await keeper.save()
    # Each copy comes back to the keeper, which holds it and acks the one before.
    await wait_until(lambda: keeper._held_seq == keeper._seq, 10, what="the keeper to hold its last saved copy",
                     diagnostics=lambda: f"holds copy {keeper._held_seq}, saved {keeper._seq}")
    assert await settled_depth(engine, queue, 0) == 0  # the one copy is held, older ones acked
    await _stop(task)
    await engine.close()

    again = await broker.open()
    assert await settled_depth(again, queue, 1) == 1
    restarted = StateKeeper(again, queue)
    task = await _start(restarted)
    assert restarted.state.pending["g"].total == 5 and restarted.state.pending["g"].due == 104.0
    assert restarted.state.pending["g"].events == [event]
    assert restarted.state.outages["k"].thread == "<x@opsrelay.web1>"
    await _stop(task)


async def test_a_crash_between_save_and_ack_leaves_two_copies_and_the_newest_wins(broker: Broker, engine: Engine,
                                                                                  prefix: str) -> None:
    queue = await _state_queue(broker, engine, prefix)
    older, newer = State(), State()
    older.last_sent["g"] = 1.0
    newer.last_sent["g"] = 2.0
    for seq, state in ((3, older), (4, newer)):
        await engine.send(queue, Message(state.dumps(), message_id=f"s{seq}", headers={"x-state-seq": seq}))
    await engine.send(queue, Message(b"not a state", message_id="junk", headers={"x-state-seq": 9}))
    keeper = StateKeeper(engine, queue)
    task = await _start(keeper)
    assert keeper.state.last_sent == {"g": 2.0}
    assert await settled_depth(engine, queue, 0) == 0
    await _stop(task)
    assert await settled_depth(engine, queue, 1) == 1


async def test_a_second_relay_stands_by_then_takes_over_the_saved_state(broker: Broker, engine: Engine,
                                                                       prefix: str) -> None:
    queue = await _state_queue(broker, engine, prefix)
    owner = StateKeeper(engine, queue)
    owner_task = await _start(owner)
    owner.state.last_sent["g"] = 42.0
    await owner.save()
    standby_engine = await broker.open()
    await _state_queue(broker, standby_engine, prefix)  # as every relay declares its topology first
    standby = StateKeeper(standby_engine, queue)
    standby_task = asyncio.create_task(standby.run())
    await asyncio.sleep(1.5)  # a negative check: the standby must not load while the owner holds the copy
    assert not standby.loaded.is_set()
    await _stop(owner_task)
    await engine.close()  # the owner's process ends: its held copy goes to the standby
    await asyncio.wait_for(standby.loaded.wait(), 10)
    assert standby.state.last_sent == {"g": 42.0}
    await _stop(standby_task)
