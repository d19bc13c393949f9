"""One behavioural suite, run against every engine: the embedded SQLite queue and RabbitMQ.

The ``broker`` and ``engine`` fixtures are tests/integration/conftest.py's: the amqp case needs a
RabbitMQ at ``$OPSRELAY_TEST_AMQP_URL`` (default ``amqp://guest:guest@127.0.0.1:5672/``); it
fails when that is unreachable and ``$CI`` is set, and skips otherwise. Every test names its
exchanges and queues with a fresh prefix; what a test declared on RabbitMQ is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from relay.contract.message import HeaderValue, Message
from relay.contract.names import events_exchange, unrouted_queue
from relay.contract.topology import BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec, Topology, event_topology
from relay.engines.base import Delivery, Engine
from relay.errors import ConfigurationError
from tests.brokers import Broker, settled_depth

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0


def message(tag: str, **headers: HeaderValue) -> Message:
    return Message(body=tag.encode(), message_id=f"{tag}-{uuid.uuid4()}", headers=headers)


def tag(delivery: Delivery) -> str:
    return delivery.message.body.decode()


async def queues(broker: Broker, engine: Engine, *names: str) -> None:
    await broker.declare(engine, Topology(queues=tuple(QueueSpec(n) for n in names)))


async def drain(engine: Engine, queue: str) -> list[str]:
    """Bodies of everything ready in ``queue``, oldest first, acked."""
    found = []
    while (delivery := await engine.get(queue)) is not None:
        found.append(tag(delivery))
        await delivery.ack()
    return found


@contextlib.asynccontextmanager
async def consuming(
    engine: Engine, queue: str, prefetch: int = 10
) -> AsyncIterator[Callable[[], Awaitable[Delivery]]]:
    """``next_delivery()`` for a consumer that is closed (unsettled deliveries returned) on exit."""
    deliveries = engine.consume(queue, prefetch=prefetch)

    async def next_delivery() -> Delivery:
        return await asyncio.wait_for(anext(deliveries), WAIT)

    try:
        yield next_delivery
    finally:
        aclose = getattr(deliveries, "aclose", None)
        if aclose is not None:
            await aclose()


async def test_topic_exchange_reaches_exactly_the_bound_queues(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    events = events_exchange(prefix)
    one, tail, other = f"{prefix}.one", f"{prefix}.tail", f"{prefix}.other"
    topology = event_topology(prefix) + Topology(
        queues=(QueueSpec(one), QueueSpec(tail), QueueSpec(other)),
        bindings=(
            BindingSpec(one, events, "proc.*.x"),
            BindingSpec(tail, events, "proc.#"),
            BindingSpec(other, events, "other.*"),
        ),
    )
    await broker.declare(engine, topology)

    for key in ("proc.a.x", "proc.a.b.x", "proc", "other.a", "other.a.b", "nomatch"):
        await engine.publish(events, key, message(key))

    assert await drain(engine, one) == ["proc.a.x"]  # * is exactly one word
    assert await drain(engine, tail) == ["proc.a.x", "proc.a.b.x", "proc"]  # # is zero or more
    assert await drain(engine, other) == ["other.a"]
    # What no binding matched goes through the alternate exchange, not into the void.
    assert await drain(engine, unrouted_queue(prefix)) == ["other.a.b", "nomatch"]


async def test_fanout_exchange_delivers_to_every_bound_queue(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    fan, first, second = f"{prefix}.fan", f"{prefix}.first", f"{prefix}.second"
    await broker.declare(engine, Topology(
        exchanges=(ExchangeSpec(fan, ExchangeKind.FANOUT),),
        queues=(QueueSpec(first), QueueSpec(second)),
        bindings=(BindingSpec(first, fan, "#"), BindingSpec(second, fan, "ignored.by.fanout")),
    ))

    await engine.publish(fan, "any.key", message("hello"))

    assert await drain(engine, first) == ["hello"]
    assert await drain(engine, second) == ["hello"]


async def test_default_exchange_round_trips_every_field(broker: Broker, engine: Engine, prefix: str) -> None:
    queue = f"{prefix}.direct"
    await queues(broker, engine, queue)
    sent = Message(
        body=bytes(range(256)),
        message_id=str(uuid.uuid4()),
        content_type="message/rfc822",
        headers={"text": "grüße", "count": 42, "yes": True, "no": False, "nothing": None},
    )

    await engine.send(queue, sent)
    delivery = await engine.get(queue)

    assert delivery is not None
    assert delivery.message == Message(
        sent.body, sent.message_id, sent.content_type, sent.headers, routing_key=queue
    )
    assert delivery.redelivered is False
    await delivery.ack()


@pytest.mark.parametrize("case", ["missing exchange", "missing queue", "no binding matches"])
async def test_a_message_no_queue_takes_raises(
    broker: Broker, engine: Engine, prefix: str, case: str
) -> None:
    topic = f"{prefix}.lonely"
    await broker.declare(engine, Topology(exchanges=(ExchangeSpec(topic, ExchangeKind.TOPIC),)))
    exchange, key = {
        "missing exchange": (f"{prefix}.nowhere", "a.b"),
        "missing queue": ("", f"{prefix}.nowhere"),
        "no binding matches": (topic, "a.b"),
    }[case]

    with pytest.raises(ConfigurationError):
        await engine.publish(exchange, key, message("lost"))


async def test_ack_removes_the_message_for_good(broker: Broker, engine: Engine, prefix: str) -> None:
    queue = f"{prefix}.acked"
    await queues(broker, engine, queue)
    await engine.send(queue, message("once"))

    async with consuming(engine, queue) as next_delivery:
        delivery = await next_delivery()
        assert tag(delivery) == "once"
        await delivery.ack()
    await engine.close()

    # A fresh connection sees nothing: the ack was not merely a local forget.
    reopened = await broker.open()
    assert await reopened.get(queue) is None
    assert await reopened.depth(queue) == 0


async def test_unsettled_deliveries_return_when_the_engine_closes(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    queue = f"{prefix}.unsettled"
    await queues(broker, engine, queue)
    await engine.send(queue, message("pending"))

    async with consuming(engine, queue) as next_delivery:
        assert tag(await next_delivery()) == "pending"
    await engine.close()

    reopened = await broker.open()
    delivery = await reopened.get(queue)
    assert delivery is not None
    assert (tag(delivery), delivery.redelivered) == ("pending", True)
    await delivery.ack()


async def test_reject_with_requeue_redelivers(broker: Broker, engine: Engine, prefix: str) -> None:
    queue = f"{prefix}.requeue"
    await queues(broker, engine, queue)
    sent = message("again")
    await engine.send(queue, sent)

    async with consuming(engine, queue) as next_delivery:
        first = await next_delivery()
        assert (first.message.message_id, first.redelivered) == (sent.message_id, False)
        await first.reject(requeue=True)
        second = await next_delivery()
        assert (second.message.message_id, second.redelivered) == (sent.message_id, True)
        assert second.message.body == sent.body
        await second.ack()

    assert await settled_depth(engine, queue, 0) == 0


async def test_reject_without_requeue_drops(broker: Broker, engine: Engine, prefix: str) -> None:
    queue = f"{prefix}.drop"
    await queues(broker, engine, queue)
    await engine.send(queue, message("unwanted"))

    delivery = await engine.get(queue)
    assert delivery is not None
    await delivery.reject(requeue=False)
    await engine.close()

    reopened = await broker.open()
    assert await reopened.get(queue) is None


async def test_reject_without_requeue_dead_letters_when_the_queue_says_so(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    source, target = f"{prefix}.source", f"{prefix}.target"
    topology = Topology(queues=(QueueSpec(target), QueueSpec(source, dead_letter_to=target)))
    await broker.declare(engine, topology)
    await engine.send(source, message("refused"))

    delivery = await engine.get(source)
    assert delivery is not None
    await delivery.reject(requeue=False)

    assert await settled_depth(engine, target, 1) == 1
    assert await drain(engine, target) == ["refused"]
    assert await engine.depth(source) == 0


async def test_ttl_queue_dead_letters_into_its_target(broker: Broker, engine: Engine, prefix: str) -> None:
    target, delayed = f"{prefix}.outbound", f"{prefix}.retry.300ms"
    await broker.declare(engine, Topology(queues=(
        QueueSpec(target), QueueSpec(delayed, ttl_ms=300, dead_letter_to=target),
    )))
    sent = message("later", attempt=3, reason="451 try again")

    async with consuming(engine, target) as next_delivery:
        started = time.monotonic()
        await engine.send(delayed, sent)
        assert await engine.depth(delayed) == 1
        assert await engine.depth(target) == 0
        delivery = await next_delivery()
        waited = time.monotonic() - started
        await delivery.ack()

    assert waited >= 0.25, "the message must wait out the queue's TTL"
    got = delivery.message
    assert (got.body, got.message_id, got.content_type) == (sent.body, sent.message_id, sent.content_type)
    # RabbitMQ adds its own x-death header when dead-lettering; ours must all be there.
    assert {k: got.headers.get(k) for k in sent.headers} == dict(sent.headers)
    assert got.routing_key == target
    assert delivery.redelivered is False
    assert await engine.depth(delayed) == 0


async def test_depth_counts_ready_messages_and_get_takes_one(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    queue = f"{prefix}.depth"
    await queues(broker, engine, queue)
    assert await engine.get(queue) is None
    for name in ("m1", "m2", "m3"):
        await engine.send(queue, message(name))
    assert await engine.depth(queue) == 3

    taken = await engine.get(queue)
    assert taken is not None
    assert tag(taken) == "m1"
    assert await engine.depth(queue) == 2  # taken, not settled: not ready either
    await taken.reject(requeue=True)
    assert await settled_depth(engine, queue, 3) == 3

    again = await engine.get(queue)
    assert again is not None
    assert (tag(again), again.redelivered) == ("m1", True)
    await again.ack()
    assert await drain(engine, queue) == ["m2", "m3"]
    assert await engine.depth(queue) == 0


async def test_prefetch_bounds_unsettled_deliveries(broker: Broker, engine: Engine, prefix: str) -> None:
    queue = f"{prefix}.prefetch"
    await queues(broker, engine, queue)
    for n in range(5):
        await engine.send(queue, message(f"m{n}"))

    async with consuming(engine, queue, prefetch=2) as next_delivery:
        first, second = await next_delivery(), await next_delivery()
        assert [tag(first), tag(second)] == ["m0", "m1"]
        pending = asyncio.ensure_future(next_delivery())
        await asyncio.sleep(0.3)  # a negative check: no third delivery may come within this
        assert not pending.done(), "a third delivery while two are unsettled"
        assert await engine.depth(queue) == 3
        await first.ack()
        third = await pending
        assert tag(third) == "m2"
    # Closing the consumer returned the two it still held: m1 m2 m3 m4 are ready.
    assert await settled_depth(engine, queue, 4) == 4
    assert await drain(engine, queue) == ["m1", "m2", "m3", "m4"]


async def test_declare_is_idempotent(broker: Broker, engine: Engine, prefix: str) -> None:
    events, sub = events_exchange(prefix), f"{prefix}.sub.all"
    topology = event_topology(prefix) + Topology(
        queues=(QueueSpec(sub),), bindings=(BindingSpec(sub, events, "proc.#"),)
    )
    await broker.declare(engine, topology)
    await engine.publish(events, "proc.a", message("before"))

    await broker.declare(engine, topology)
    await engine.publish(events, "proc.b", message("after"))

    # Kept what it held, and the binding was not doubled.
    assert await drain(engine, sub) == ["before", "after"]


async def test_redeclaring_with_other_arguments_is_refused(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    queue = f"{prefix}.retry"
    await broker.declare(engine, Topology(queues=(QueueSpec(queue, ttl_ms=1000),)))
    with pytest.raises(ConfigurationError):
        await engine.declare(Topology(queues=(QueueSpec(queue, ttl_ms=2000),)))


async def test_messages_survive_close_and_reopen(broker: Broker, engine: Engine, prefix: str) -> None:
    queue = f"{prefix}.durable"
    await queues(broker, engine, queue)
    await engine.send(queue, message("first"))
    await engine.send(queue, message("second"))
    await engine.close()

    reopened = await broker.open()
    assert await reopened.depth(queue) == 2
    assert await drain(reopened, queue) == ["first", "second"]


async def test_an_unrouted_queue_declared_without_a_ttl_by_an_older_version_keeps_working(
        broker: Broker, engine: Engine, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """The TTL came later: an existing install must not stop at declare (RabbitMQ cannot change arguments)."""
    current = event_topology(prefix)
    older = Topology(current.exchanges, tuple(QueueSpec(q.name) for q in current.queues), current.bindings)
    await broker.declare(engine, older)
    await engine.publish(events_exchange(prefix), "proc.a.b.c.RUNNING", message("before"))
    again = await broker.open()
    await broker.declare(again, current)  # no error
    await again.publish(events_exchange(prefix), "proc.a.b.c.STOPPED", message("after"))
    assert await drain(again, unrouted_queue(prefix)) == ["before", "after"]
    if broker.kind == "amqp":
        assert "exists without the TTL" in caplog.text
    else:
        import sqlite3

        from relay.engines.sqlite import db_path

        with contextlib.closing(sqlite3.connect(db_path(broker.url))) as conn:
            [(ttl,)] = conn.execute("SELECT ttl_ms FROM queues WHERE name = ?", (unrouted_queue(prefix),))
        assert ttl == current.queues[0].ttl_ms  # the embedded engine applies it


async def test_oldest_is_when_the_head_was_queued_and_survives_a_peek(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    queue = f"{prefix}.aged"
    await queues(broker, engine, queue)
    assert await engine.oldest(queue) is None
    before = time.time()
    await engine.send(queue, message("first"))
    await engine.send(queue, message("second"))
    head = await engine.oldest(queue)
    assert head is not None
    # AMQP's timestamp property has whole seconds.
    assert before - 1.0 <= head <= time.time()
    assert await settled_depth(engine, queue, 2) == 2
    assert await drain(engine, queue) == ["first", "second"]  # the peek left the order alone
    assert await engine.oldest(queue) is None


async def test_oldest_of_a_missing_queue_is_a_configuration_error(engine: Engine, prefix: str) -> None:
    with pytest.raises(ConfigurationError):
        await engine.oldest(f"{prefix}.missing")


async def test_read_all_sees_every_message_even_while_others_read(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    table = f"{prefix}.table"
    await queues(broker, engine, table)
    for i in range(20):
        await engine.send(table, message(f"row{i}"))
    others = [await broker.open() for _ in range(3)]
    views = await asyncio.gather(*(e.read_all(table) for e in [engine, *others] * 3))
    assert all([m.body.decode() for m in view] == [f"row{i}" for i in range(20)] for view in views)
    assert await settled_depth(engine, table, 20) == 20


async def test_read_all_drops_what_it_is_told_to_and_keeps_the_rest(
    broker: Broker, engine: Engine, prefix: str
) -> None:
    table = f"{prefix}.table"
    await queues(broker, engine, table)
    for i in range(6):
        await engine.send(table, message(f"row{i}"))
    kept = await engine.read_all(table, drop=lambda m: int(m.body.decode()[3:]) % 2 == 0)
    assert [m.body.decode() for m in kept] == ["row1", "row3", "row5"]
    assert [m.body.decode() for m in await engine.read_all(table)] == ["row1", "row3", "row5"]
    assert await drain(engine, table) == ["row1", "row3", "row5"]
