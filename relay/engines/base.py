"""The Engine interface: what the listener, sendmail and relay need from a broker.

Both engines give the same semantics: a durable topic exchange with AMQP's
wildcard rules and an alternate exchange, durable queues, publish that returns
only once the message is durable, ack/reject, per-queue TTL that dead-letters
into another queue (delayed retry). Errors leave an engine only as
:mod:`relay.errors` classes (``BrokerUnavailable`` above all).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
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
    async def declare(self, topology: Topology) -> None:
        """Create exchanges, queues and bindings; idempotent."""

    @abc.abstractmethod
    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        """Publish persistently; returns once the broker confirmed it durable.

        ``exchange=""`` is the default exchange: ``routing_key`` names a queue.
        """

    async def send(self, queue: str, message: Message) -> None:
        await self.publish("", queue, message)

    @abc.abstractmethod
    def consume(self, queue: str, *, prefetch: int = 10) -> AsyncIterator[Delivery]:
        """Deliveries from ``queue`` until cancelled; unsettled ones return to the queue."""

    @abc.abstractmethod
    async def get(self, queue: str) -> Delivery | None:
        """One delivery from ``queue`` or None when empty (for inspection commands)."""

    @abc.abstractmethod
    async def depth(self, queue: str) -> int:
        """Ready messages in ``queue``."""

    async def __aenter__(self) -> Engine:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
