"""Blocking publishers for the listener loop, over any engine.

The eventlistener loop is synchronous (it owns stdin/stdout), while engines are
asyncio. Each engine lives on its own event loop in a daemon thread
(:class:`LoopThread`), so a connection keeps its heartbeats between events, and
every call from the loop waits a bounded time: supervisord is never held longer.

:func:`make_publisher` picks what ``opsrelay listen`` uses: with an AMQP broker,
a :class:`listeners.spool.SpoolingPublisher` (store-and-forward while the broker
is away); with the embedded engine, the plain :class:`EnginePublisher` (the
queue is a local fsynced file already, a spool would only copy it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from listeners.eventlistener import Publisher
from relay.config import Config
from relay.engines.base import Engine, Message, open_engine
from relay.errors import BrokerUnavailable, RelayError
from relay.event import CONTENT_TYPE, Event, encode_event
from relay.routing import event_key, supervisor_key
from relay.topology import event_topology, events_exchange

__all__ = ["EnginePublisher", "ListenerPublisher", "LoopThread", "Upstream", "event_message", "make_publisher"]

log = logging.getLogger("opsrelay.listener")
_T = TypeVar("_T")


class ListenerPublisher(Publisher, Protocol):
    """What ``opsrelay listen`` drives: publish per event, tick on TICK_* events, close at exit."""

    def tick(self) -> None: ...

    def close(self) -> None: ...


class Upstream(Protocol):
    """Where events go in the end: the broker's events exchange (the spool forwards through this)."""

    def send(self, routing_key: str, message: Message, *, timeout: float) -> None:
        """Return once the broker confirmed; raise a RelayError within about ``timeout`` otherwise."""

    def close(self) -> None: ...


def event_message(event: Event) -> tuple[str, Message]:
    """The routing key and the message of an event (DESIGN.md: the public event contract).

    supervisord's own state changes go to ``sup.<host>.<STATE>``, so that no ``proc.`` binding sees them.
    """
    if event.is_supervisor:
        key = supervisor_key(event.host, event.state)
    else:
        key = event_key(event.host, event.group, event.process, event.state)
    return key, Message(encode_event(event), message_id=event.id, content_type=CONTENT_TYPE)


class LoopThread:
    """An asyncio loop in a daemon thread, called from blocking code with a bound on every call."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], *, timeout: float, what: str) -> _T:
        """The coroutine's result; BrokerUnavailable (and the coroutine cancelled) after ``timeout``."""
        if not self._thread.is_alive():
            coro.close()
            raise BrokerUnavailable(f"{what}: the publisher is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BrokerUnavailable(f"{what}: no answer within {timeout:.1f}s") from None
        except concurrent.futures.CancelledError:
            raise BrokerUnavailable(f"{what}: cancelled") from None

    def stop(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=timeout)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()


class EnginePublisher:
    """Publishes events to ``<prefix>.events`` through one engine, waiting for its confirm."""

    def __init__(self, url: str, prefix: str, *, timeout: float = 5.0) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self._engine: Engine = open_engine(url, confirm_timeout=timeout)
        self._declared = False
        self._lock: asyncio.Lock | None = None  # made on the loop (the forwarder and the loop share us)
        self._thread = LoopThread("opsrelay-publisher")

    async def _send(self, routing_key: str, message: Message) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                if not self._declared:
                    await self._engine.connect()
                    await self._engine.declare(event_topology(self.prefix))
                    self._declared = True
                await self._engine.publish(events_exchange(self.prefix), routing_key, message)
            except BaseException:
                # Cancelled by a timeout included: declare again on the next try, the broker may be new.
                self._declared = False
                raise

    def send(self, routing_key: str, message: Message, *, timeout: float) -> None:
        """Connect, declare and publish within ``timeout`` in all; RelayError otherwise."""
        self._thread.run(self._send(routing_key, message), timeout=timeout, what="publish")

    def publish(self, event: Event) -> None:
        """Return once the event is durable; raise a RelayError otherwise (the caller answers FAIL)."""
        key, message = event_message(event)
        # Connect + declare + confirm, each bounded by ``timeout`` inside the engine.
        self.send(key, message, timeout=self.timeout * 3)

    def tick(self) -> None:
        """Called on supervisord TICK events: nothing to do without a spool."""

    def close(self) -> None:
        try:
            self._thread.run(self._engine.close(), timeout=self.timeout, what="close")
        except RelayError as exc:
            log.warning("closing the broker connection: %s", exc)
        self._thread.stop(timeout=self.timeout)


def make_publisher(config: Config) -> ListenerPublisher:
    """The publisher ``opsrelay listen`` uses for this config."""
    broker = config.broker
    upstream = EnginePublisher(broker.url, broker.prefix, timeout=broker.confirm_timeout)
    if broker.url.partition(":")[0].lower() == "sqlite":
        return upstream
    from listeners.spool import Spool, SpoolingPublisher

    return SpoolingPublisher(upstream, Spool(broker.spool, broker.prefix), confirm_timeout=broker.confirm_timeout)
