"""Sending budgets (``max_per_minute``, ``max_per_day`` per smarthost), counted in the broker.

Each mail a smarthost accepted is one small message in ``<prefix>.budget.<host_port>.<window>``,
a queue whose messages expire after the window and are dropped: the queue's depth is what was
sent in the last window, on both engines, across restarts, and for every relay of a fleet that
shares the broker. The oldest message says when the window frees a place again.

Two relays may both see the last free place and send: a fleet of N relays can go N-1 mails over
a budget within one window; one relay does not (it counts under a lock per smarthost), except
by one while ``opsrelay queue`` looks at the oldest counted mail (taken and put back: a queue
cannot be peeked at on RabbitMQ), which hides that mail from the count for that moment.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

from relay.config.smarthost import SmarthostConfig
from relay.contract.envelope import new_mail_id
from relay.contract.message import Message
from relay.contract.names import budget_queue
from relay.engines.base import Engine
from relay.errors import RelayError

__all__ = ["WINDOWS", "BudgetUse", "EngineBudget", "budget_queues", "windows"]

# (name, seconds)
WINDOWS = (("minute", 60), ("day", 86400))
CONTENT_TYPE = "text/plain"


def windows(smarthost: SmarthostConfig) -> list[tuple[str, int, int]]:
    """(window, seconds, limit) of each budget set on ``smarthost`` (0 is no limit)."""
    limits = {"minute": smarthost.max_per_minute, "day": smarthost.max_per_day}
    return [(name, seconds, limits[name]) for name, seconds in WINDOWS if limits[name] > 0]


def budget_queues(prefix: str, smarthosts: Sequence[SmarthostConfig]) -> list[tuple[str, int]]:
    """The counter queues to declare, with their windows in ms."""
    return [(budget_queue(prefix, s.name, name), seconds * 1000) for s in smarthosts
            for name, seconds, _ in windows(s)]


class BudgetUse:
    """One window of one smarthost as ``opsrelay queue`` shows it."""

    def __init__(self, smarthost: str, window: str, used: int, limit: int, until: float | None) -> None:
        self.smarthost, self.window, self.used, self.limit, self.until = smarthost, window, used, limit, until

    def to_dict(self) -> dict[str, object]:
        return {"smarthost": self.smarthost, "window": self.window, "used": self.used, "limit": self.limit,
                "until": self.until}


class EngineBudget:
    """The :class:`~relay.delivery.outcome.Budget` of the relay's engine."""

    def __init__(self, engine: Engine, prefix: str) -> None:
        self._engine = engine
        self._prefix = prefix

    async def use(self, smarthost: SmarthostConfig) -> list[BudgetUse]:
        """Each budget window of ``smarthost``: how much is used, and when a place frees if none is left."""
        uses = []
        for name, seconds, limit in windows(smarthost):
            queue = budget_queue(self._prefix, smarthost.name, name)
            used = await self._engine.depth(queue)
            until = None
            if used >= limit:
                until = await self._frees(queue, seconds)
                # The oldest may have expired between the two reads: then a place is free now.
                used = await self._engine.depth(queue)
                if used < limit:
                    until = None
            uses.append(BudgetUse(smarthost.name, name, used, limit, until))
        return uses

    async def exhausted(self, smarthost: SmarthostConfig) -> float | None:
        frees = [u.until for u in await self.use(smarthost) if u.until is not None]
        return max(frees) if frees else None

    async def spend(self, smarthost: SmarthostConfig) -> None:
        now = str(time.time())
        for name, _, _ in windows(smarthost):
            await self._engine.send(budget_queue(self._prefix, smarthost.name, name),
                                    Message(now.encode(), new_mail_id(), CONTENT_TYPE))

    async def _frees(self, queue: str, seconds: int) -> float:
        """When the oldest counted mail leaves the window (now + a second if it cannot be read)."""
        delivery = await self._engine.get(queue)
        if delivery is None:
            return time.time()
        try:
            return float(delivery.message.body.decode()) + seconds
        except ValueError:
            return time.time() + 1.0
        finally:
            with contextlib.suppress(RelayError):
                await delivery.reject(requeue=True)
