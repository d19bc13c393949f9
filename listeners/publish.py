"""A blocking publisher for the listener loop, over any engine.

The eventlistener loop is synchronous (it owns stdin/stdout), while engines are
asyncio. The engine lives on its own event loop in a daemon thread, so the
connection keeps its heartbeats between events, and each publish waits for the
broker's confirm for at most a bounded time: supervisord is never held longer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

from relay.config import Config
from relay.engines.base import Engine, Message, open_engine
from relay.errors import BrokerUnavailable, RelayError
from relay.event import CONTENT_TYPE, Event, encode_event
from relay.routing import event_key
from relay.topology import event_topology, events_exchange

__all__ = ["EnginePublisher", "make_publisher"]

log = logging.getLogger("opsrelay.listener")


class EnginePublisher:
    def __init__(self, url: str, prefix: str, *, timeout: float = 5.0) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self._engine: Engine = open_engine(url, confirm_timeout=timeout)
        self._declared = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opsrelay-publisher", daemon=True)
        self._thread.start()

    async def _publish(self, event: Event) -> None:
        if not self._declared:
            await self._engine.connect()
            await self._engine.declare(event_topology(self.prefix))
            self._declared = True
        message = Message(encode_event(event), message_id=event.id, content_type=CONTENT_TYPE)
        key = event_key(event.host, event.group, event.process, event.state)
        await self._engine.publish(events_exchange(self.prefix), key, message)

    def publish(self, event: Event) -> None:
        """Return once the event is durable; raise a RelayError otherwise (the caller answers FAIL)."""
        future = asyncio.run_coroutine_threadsafe(self._publish(event), self._loop)
        try:
            # Connect + declare + confirm, each bounded by ``timeout`` inside the engine.
            future.result(timeout=self.timeout * 3)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._declared = False
            raise BrokerUnavailable(f"no confirm within {self.timeout * 3:.1f}s") from None
        except RelayError:
            self._declared = False
            raise

    def tick(self) -> None:
        """Called on supervisord TICK events: nothing to do without a spool."""

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._engine.close(), self._loop).result(timeout=self.timeout)
        except (concurrent.futures.TimeoutError, RelayError) as exc:
            log.warning("closing the broker connection: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self.timeout)


def make_publisher(config: Config) -> EnginePublisher:
    """The publisher ``opsrelay listen`` uses for this config."""
    broker = config.broker
    return EnginePublisher(broker.url, broker.prefix, timeout=broker.confirm_timeout)
