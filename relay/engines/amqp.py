"""The RabbitMQ engine (aio-pika). aio-pika's and aiormq's exceptions are translated here only.

Publishing uses a channel with publisher confirms and ``mandatory`` set, so a
publish returns only once RabbitMQ has the message on disk (persistent message
to a durable queue) and a message no queue would take raises instead of
vanishing. Each consumer gets its own channel so its prefetch is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
import pamqp.exceptions

from relay.contract.message import HeaderValue, Message
from relay.contract.topology import Topology
from relay.contract.urls import mask_url
from relay.engines.base import Delivery, Engine
from relay.errors import BrokerUnavailable, ConfigurationError

__all__ = ["AmqpEngine"]

# aio-pika's CONNECTION_EXCEPTIONS also holds bare RuntimeError and StopAsyncIteration: a bug of
# ours must not pass for "broker unavailable", so list the library's own classes instead.
_BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    pamqp.exceptions.PAMQPException,
)


_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _translated(action: str, url: str) -> Iterator[None]:
    """The one place where aio-pika's errors become ours."""
    try:
        yield
    except aio_pika.exceptions.PublishError as exc:
        raise ConfigurationError(f"{action}: the broker could not route the message ({exc})") from None
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigurationError(f"{action}: {exc} (declared earlier with other arguments?)") from None
    except aio_pika.exceptions.ChannelNotFoundEntity as exc:
        raise ConfigurationError(f"{action}: {exc}") from None
    except aio_pika.exceptions.ProbableAuthenticationError as exc:
        raise BrokerUnavailable(f"{action}: {mask_url(url)} refused the login ({exc})") from None
    except _BROKER_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise BrokerUnavailable(f"{action}: {mask_url(url)} unavailable ({reason})") from None


class _AmqpDelivery:
    __slots__ = ("_incoming", "_url", "message")

    def __init__(self, incoming: aio_pika.abc.AbstractIncomingMessage, url: str) -> None:
        self._incoming = incoming
        self._url = url
        headers: dict[str, HeaderValue] = {}
        for key, value in (incoming.headers or {}).items():
            headers[key] = value.decode() if isinstance(value, bytes) else value  # type: ignore[assignment]
        self.message = Message(
            body=incoming.body,
            message_id=incoming.message_id or "",
            content_type=incoming.content_type or "application/octet-stream",
            headers=headers,
            routing_key=incoming.routing_key or "",
        )

    @property
    def redelivered(self) -> bool:
        return bool(self._incoming.redelivered)

    async def ack(self) -> None:
        with _translated("ack", self._url):
            await self._incoming.ack()

    async def reject(self, *, requeue: bool) -> None:
        with _translated("reject", self._url):
            await self._incoming.reject(requeue=requeue)


class AmqpEngine(Engine):
    def __init__(self, url: str, *, confirm_timeout: float = 5.0, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = connect_timeout
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    def __repr__(self) -> str:
        return f"AmqpEngine({mask_url(self.url)!r})"

    async def connect(self) -> None:
        if self._connection is not None and not self._connection.is_closed and self._channel is not None:
            return
        await self.close()
        connection: aio_pika.abc.AbstractRobustConnection | None = None
        try:
            with _translated("connect", self.url):
                connection = await aio_pika.connect_robust(self.url, timeout=self.connect_timeout)
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            # Cancelled (a caller's bound ran out) or failed half-way: keep no half-open state,
            # or every later call would find a connection without a channel.
            if connection is not None:
                with contextlib.suppress(*_BROKER_ERRORS):
                    await connection.close()
            raise
        self._connection, self._channel, self._exchanges = connection, channel, {}

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await connection.close()

    async def _reopen_channel(self) -> aio_pika.abc.AbstractChannel:
        assert self._connection is not None
        self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._exchanges = {}  # they were bound to the closed channel
        return self._channel

    def _publish_channel(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None:
            raise BrokerUnavailable(f"not connected to {mask_url(self.url)}")
        return self._channel

    async def declare(self, topology: Topology) -> None:
        await self.connect()
        channel = self._publish_channel()
        with _translated("declare", self.url):
            for ex in topology.exchanges:
                args: dict[str, Any] = {"alternate-exchange": ex.alternate} if ex.alternate else {}
                self._exchanges[ex.name] = await channel.declare_exchange(
                    ex.name, aio_pika.ExchangeType(ex.kind.value), durable=True, arguments=args
                )
            queues: dict[str, aio_pika.abc.AbstractQueue] = {}
            for q in topology.queues:
                qargs: dict[str, Any] = {}
                if q.ttl_ms is not None:
                    # RabbitMQ expires messages only at the queue head, which is why every
                    # backoff step has its own queue with one TTL (no head-of-line blocking).
                    qargs["x-message-ttl"] = q.ttl_ms
                if q.dead_letter_to is not None:
                    qargs["x-dead-letter-exchange"] = ""
                    qargs["x-dead-letter-routing-key"] = q.dead_letter_to
                if q.single_active:
                    qargs["x-single-active-consumer"] = True
                try:
                    queues[q.name] = await channel.declare_queue(q.name, durable=True, arguments=qargs)
                except aio_pika.exceptions.ChannelPreconditionFailed:
                    if not q.ttl_added_later:
                        raise
                    _log.warning("queue %s exists without the TTL of %d ms this version gives it (declared by an "
                                 "older opsrelay); it keeps working as it is; delete it once to apply the TTL",
                                 q.name, q.ttl_ms)
                    channel = await self._reopen_channel()  # the refused declare closed it
                    queues = {q.name: await channel.declare_queue(q.name, passive=True)}  # the others: on it too
            for b in topology.bindings:
                queue = queues.get(b.queue) or await channel.declare_queue(b.queue, passive=True)
                await queue.bind(b.exchange, routing_key=b.pattern)

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        channel = self._publish_channel()
        if name == "":
            return channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await channel.get_exchange(name, ensure=True)
        return self._exchanges[name]

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        await self.connect()
        amqp_message = aio_pika.Message(
            body=message.body,
            message_id=message.message_id,
            content_type=message.content_type,
            headers=dict(message.headers),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        with _translated(f"publish to {exchange or 'queue ' + routing_key}", self.url):
            target = await self._exchange(exchange)
            await target.publish(amqp_message, routing_key, mandatory=True, timeout=self.confirm_timeout)

    async def consume(self, queue: str, *, prefetch: int = 10) -> AsyncIterator[Delivery]:
        await self.connect()
        assert self._connection is not None
        with _translated(f"consume {queue}", self.url):
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            amqp_queue = await channel.declare_queue(queue, passive=True)
        try:
            with _translated(f"consume {queue}", self.url):
                async with amqp_queue.iterator() as incoming:
                    async for raw in incoming:
                        yield _AmqpDelivery(raw, self.url)
        finally:
            # Closing the channel returns every unacked delivery to the queue.
            with contextlib.suppress(*_BROKER_ERRORS):
                await channel.close()

    async def get(self, queue: str) -> Delivery | None:
        await self.connect()
        channel = self._publish_channel()
        with _translated(f"get from {queue}", self.url):
            amqp_queue = await channel.declare_queue(queue, passive=True)
            raw = await amqp_queue.get(no_ack=False, fail=False)
        return None if raw is None else _AmqpDelivery(raw, self.url)

    async def depth(self, queue: str) -> int:
        await self.connect()
        assert self._connection is not None
        with _translated(f"inspect {queue}", self.url):
            # A passive declare of a missing queue closes its channel: use a throwaway one.
            async with self._connection.channel() as channel:
                declared = await channel.declare_queue(queue, passive=True)
                count = declared.declaration_result.message_count
        return int(count or 0)
