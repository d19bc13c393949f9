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
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any, TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.contract.keys import topic_matches
from relay.contract.message import Message
from relay.contract.topology import BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec, Topology
from relay.engines.base import Engine
from tests.brokers import Broker, require_rabbitmq, sqlite_url, unique_prefix

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(90)]

_T = TypeVar("_T")

KEY_WORDS = ("", "a", "b")
PATTERN_WORDS = (*KEY_WORDS, "*", "#")


def dotted(words: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(words, min_size=0, max_size=5).map(".".join)


keys = dotted(st.sampled_from(KEY_WORDS))
patterns = dotted(st.sampled_from(PATTERN_WORDS))


@dataclass
class SideBySide:
    """RabbitMQ and a SQLite queue driven from one private loop, so one AMQP connection serves every example."""

    loop: asyncio.AbstractEventLoop
    rabbit: Broker
    embedded: Broker
    amqp: Engine
    sqlite: Engine
    _serial: Iterator[int] = field(default_factory=count)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def next_name(self) -> str:
        return f"{self.rabbit.prefix}.x{next(self._serial)}"

    @property
    def nowhere(self) -> str:
        return f"{self.rabbit.prefix}.nowhere"


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SideBySide]:
    # Module-scoped (one loop and one connection for every Hypothesis example): the function-scoped
    # broker fixture cannot serve, the Broker helper can.
    prefix = unique_prefix()
    rabbit = Broker("amqp", require_rabbitmq(), prefix)
    embedded = Broker("sqlite", sqlite_url(tmp_path_factory.mktemp("topics") / "queue.db"), prefix)
    nowhere = f"{prefix}.nowhere"
    catch_all = Topology(
        exchanges=(ExchangeSpec(nowhere, ExchangeKind.FANOUT),),
        queues=(QueueSpec(nowhere),),
        bindings=(BindingSpec(nowhere, nowhere, "#"),),
    )
    loop = asyncio.new_event_loop()

    async def start() -> SideBySide:
        amqp, sqlite = await rabbit.open(), await embedded.open()
        for broker, engine in ((rabbit, amqp), (embedded, sqlite)):
            await broker.declare(engine, catch_all)
        return SideBySide(loop, rabbit, embedded, amqp, sqlite)

    try:
        yield loop.run_until_complete(start())
    finally:
        loop.run_until_complete(rabbit.cleanup())
        loop.run_until_complete(embedded.cleanup())
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


def compare(brokers: SideBySide, patterns: Sequence[str], keys: Sequence[str]) -> None:
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
            await brokers.rabbit.delete(topology)
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
def test_topic_routing_equals_rabbitmq(brokers: SideBySide, patterns: list[str], keys: list[str]) -> None:
    compare(brokers, patterns, keys)
