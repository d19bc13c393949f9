"""The broker layout (exchanges, queues, arguments, bindings), as pure functions.

The whole layout is built here once and declared by an engine idempotently,
so the listener and the relay can never declare the same name differently
(RabbitMQ answers PRECONDITION_FAILED when arguments differ).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from relay.contract.names import (
    dead_queue,
    events_exchange,
    outbound_queue,
    relays_queue,
    retry_queue,
    silence_owner_queue,
    silenced_queue,
    silences_queue,
    spool_name,
    state_queue,
    submit_exchange,
    subscription_queue,
    unrouted_exchange,
    unrouted_queue,
)

__all__ = [
    "BindingSpec",
    "ExchangeKind",
    "ExchangeSpec",
    "QueueSpec",
    "Topology",
    "event_topology",
    "full_topology",
    "outbound_topology",
    "silence_topology",
    "spool_topology",
]


class ExchangeKind(StrEnum):
    TOPIC = "topic"
    FANOUT = "fanout"


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    kind: ExchangeKind
    alternate: str | None = None


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    # Per-queue TTL, then dead-lettered to ``dead_letter_to`` through the default exchange.
    ttl_ms: int | None = None
    dead_letter_to: str | None = None
    # One consumer at a time gets messages (RabbitMQ's x-single-active-consumer); the
    # others stand by and take over when it goes. For state only one relay may own.
    single_active: bool = False
    # Where a message goes that was delivered ``broker.delivery_limit`` times without being settled
    # (it keeps killing its consumer): quorum queues count deliveries; None: never dead-lettered for it.
    poison_to: str | None = None
    # The queue may exist without ``ttl_ms`` (declared by an older opsrelay): the embedded
    # engine then sets it, RabbitMQ (which cannot change a queue's arguments) keeps the queue
    # as it is and says so, instead of refusing to run.
    ttl_added_later: bool = False


@dataclass(frozen=True, slots=True)
class BindingSpec:
    queue: str
    exchange: str
    pattern: str


@dataclass(frozen=True, slots=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = field(default=())

    def __add__(self, other: Topology) -> Topology:
        return Topology(
            _unique(self.exchanges + other.exchanges),
            _unique(self.queues + other.queues),
            _unique(self.bindings + other.bindings),
        )


_T = TypeVar("_T")


def _unique(items: Iterable[_T]) -> tuple[_T, ...]:
    return tuple(dict.fromkeys(items))


# Every state change no subscription takes (STARTING, RUNNING, ... on most hosts) lands in
# unrouted; kept a week for `opsrelay unrouted replay`, then dropped, so it cannot grow for ever.
UNROUTED_TTL_MS = 7 * 24 * 3600 * 1000


def event_topology(prefix: str) -> Topology:
    """What a publisher of events needs: the topic exchange and where unmatched events go."""
    unrouted = unrouted_exchange(prefix)
    return Topology(
        exchanges=(
            ExchangeSpec(unrouted, ExchangeKind.FANOUT),
            ExchangeSpec(events_exchange(prefix), ExchangeKind.TOPIC, alternate=unrouted),
        ),
        queues=(QueueSpec(unrouted_queue(prefix), ttl_ms=UNROUTED_TTL_MS, ttl_added_later=True),),
        bindings=(BindingSpec(unrouted_queue(prefix), unrouted, "#"),),
    )


# A relay's heartbeat is dropped after a minute (relay.observe.heartbeat.TTL_MS).
HEARTBEAT_TTL_MS = 60_000


def silence_topology(prefix: str) -> Topology:
    """Where silences and relay heartbeats are kept: what ``opsrelay silence`` and ``status`` need.

    Both are small queues read whole (``Engine.read_all``; on RabbitMQ under a transient lock queue
    the engine makes itself). The events a
    silence held back wait in ``silenced``; the relay that owns ``silences.owner`` (single active, as
    a stateful subscription's state queue) mails their summary when the silence ends."""
    silences, relays = silences_queue(prefix), relays_queue(prefix)
    return Topology(queues=(
        QueueSpec(silences), QueueSpec(relays, ttl_ms=HEARTBEAT_TTL_MS), QueueSpec(silenced_queue(prefix)),
        QueueSpec(silence_owner_queue(prefix), single_active=True),
    ))


def outbound_topology(prefix: str) -> Topology:
    """What a publisher of mail needs: outbound (a message that kills the relay every time ends in dead)
    behind the submit exchange."""
    outbound, dead, submit = outbound_queue(prefix), dead_queue(prefix), submit_exchange(prefix)
    return Topology(
        exchanges=(ExchangeSpec(submit, ExchangeKind.FANOUT),),
        queues=(QueueSpec(outbound, poison_to=dead), QueueSpec(dead)),
        bindings=(BindingSpec(outbound, submit, "#"),),
    )


def full_topology(
    prefix: str,
    subscriptions: Sequence[tuple[str, Sequence[str]]],
    retry_delays_ms: Sequence[int],
    stateful: Sequence[str] = (),
    budgets: Sequence[tuple[str, int]] = (),
) -> Topology:
    """Everything the relay uses: subscriptions, outbound, retry steps, dead letters, and the
    budget counters ``(queue, window_ms)``: each message expires after its window and is dropped."""
    outbound, dead = outbound_queue(prefix), dead_queue(prefix)
    # The queues the relay consumes for work: a message that kills it every time ends in dead.
    queues = [
        QueueSpec(retry_queue(prefix, d), ttl_ms=d, dead_letter_to=outbound)
        for d in sorted(set(retry_delays_ms))
    ]
    bindings = []
    for name, patterns in subscriptions:
        queue = subscription_queue(prefix, name)
        queues.append(QueueSpec(queue, poison_to=dead))
        bindings += [BindingSpec(queue, events_exchange(prefix), p) for p in patterns]
    queues += [QueueSpec(state_queue(prefix, name), single_active=True) for name in stateful]
    queues += [QueueSpec(name, ttl_ms=window_ms) for name, window_ms in budgets]
    return (event_topology(prefix) + outbound_topology(prefix) + silence_topology(prefix)
            + Topology((), tuple(queues), tuple(bindings)))


def spool_topology(prefix: str) -> Topology:
    """One topic exchange into one queue, so a spooled row keeps the routing key it was published with."""
    name = spool_name(prefix)
    return Topology(
        exchanges=(ExchangeSpec(name, ExchangeKind.TOPIC),),
        queues=(QueueSpec(name),),
        bindings=(BindingSpec(name, name, "#"),),
    )
