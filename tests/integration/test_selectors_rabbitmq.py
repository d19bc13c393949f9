"""Subscriptions on a real RabbitMQ: the relay's bindings plus the residual filter select exactly
the right events, names with dots, wildcards and non-ASCII letters stay one word, and events no
binding matches are kept in ``<prefix>.unrouted``. Also checks ``topic_matches`` against RabbitMQ.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from relay.config.models import Config
from relay.contract.event import CONTENT_TYPE, Event, decode_event, encode_event
from relay.contract.keys import event_key, topic_matches
from relay.contract.message import Message
from relay.contract.names import events_exchange, subscription_queue, unrouted_queue
from relay.contract.topology import BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec, Topology
from relay.daemon.relay import relay_topology
from relay.engines.base import Engine
from tests.brokers import Broker
from tests.unit.test_routing import TOPIC_CASES

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(30)]

TO = ["oncall@example.com"]
SUBSCRIPTIONS = [
    {"name": "prog", "to": TO, "programs": ["group1:prog2"], "states": ["*"], "unexpected_only": False},
    {"name": "glob", "to": TO, "programs": ["worker_*"], "states": ["STOPPED", "STARTING"],
     "unexpected_only": False},
    {"name": "web1", "to": TO, "hosts": ["web1"], "states": ["*"], "unexpected_only": False},
    {"name": "fatal", "to": TO, "states": ["FATAL"]},
    {"name": "raw", "to": TO, "patterns": ["proc.db%2Emain.#", "proc.*.*.*.BACKOFF"], "unexpected_only": False},
    {"name": "crashes", "to": TO},  # crashmail's defaults: EXITED and FATAL, unexpected only
]


@dataclass(frozen=True)
class Case:
    event: Event
    bound: frozenset[str]  # subscription queues the broker delivers it to
    accepted: frozenset[str]  # what is left after Subscription.accepts


def case(host: str, group: str, process: str, state: str, bound: str, accepted: str,
         expected: bool | None = None) -> Case:
    event = Event(host=host, group=group, process=process, event=f"PROCESS_STATE_{state}", state=state,
                  expected=expected, pid=100)
    return Case(event, frozenset(bound.split()), frozenset(accepted.split()))


CASES = {
    "a": case("web1", "group1", "prog2", "EXITED", "prog web1 crashes", "prog web1 crashes", expected=False),
    "b": case("web2", "group1", "prog2", "RUNNING", "prog", "prog"),
    "c": case("web2", "group2", "prog2", "RUNNING", "", ""),
    "d": case("web2", "workers", "worker_03", "STARTING", "glob", "glob"),
    "e": case("web2", "workers", "worker_ü", "STOPPED", "glob", "glob"),
    # Bound (a glob inside a word cannot be a binding) but filtered out after consumption.
    "f": case("web2", "workers", "xworker_1", "STOPPED", "glob", ""),
    "g": case("db.main", "pg", "postgres", "RUNNING", "raw", "raw"),
    "h": case("web3", "gr.oup", "svc", "FATAL", "fatal crashes", "fatal crashes"),
    "i": case("web2", "app", "app", "EXITED", "crashes", "", expected=True),
    "j": case("web2", "app", "app", "BACKOFF", "raw", "raw"),
    "k": case("web1", "app", "app", "RUNNING", "web1", "web1"),
    "l": case("web3", "app", "ünïcode.v2", "RUNNING", "", ""),
    "m": case("db.main", "pg", "postgres", "EXITED", "raw crashes", "raw", expected=True),
    "n": case("web1", "group1", "prog2", "FATAL", "prog web1 fatal crashes", "prog web1 fatal crashes"),
    "o": case("web1", "group1", "p" * 300, "RUNNING", "web1", "web1"),
    # Wildcard characters in a name are literal: this host is not "any host".
    "q": case("we#b*", "group1", "prog2", "RUNNING", "prog", "prog"),
}
UNROUTED = {"c", "l"}

Declare = Callable[[Topology], Awaitable[Engine]]


@pytest.fixture
async def declare(amqp_url: str, prefix: str) -> AsyncIterator[Declare]:
    """Declares through a real AMQP engine (tests/brokers.py closes it and deletes what was declared)."""
    broker = Broker("amqp", amqp_url, prefix)
    opened: list[Engine] = []

    async def run(topology: Topology) -> Engine:
        if not opened:
            opened.append(await broker.open())
        await broker.declare(opened[0], topology)
        return opened[0]

    try:
        yield run
    finally:
        await broker.cleanup()


async def drain(engine: Engine, queue: str) -> list[Message]:
    messages = []
    while (delivery := await engine.get(queue)) is not None:
        messages.append(delivery.message)
        await delivery.ack()
    return messages


async def test_subscriptions_receive_exactly_their_events(amqp_url: str, prefix: str, declare: Declare) -> None:
    config = Config.model_validate({
        "host": "relay", "broker": {"url": amqp_url, "prefix": prefix},
        "retry": {"backoff": ["1s"]}, "subscriptions": SUBSCRIPTIONS,
    })
    engine = await declare(relay_topology(config))
    tags: dict[str, str] = {}
    for tag, c in CASES.items():
        e = c.event
        key = event_key(e.host, e.group, e.process, e.state)
        assert len(key.encode()) <= 255
        # As listeners.publish does it.
        await engine.publish(events_exchange(prefix), key,
                             Message(encode_event(e), message_id=e.id, content_type=CONTENT_TYPE))
        tags[e.id] = tag

    for sub in config.subscriptions:
        bound: set[str] = set()
        accepted: set[str] = set()
        for message in await drain(engine, subscription_queue(prefix, sub.name)):
            event = decode_event(message.body)
            tag = tags[event.id]
            original = CASES[tag].event
            assert event == original  # names with dots and non-ASCII letters arrive intact
            assert message.routing_key == event_key(event.host, event.group, event.process, event.state)
            assert message.message_id == event.id
            bound.add(tag)
            if sub.accepts(event):
                accepted.add(tag)
        want_bound = {t for t, c in CASES.items() if sub.name in c.bound}
        want_accepted = {t for t, c in CASES.items() if sub.name in c.accepted}
        assert bound == want_bound, sub.name
        assert accepted == want_accepted, sub.name
        # Our own matcher agrees with the broker on these bindings.
        assert {t for t, c in CASES.items()
                if any(topic_matches(p, event_key(c.event.host, c.event.group, c.event.process, c.event.state))
                       for p in sub.bindings())} == want_bound, sub.name

    unrouted = {tags[decode_event(m.body).id] for m in await drain(engine, unrouted_queue(prefix))}
    assert unrouted == UNROUTED
    assert {t for t, c in CASES.items() if not c.bound} == UNROUTED


async def test_topic_matches_agrees_with_rabbitmq(amqp_url: str, prefix: str, declare: Declare) -> None:
    """Every pattern of the unit table against every key of it: RabbitMQ is the oracle."""
    patterns = sorted({p for p, _, _ in TOPIC_CASES})
    keys = sorted({k for _, k, _ in TOPIC_CASES})
    exchange, nowhere = f"{prefix}.topics", f"{prefix}.nowhere"
    queues = {p: f"{prefix}.p{i}" for i, p in enumerate(patterns)}
    topology = Topology(
        exchanges=(ExchangeSpec(nowhere, ExchangeKind.FANOUT),
                   ExchangeSpec(exchange, ExchangeKind.TOPIC, alternate=nowhere)),
        queues=(QueueSpec(nowhere), *(QueueSpec(q) for q in queues.values())),
        bindings=(BindingSpec(nowhere, nowhere, "#"),
                  *(BindingSpec(q, exchange, p) for p, q in queues.items())),
    )
    engine = await declare(topology)
    for key in keys:
        await engine.publish(exchange, key, Message(key.encode(), message_id=key or "(empty)"))
    for pattern, queue in queues.items():
        got = {m.body.decode() for m in await drain(engine, queue)}
        want = {k for k in keys if topic_matches(pattern, k)}
        assert got == want, f"pattern {pattern!r}"
