"""The Engine interface: what the listener, sendmail and relay need from a broker.

Both engines give the same semantics: a durable topic exchange with AMQP's
wildcard rules and an alternate exchange, durable queues, publish that returns
only once the message is durable, ack/reject, per-queue TTL that dead-letters
into another queue (delayed retry). Errors leave an engine only as
:mod:`relay.errors` classes (``BrokerUnavailable`` above all).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Protocol

from relay.contract.message import Message
from relay.contract.topology import Topology

__all__ = ["Delivery", "Engine"]


class Delivery(Protocol):
    """A consumed message; exactly one of ack or reject settles it."""

    @property
    def message(self) -> Message: ...

    @property
    def redelivered(self) -> bool: ...

    async def ack(self) -> None: ...

    async def reject(self, *, requeue: bool) -> None: ...


class Engine(abc.ABC):
    """A connection to one broker. Use as ``async with open_engine(url) as engine``."""

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def declare(self, topology: Topology, *, use_existing: bool = False) -> None:
        """Create exchanges, queues and bindings; idempotent.

        ``use_existing``: a publisher whose login may not configure (least privilege) uses what a relay
        declared, once it checked that every exchange and queue of ``topology`` exists.
        """

    @abc.abstractmethod
    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """Publish persistently; returns once the broker confirmed it durable.

        ``exchange=""`` is the default exchange: ``routing_key`` names a queue.
        """

    async def send(self, queue: str, message: Message) -> None:
        await self.publish("", queue, message)

    @abc.abstractmethod
    async def check_publish(self, exchange: str, routing_key: str) -> None:
        """PermissionRefused unless this login may publish to ``exchange``; nothing is delivered."""

    @abc.abstractmethod
    def consume(self, queue: str, *, prefetch: int = 10,
                subscribed: asyncio.Event | None = None) -> AsyncIterator[Delivery]:
        """Deliveries from ``queue`` until cancelled; unsettled ones return to the queue.

        ``subscribed`` is set once the broker has the consumer (or has it standing by, for a
        single-active queue): what ``/-/ready`` waits for.
        """

    @abc.abstractmethod
    async def get(self, queue: str) -> Delivery | None:
        """One delivery from ``queue`` or None when empty (for inspection commands)."""

    @abc.abstractmethod
    async def depth(self, queue: str) -> int:
        """Ready messages in ``queue``."""

    @abc.abstractmethod
    async def oldest(self, queue: str) -> float | None:
        """When (unix time) the oldest ready message of ``queue`` was queued; None when empty or unknown."""

    @abc.abstractmethod
    async def read_all(self, queue: str, *, drop: Callable[[Message], bool] | None = None) -> list[Message]:
        """Every message of ``queue``, oldest first, left in place: one consistent view of a small queue
        used as a table (silences, relay heartbeats), which several processes may read at once.

        Messages ``drop`` says yes to are removed instead of kept (and not returned).
        """

    def failover(self) -> bool:
        """Another address could take over when the one in use goes (a RabbitMQ cluster's nodes)."""
        return False

    def lost(self) -> str | None:
        """Why the connection to the broker is gone while the engine tries to get it back (None: it is not)."""
        return None

    async def __aenter__(self) -> Engine:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
