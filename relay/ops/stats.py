"""What waits where: ready counts of the relay's queues, and the mail held for a smarthost or config fault."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relay.config.smarthost import SmarthostConfig
from relay.contract.envelope import (
    held_fault,
    read_recipients,
)
from relay.contract.message import Message
from relay.contract.names import (
    dead_queue,
    outbound_queue,
    retry_queue,
    silenced_queue,
    subscription_queue,
    unrouted_queue,
)
from relay.delivery.budget import BudgetUse, EngineBudget
from relay.engines.base import Engine
from relay.errors import ConfigurationError, MessageDecodeError
from relay.observe.observer import QueueSample
from relay.ops.browse import browse

__all__ = ["HeldMail", "QueueCount", "QueueStats", "held_in", "held_mails", "queue_samples", "queue_stats",
           "sample_queues"]



@dataclass(frozen=True, slots=True)
class QueueCount:
    role: str  # outbound | retry | dead | unrouted | subscription
    name: str
    ready: int | None  # None: the queue is not declared (the relay never ran with this config)


@dataclass(frozen=True, slots=True)
class HeldMail:
    """A mail waiting in a retry queue because the smarthost or our config is at fault."""

    queue: str
    id: str
    fault: str
    holds: int
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QueueStats:
    queues: tuple[QueueCount, ...]
    held: tuple[HeldMail, ...]
    # Each budget window of each smarthost that has one (max_per_minute / max_per_day).
    budgets: tuple[BudgetUse, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": [{"role": q.role, "name": q.name, "ready": q.ready} for q in self.queues],
            "held": [{"queue": h.queue, "id": h.id, "fault": h.fault, "holds": h.holds,
                      "recipients": list(h.recipients)} for h in self.held],
            "budgets": [b.to_dict() for b in self.budgets],
        }


async def queue_stats(engine: Engine, prefix: str, retry_delays_ms: Sequence[int],
                      subscriptions: Sequence[str], smarthosts: Sequence[SmarthostConfig] = ()) -> QueueStats:
    """Ready counts of the relay's queues, and the held mails found by browsing the retry queues."""
    named = [("outbound", outbound_queue(prefix))]
    named += [("retry", retry_queue(prefix, d)) for d in sorted(set(retry_delays_ms))]
    named += [("dead", dead_queue(prefix)), ("unrouted", unrouted_queue(prefix))]
    named += [("subscription", subscription_queue(prefix, s)) for s in subscriptions]
    counts: list[QueueCount] = []
    held: list[HeldMail] = []
    for role, name in named:
        try:
            ready: int | None = await engine.depth(name)
        except ConfigurationError:
            ready = None
        counts.append(QueueCount(role, name, ready))
        if role == "retry" and ready:
            held += await held_in(engine, name)
    budgets: list[BudgetUse] = []
    for smarthost in smarthosts:
        try:
            budgets += await EngineBudget(engine, prefix).use(smarthost)
        except ConfigurationError:
            continue  # not declared yet: the relay never ran with this budget
    return QueueStats(tuple(counts), tuple(held), tuple(budgets))


async def held_in(engine: Engine, queue: str) -> list[HeldMail]:
    """The mails in ``queue`` (a retry queue) held for a fault of the smarthost or our config."""
    return [_held(queue, m) for m in await browse(engine, queue) if held_fault(m.headers) is not None]


async def held_mails(engine: Engine, prefix: str, retry_delays_ms: Sequence[int]) -> list[HeldMail]:
    """Every held mail of the retry queues (what ``queue_stats`` finds, without counting the other queues)."""
    held: list[HeldMail] = []
    for delay in sorted(set(retry_delays_ms)):
        held += await held_in(engine, retry_queue(prefix, delay))
    return held


def _held(queue: str, message: Message) -> HeldMail:
    h = message.headers
    holds = h.get("x-holds")
    try:
        recipients = read_recipients(h)
    except MessageDecodeError:
        recipients = ()
    return HeldMail(queue, message.message_id, held_fault(h) or "", holds if isinstance(holds, int) else 0, recipients)


async def queue_samples(engine: Engine, prefix: str, retry_delays_ms: Sequence[int],
                        subscriptions: Sequence[str]) -> list[QueueSample]:
    """Depth and oldest age per queue as ``opsrelay_queue_*`` and ``opsrelay status`` show them: the fixed
    queues by role (the retry steps summed as ``retry``), subscription queues by name. Undeclared: skipped."""
    retries = [retry_queue(prefix, d) for d in sorted(set(retry_delays_ms))]
    named = [("outbound", [outbound_queue(prefix)]), ("retry", retries), ("dead", [dead_queue(prefix)]),
             ("unrouted", [unrouted_queue(prefix)]), ("silenced", [silenced_queue(prefix)])]
    named += [(subscription_queue(prefix, s), [subscription_queue(prefix, s)]) for s in subscriptions]
    samples = [await sample_queues(engine, label, queues) for label, queues in named]
    return [s for s in samples if s is not None]


async def sample_queues(engine: Engine, label: str, queues: Sequence[str]) -> QueueSample | None:
    """Ready messages of ``queues`` summed, and the oldest one's age, as one sample; None when none is declared."""
    now = time.time()
    total, oldest, declared = 0, None, False
    for queue in queues:
        try:
            depth = await engine.depth(queue)
            head = await engine.oldest(queue) if depth else None
        except ConfigurationError:
            continue
        declared = True
        total += depth
        if head is not None:
            oldest = max(oldest or 0.0, now - head)
    return QueueSample(label, total, oldest) if declared else None
