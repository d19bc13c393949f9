"""Topic matching: RabbitMQ is the oracle for ``relay.contract.keys.topic_matches`` and the embedded engine.

Hypothesis draws binding patterns over the words ``"" a b * #`` and routing keys over ``"" a b``
(0-5 words each, so empty words, leading/trailing dots and repeated ``#`` all occur). Each example
declares one throwaway topic exchange with one queue per pattern, on the real RabbitMQ and on a
SqliteEngine, publishes every key to both, and compares who got what with ``topic_matches``.
Keys no pattern takes go through an alternate exchange, so that path is compared too.

AMQP 0-9-1 splits a key on ``.``; RabbitMQ treats ``""`` as zero words (``"#"`` takes it, ``"*"``
does not), and a key of one empty word cannot be written any other way, so it is the same key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.contract.keys import topic_matches
from relay.contract.message import Message
from relay.contract.topology import BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec, Topology
from relay.engines.amqp import AmqpEngine
from relay.engines.base import Engine
from relay.engines.sqlite import SqliteEngine
from tests.conftest import AMQP_URL, rabbitmq_reachable

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(90)]

_T = TypeVar("_T")

KEY_WORDS = ("", "a", "b")
PATTERN_WORDS = (*KEY_WORDS, "*", "#")


def dotted(words: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(words, min_size=0, max_size=5).map(".".join)


keys = dotted(st.sampled_from(KEY_WORDS))
patterns = dotted(st.sampled_from(PATTERN_WORDS))


@dataclass
class Brokers:
    """RabbitMQ and a SQLite queue driven from one private loop, so one AMQP connection serves every example."""

    loop: asyncio.AbstractEventLoop
    amqp: AmqpEngine
    sqlite: SqliteEngine
    admin: aio_pika.abc.AbstractRobustConnection
    prefix: str
    _serial: Iterator[int] = field(default_factory=count)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def next_name(self) -> str:
        return f"{self.prefix}.x{next(self._serial)}"

    @property
    def nowhere(self) -> str:
        return f"{self.prefix}.nowhere"

    async def delete(self, topology: Topology) -> None:
        """Undo ``topology`` on RabbitMQ (the SQLite file goes with its tmp dir)."""
        for queue in reversed(topology.queues):
            async with self.admin.channel() as channel:  # a failed delete closes its channel
                await channel.queue_delete(queue.name)
        for exchange in reversed(topology.exchanges):
            async with self.admin.channel() as channel:
                await channel.exchange_delete(exchange.name)


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    if not rabbitmq_reachable():
        message = f"RabbitMQ is not reachable at {AMQP_URL} (make test starts it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    loop = asyncio.new_event_loop()
    db: Path = tmp_path_factory.mktemp("topics") / "queue.db"
    prefix = f"t{uuid.uuid4().hex[:10]}"
    amqp, sqlite = AmqpEngine(AMQP_URL), SqliteEngine(f"sqlite:///{db.absolute()}")
    nowhere = f"{prefix}.nowhere"
    catch_all = Topology(
        exchanges=(ExchangeSpec(nowhere, ExchangeKind.FANOUT),),
        queues=(QueueSpec(nowhere),),
        bindings=(BindingSpec(nowhere, nowhere, "#"),),
    )

    async def start() -> aio_pika.abc.AbstractRobustConnection:
        await amqp.connect()
        await sqlite.connect()
        for engine in (amqp, sqlite):
            await engine.declare(catch_all)
        return await aio_pika.connect_robust(AMQP_URL)

    admin = loop.run_until_complete(start())
    found = Brokers(loop, amqp, sqlite, admin, prefix)
    try:
        yield found
    finally:

        async def stop() -> None:
            with contextlib.suppress(aio_pika.exceptions.AMQPException):
                await found.delete(catch_all)
            await admin.close()
            await amqp.close()
            await sqlite.close()

        loop.run_until_complete(stop())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def drain(engine: Engine, queue: str) -> set[str]:
    got: set[str] = set()
    while (delivery := await engine.get(queue)) is not None:
        got.add(delivery.message.body.decode())
        await delivery.ack()
    return got


async def route(engine: Engine, topology: Topology, exchange: str, nowhere: str,
                keys: Sequence[str]) -> tuple[dict[str, set[str]], set[str]]:
    """Declare, publish every key once, and return (pattern -> keys its queue got, unrouted keys)."""
    await engine.declare(topology)
    for key in keys:
        # The body carries the key: a message id must not be empty on every engine.
        await engine.publish(exchange, key, Message(key.encode(), message_id=f"k{len(key)}-{key or 'empty'}"))
    got = {b.pattern: await drain(engine, b.queue) for b in topology.bindings}
    return got, await drain(engine, nowhere)


def compare(brokers: Brokers, patterns: Sequence[str], keys: Sequence[str]) -> None:
    exchange = brokers.next_name()
    queues = {p: f"{exchange}.q{i}" for i, p in enumerate(patterns)}
    topology = Topology(
        exchanges=(ExchangeSpec(exchange, ExchangeKind.TOPIC, alternate=brokers.nowhere),),
        queues=tuple(QueueSpec(q) for q in queues.values()),
        bindings=tuple(BindingSpec(q, exchange, p) for p, q in queues.items()),
    )

    async def both() -> tuple[tuple[dict[str, set[str]], set[str]], tuple[dict[str, set[str]], set[str]]]:
        try:
            rabbit = await route(brokers.amqp, topology, exchange, brokers.nowhere, keys)
        finally:
            await brokers.delete(topology)
        return rabbit, await route(brokers.sqlite, topology, exchange, brokers.nowhere, keys)

    (rabbit, rabbit_unrouted), (embedded, embedded_unrouted) = brokers.run(both())
    disagreements = [
        (p, k, k in rabbit[p], topic_matches(p, k), k in embedded[p])
        for p in patterns for k in keys
        if not (k in rabbit[p]) == topic_matches(p, k) == (k in embedded[p])
    ]
    assert not disagreements, "(pattern, key, RabbitMQ, topic_matches, SqliteEngine): " + repr(disagreements)
    unmatched = {k for k in keys if not any(topic_matches(p, k) for p in patterns)}
    assert rabbit_unrouted == unmatched
    assert embedded_unrouted == unmatched


@settings(max_examples=60, deadline=None)
@given(patterns=st.lists(patterns, min_size=1, max_size=12, unique=True),
       keys=st.lists(keys, min_size=1, max_size=12, unique=True))
# Known edges, always run: empty key and words, # next to * and to another #, # at either end.
@example(patterns=["#", "*", "", "#.*", "*.#", "#.#", "#.#.a", "a.#.#", "#.", ".#", "*.", ".*", "#..#"],
         keys=["", ".", "..", "a", "a.", ".a", "a..b", "b.a.b"])
def test_topic_routing_equals_rabbitmq(brokers: Brokers, patterns: list[str], keys: list[str]) -> None:
    compare(brokers, patterns, keys)
