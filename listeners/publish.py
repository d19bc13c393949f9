"""Blocking publishers for the listener loop, over any engine.

The eventlistener loop is synchronous (it owns stdin/stdout), while engines are
asyncio. Each engine lives on its own event loop in a daemon thread
(:class:`listeners.bridge.LoopThread`), so a connection keeps its heartbeats between
events, and every call from the loop waits a bounded time: supervisord is never held
longer. :func:`listeners.factory.make_publisher` picks which publisher ``opsrelay listen`` uses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from listeners.bridge import LoopThread
from listeners.eventlistener import Publisher
from relay.contract.event import Event, event_message
from relay.contract.message import Message
from relay.contract.names import events_exchange
from relay.contract.topology import event_topology
from relay.engines import open_engine
from relay.engines.base import Engine
from relay.errors import RelayError

__all__ = ["EnginePublisher", "ListenerPublisher", "Upstream"]

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


class EnginePublisher:
    """Publishes events to ``<prefix>.events`` through one engine, waiting for its confirm."""

    def __init__(self, url: str, prefix: str, *, timeout: float = 5.0,
                 options: Mapping[str, Any] | None = None) -> None:
        """``options``: the broker's engine options (confirm_timeout, queue type: the unrouted queue it
        declares must be the relay's type, the cluster's other nodes)."""
        self.prefix = prefix
        options = dict(options or {"confirm_timeout": timeout})
        self.timeout = options["confirm_timeout"]
        self._engine: Engine = open_engine(url, **options)
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
                    # A listener login may not configure (least privilege): then a relay declared these.
                    await self._engine.declare(event_topology(self.prefix), use_existing=True)
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
