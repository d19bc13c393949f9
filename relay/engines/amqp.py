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
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
import pamqp.exceptions

from relay.contract.message import HeaderValue, Message
from relay.contract.names import lock_queue
from relay.contract.topology import QueueSpec, Topology
from relay.contract.urls import mask_url
from relay.engines.base import Delivery, Engine
from relay.errors import BrokerUnavailable, ConfigurationError, PermissionRefused

__all__ = ["QUEUE_TYPES", "UNLIMITED_DELIVERIES", "AmqpEngine", "queue_arguments"]

QUEUE_TYPES = ("classic", "quorum")
# Quorum queues count deliveries, peeks and browses included; RabbitMQ 4 drops (or dead-letters) a
# message past 20 by default. Queues whose messages are read on purpose again and again (dead
# letters, silences, state documents, heartbeats, retry steps) get this explicit limit instead.
UNLIMITED_DELIVERIES = 2**31 - 1

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
# How long read_all waits for another reader of the same queue before calling the broker unavailable.
_READ_LOCK_WAIT = 10.0


# RabbitMQ's words for a permission refused ("access to exchange 'x' in vhost '/' refused for user 'u'"):
# they name the resource, not which of configure, write or read was missing; the operation does.
_REFUSED = re.compile(r"access to (\w+) '([^']*)' in vhost '([^']*)' refused for user '([^']*)'")
# What each resource kind needs for the operations below (RabbitMQ's access control guide).
CONFIGURE, WRITE, READ = {"exchange": "configure", "queue": "configure"}, {"exchange": "write"}, {"queue": "read"}
BIND = {"exchange": "read", "queue": "write"}
LOCKED_READ = {"queue": "configure and read"}  # read_all declares and consumes its <queue>.lock too


def _refusal(exc: BaseException, needs: Mapping[str, str]) -> str | None:
    """One line naming the login, the permission and the resource; None: not a permission refusal."""
    found = _REFUSED.search(str(exc))
    if found is None:
        return None
    kind, name, vhost, user = found.groups()
    return (f"user {user!r} has no {needs.get(kind, 'access')} permission on {kind} {name!r} in vhost {vhost!r} "
            f"(see the README's least-privilege table, and `opsrelay check --connect --role ...`)")


@contextlib.contextmanager
def _translated(action: str, url: str, needs: Mapping[str, str] | None = None) -> Iterator[None]:
    """The one place where aio-pika's errors become ours. ``needs``: the permission per resource kind."""
    try:
        yield
    except aiormq.exceptions.ChannelAccessRefused as exc:
        refusal = _refusal(exc, needs or {})
        if refusal is None:
            raise BrokerUnavailable(f"{action}: {mask_url(url)} refused it ({exc})") from None
        raise PermissionRefused(f"{action}: {refusal}") from None
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
    except RuntimeError as exc:
        # aio-pika and aiormq say "the connection closed under us" (a node killed) with a bare RuntimeError
        # ("<Connection …> closed", "Connection was not opened"): that is the broker gone, not a bug of
        # ours, and must not make the relay dead-letter what it was handling. Any other one is raised.
        text = str(exc)
        if not (text.endswith(" closed") or text == "Connection was not opened"):
            raise
        raise BrokerUnavailable(f"{action}: {mask_url(url)} unavailable ({text})") from None


def queue_arguments(q: QueueSpec, queue_type: str, delivery_limit: int) -> dict[str, Any]:
    """The x-arguments of one queue: TTLs, dead-lettering, single active consumer, and the queue type."""
    args: dict[str, Any] = {}
    if q.ttl_ms is not None:
        # RabbitMQ expires messages only at the queue head, which is why every
        # backoff step has its own queue with one TTL (no head-of-line blocking).
        args["x-message-ttl"] = q.ttl_ms
    if q.dead_letter_to is not None:
        args["x-dead-letter-exchange"] = ""
        args["x-dead-letter-routing-key"] = q.dead_letter_to
    if q.single_active:
        args["x-single-active-consumer"] = True
    if queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if q.poison_to is not None and q.dead_letter_to is None:
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = q.poison_to
        args["x-delivery-limit"] = delivery_limit if q.poison_to is not None else UNLIMITED_DELIVERIES
        if "x-dead-letter-exchange" in args:
            # Dead-lettering that confirms like a publish (RabbitMQ 3.10+); it needs reject-publish.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    return args


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


# A channel whose close-ok never comes must not hold up a stop (seen when a consume RPC was cancelled).
_CLOSE_WITHIN = 5.0


async def _close_quietly(channel: aio_pika.abc.AbstractChannel) -> None:
    """Close ``channel`` (which returns its unacked deliveries); gone or slow is fine: the broker
    returns them anyway when the connection goes."""
    with contextlib.suppress(*_BROKER_ERRORS):
        await asyncio.wait_for(channel.close(), _CLOSE_WITHIN)


async def _never_called(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """The lock queue's consumer: nothing is ever published there."""


class AmqpEngine(Engine):
    def __init__(self, url: str, *, confirm_timeout: float = 5.0, connect_timeout: float = 5.0,
                 queue_type: str = "classic", delivery_limit: int = 20, alternates: Sequence[str] = (),
                 shuffle: bool = True, ca_file: str = "", cert_file: str = "", key_file: str = "",
                 auth: str = "plain") -> None:
        if queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type {queue_type!r} (one of {', '.join(QUEUE_TYPES)})")
        # The nodes of a cluster (broker.urls): tried in a random order per process, so that a fleet
        # spreads over them, and the next one when the one in use goes.
        self.addresses = list(dict.fromkeys([url, *alternates]))
        if shuffle:
            random.shuffle(self.addresses)
        self.url = self.addresses[0]
        # amqps: the certificate and host name are verified (aiormq's default context) against the system's
        # CAs or ca_file; cert_file/key_file present a client certificate; auth = "external" logs in with it.
        self._tls = {"cafile": ca_file, "certfile": cert_file, "keyfile": key_file,
                     "auth": "external" if auth == "external" else ""}
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = connect_timeout
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    def __repr__(self) -> str:
        return f"AmqpEngine({mask_url(self.url)!r})"

    def failover(self) -> bool:
        return len(self.addresses) > 1

    async def connect(self) -> None:
        lost = self.lost()
        if self._connection is not None and not self._connection.is_closed and self._channel is not None:
            if lost is None:
                if self._channel.is_closed:
                    # A refused declare or publish closes its channel (AMQP); the connection stays.
                    with _translated("connect", self.url):
                        await self._reopen_channel()
                return
            if not self.failover():
                # aio-pika's robust connection is getting the node back: no channel can open meanwhile.
                raise BrokerUnavailable(lost)
        await self.close()
        if lost is not None:
            # The node in use went: the others first, it last (it may be back by then).
            self.addresses.append(self.addresses.pop(self.addresses.index(self.url)))
        failure: BaseException | None = None
        for address in list(self.addresses):
            try:
                await self._connect_to(address)
            except BrokerUnavailable as exc:
                failure = exc
                continue
            self.url = address
            return
        assert failure is not None
        if self.failover():
            raise BrokerUnavailable(f"none of the {len(self.addresses)} broker addresses answered; "
                                    f"the last: {failure}") from None
        raise failure

    def _dial(self, url: str) -> str:
        """``url`` with the TLS settings as aiormq reads them (query parameters of an amqps URL)."""
        extra = {k: v for k, v in self._tls.items() if v}
        if not extra or not url.startswith("amqps://"):
            return url
        import urllib.parse

        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.urlencode({**dict(urllib.parse.parse_qsl(parts.query)), **extra})
        return urllib.parse.urlunsplit(parts._replace(query=query))

    async def _connect_to(self, url: str) -> None:
        connection: aio_pika.abc.AbstractRobustConnection | None = None
        try:
            with _translated("connect", url):
                connection = await aio_pika.connect_robust(self._dial(url), timeout=self.connect_timeout)
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

    async def declare(self, topology: Topology, *, use_existing: bool = False) -> None:
        await self.connect()
        try:
            await self._declare(topology)
        except PermissionRefused:
            if not use_existing:
                raise
            await self._reopen_channel()  # the refusal closed it
            await self._check_existing(topology)

    async def _declare(self, topology: Topology) -> None:
        channel = self._publish_channel()
        with _translated("declare", self.url, CONFIGURE):
            for ex in topology.exchanges:
                args: dict[str, Any] = {"alternate-exchange": ex.alternate} if ex.alternate else {}
                self._exchanges[ex.name] = await channel.declare_exchange(
                    ex.name, aio_pika.ExchangeType(ex.kind.value), durable=True, arguments=args
                )
            queues: dict[str, aio_pika.abc.AbstractQueue] = {}
            for q in topology.queues:
                qargs = queue_arguments(q, self.queue_type, self.delivery_limit)
                try:
                    queues[q.name] = await channel.declare_queue(q.name, durable=True, arguments=qargs)
                except aio_pika.exceptions.ChannelPreconditionFailed as exc:
                    if not (q.ttl_added_later and "x-message-ttl" in str(exc)):
                        raise ConfigurationError(self._mismatch(q.name, exc)) from None
                    _log.warning("queue %s exists without the TTL of %d ms this version gives it (declared by an "
                                 "older opsrelay); it keeps working as it is; delete it once to apply the TTL",
                                 q.name, q.ttl_ms)
                    channel = await self._reopen_channel()  # the refused declare closed it
                    queues = {q.name: await channel.declare_queue(q.name, passive=True)}  # the others: on it too
        with _translated("bind", self.url, BIND):
            for b in topology.bindings:
                queue = queues.get(b.queue) or await channel.declare_queue(b.queue, passive=True)
                await queue.bind(b.exchange, routing_key=b.pattern)

    async def _check_existing(self, topology: Topology) -> None:
        """Every exchange and queue of ``topology`` exists (passive declares need no permission)."""
        assert self._connection is not None
        names = [("exchange", e.name) for e in topology.exchanges] + [("queue", q.name) for q in topology.queues]
        for kind, name in names:
            try:
                async with self._connection.channel() as channel:  # a missing one closes its channel
                    if kind == "exchange":
                        await channel.declare_exchange(name, passive=True)
                    else:
                        await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                raise PermissionRefused(
                    f"declare: {kind} {name!r} does not exist and this login may not configure it: start a relay "
                    "first (it declares every opsrelay object), or grant configure on it") from None
            except _BROKER_ERRORS as exc:
                raise BrokerUnavailable(f"declare: {mask_url(self.url)} unavailable ({exc})") from None
        _log.debug("declare: no configure permission; %d objects a relay declared are there", len(names))

    def _mismatch(self, queue: str, exc: Exception) -> str:
        """One line: which queue, and what to do about it."""
        reason = str(exc).split(" - ", 1)[-1].split(" for queue ")[0]
        return (f"queue {queue} exists with other arguments ({reason}); broker.queue_type is {self.queue_type!r}: "
                f"if the queue was made as the other type, stop the relays and run `opsrelay migrate-queues`")

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
            # AMQP's timestamp property (seconds); it survives dead-lettering: the age of a queue's head.
            timestamp=datetime.now(UTC),
        )
        with _translated(f"publish to {exchange or 'queue ' + routing_key}", self.url, WRITE):
            target = await self._exchange(exchange)
            await target.publish(amqp_message, routing_key, mandatory=True, timeout=self.confirm_timeout)

    async def check_publish(self, exchange: str, routing_key: str) -> None:
        """A publish inside a transaction, rolled back: RabbitMQ checks the write permission at the publish
        and refuses it at the rollback, and nothing reaches a queue either way."""
        await self.connect()
        assert self._connection is not None
        with _translated(f"publish to {exchange or 'queue ' + routing_key}", self.url, WRITE):
            async with self._connection.channel(publisher_confirms=False) as channel:
                transaction = channel.transaction()
                await transaction.select()
                target = channel.default_exchange if exchange == "" else await channel.get_exchange(exchange)
                await target.publish(aio_pika.Message(b"", headers={"x-opsrelay-check": "rolled back"}), routing_key)
                await transaction.rollback()

    async def consume(self, queue: str, *, prefetch: int = 10,
                      subscribed: asyncio.Event | None = None) -> AsyncIterator[Delivery]:
        await self.connect()
        assert self._connection is not None
        with _translated(f"consume {queue}", self.url, READ):
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            amqp_queue = await channel.declare_queue(queue, passive=True)
        try:
            with _translated(f"consume {queue}", self.url, READ):
                async with amqp_queue.iterator() as incoming:
                    if subscribed is not None:
                        subscribed.set()  # basic.consume-ok came back
                    async for raw in incoming:
                        yield _AmqpDelivery(raw, self.url)
        finally:
            # Closing the channel returns every unacked delivery to the queue.
            await _close_quietly(channel)

    async def get(self, queue: str) -> Delivery | None:
        await self.connect()
        channel = self._publish_channel()
        with _translated(f"get from {queue}", self.url, READ):
            amqp_queue = await channel.declare_queue(queue, passive=True)
            raw = await amqp_queue.get(no_ack=False, fail=False)
        return None if raw is None else _AmqpDelivery(raw, self.url)

    def lost(self) -> str | None:
        connection = self._connection
        # connect_robust reconnects on its own and never raises: a consumer just stops receiving.
        connected: asyncio.Event | None = getattr(connection, "connected", None)
        if connection is not None and not connection.is_closed and connected is not None and not connected.is_set():
            return f"connection to {mask_url(self.url)} lost; reconnecting"
        return None

    async def oldest(self, queue: str) -> float | None:
        await self.connect()
        assert self._connection is not None
        if self.queue_type == "quorum":
            # A peek is a delivery to a quorum queue: it would count towards the delivery limit.
            return None
        with _translated(f"inspect {queue}", self.url, READ):
            # RabbitMQ cannot peek: take the head unacked and put it back (classic queues keep its place).
            async with self._connection.channel() as channel:
                declared = await channel.declare_queue(queue, passive=True)
                if not declared.declaration_result.message_count:
                    return None
                raw = await declared.get(no_ack=False, fail=False)
                if raw is None:
                    return None
                stamp = raw.timestamp
                await raw.reject(requeue=True)
        return None if stamp is None else stamp.timestamp()

    async def read_all(self, queue: str, *, drop: Callable[[Message], bool] | None = None) -> list[Message]:
        """Under a lock (an exclusive consumer on the transient ``<queue>.lock``, which RabbitMQ gives to one
        channel at a time and takes back when it closes, even when the process dies): take every message
        unacked, ack the dropped, and close the channel, which puts the rest back in their order."""
        await self.connect()
        assert self._connection is not None
        give_up = time.monotonic() + _READ_LOCK_WAIT
        pause = 0.01
        while True:
            with _translated(f"read {queue}", self.url, LOCKED_READ):
                lock_channel = await self._connection.channel()
                try:
                    # Classic and transient whatever broker.queue_type says: quorum queues do not enforce
                    # an exclusive consumer, and a transient queue is made again on a live node when
                    # its node goes; it deletes itself when the lock is let go.
                    lock = await lock_channel.declare_queue(lock_queue(queue), durable=False, auto_delete=True,
                                                            arguments={"x-queue-type": "classic"})
                    try:
                        await lock.consume(_never_called, exclusive=True)
                    except (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelNotFoundEntity) as exc:
                        if _refusal(exc, LOCKED_READ) is not None:
                            raise  # no read permission on the lock: not another reader
                        # another reader has it (or let it go just now); the refusal closed this channel
                    else:
                        return await self._read_locked(queue, drop)
                finally:
                    await _close_quietly(lock_channel)
            if time.monotonic() > give_up:
                raise BrokerUnavailable(f"read {queue}: another reader held it for {_READ_LOCK_WAIT:g}s")
            await asyncio.sleep(pause)
            pause = min(0.2, pause * 2)

    async def _read_locked(self, queue: str, drop: Callable[[Message], bool] | None) -> list[Message]:
        assert self._connection is not None
        kept: list[Message] = []
        async with self._connection.channel() as channel:
            declared = await channel.declare_queue(queue, passive=True)
            while (raw := await declared.get(no_ack=False, fail=False)) is not None:
                message = _AmqpDelivery(raw, self.url).message
                if drop is not None and drop(message):
                    await raw.ack()
                else:
                    kept.append(message)
        return kept

    async def _inspect(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of ``queue``; ConfigurationError when it does not exist."""
        await self.connect()
        assert self._connection is not None
        with _translated(f"inspect {queue}", self.url):
            # A passive declare of a missing queue closes its channel: use a throwaway one.
            async with self._connection.channel() as channel:
                result = (await channel.declare_queue(queue, passive=True)).declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def consumers(self, queue: str) -> int:
        """Consumers attached to ``queue`` (ConfigurationError when it does not exist)."""
        return (await self._inspect(queue))[1]

    async def delete_queue(self, queue: str, *, if_empty: bool) -> None:
        """Delete ``queue``; ``if_empty``: only if it is empty, which the broker checks (classic queues only:
        quorum queues refuse the flag, and closing the connection for it)."""
        await self.connect()
        assert self._connection is not None
        with _translated(f"delete {queue}", self.url, CONFIGURE):
            async with self._connection.channel() as channel:
                await channel.queue_delete(queue, if_unused=False, if_empty=if_empty)

    async def depth(self, queue: str) -> int:
        return (await self._inspect(queue))[0]
