"""A stateful subscription's memory, kept in its state queue (``<prefix>.state.<name>``).

The state is one JSON document (:class:`~relay.notify.state.State`); every
change is published as a new copy with a higher ``x-state-seq``, and the copy
before it is acked once the new one came back to us. So the queue always holds
the last saved state, held unacked by the relay that owns it; when that relay
dies, the broker hands the copy to the next one.

Ownership: the queue is declared single-active-consumer, so one relay at a time
receives the documents and may consume the subscription (the others stand by).
A relay that finds the queue empty publishes an empty document (sequence 0) so
that a fresh subscription has something to own; an owner drops such late copies.

RabbitMQ closes a channel whose delivery stays unacked past ``consumer_timeout``
(30 minutes by default), so an unchanged document is written again every
:data:`REFRESH` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from relay.contract.message import Message
from relay.engines.base import Delivery, Engine
from relay.errors import MessageDecodeError
from relay.notify.state import State

__all__ = ["REFRESH", "StateKeeper"]

log = logging.getLogger("opsrelay.relay")

REFRESH = 600.0
_CONTENT_TYPE = "application/vnd.opsrelay.state+json"


def _seq(delivery: Delivery) -> int:
    value = delivery.message.headers.get("x-state-seq")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


class StateKeeper:
    def __init__(self, engine: Engine, queue: str, *, settle: float = 0.05) -> None:
        self.engine = engine
        self.queue = queue
        self.settle = settle
        self.state = State()
        # The document as last saved (or loaded): what a failed turn goes back to.
        self.saved = self.state.dumps()
        self._token = secrets.token_hex(8)
        self._seq = -1
        self._held: Delivery | None = None
        self._held_seq = -1
        self._best: tuple[int, Delivery, State] | None = None
        self._loaded = asyncio.Event()
        self._written = time.monotonic()

    @property
    def loaded(self) -> asyncio.Event:
        """Set once this relay owns the queue and :attr:`state` holds the newest saved document."""
        return self._loaded

    def stale(self, now: float | None = None) -> bool:
        """True when the held copy should be written again (see :data:`REFRESH`)."""
        return (time.monotonic() if now is None else now) - self._written >= REFRESH

    async def save(self) -> None:
        """Publish the current state; returns once it is durable."""
        self._seq += 1
        body = self.state.dumps()
        message = Message(body, message_id=f"{self.queue}/{self._seq}", content_type=_CONTENT_TYPE,
                          headers={"x-state-seq": self._seq, "x-state-writer": self._token})
        await self.engine.send(self.queue, message)
        self.saved, self._written = body, time.monotonic()

    async def run(self) -> None:
        """Consume the state queue until cancelled (or the broker goes: BrokerUnavailable)."""
        if await self.engine.depth(self.queue) == 0:
            await self.engine.send(self.queue, Message(State().dumps(), message_id=f"{self.queue}/initial",
                                                       content_type=_CONTENT_TYPE, headers={"x-state-seq": 0}))
        loading: asyncio.Task[None] | None = None
        try:
            async for delivery in self.engine.consume(self.queue, prefetch=16):
                if self._loaded.is_set():
                    await self._take(delivery)
                    continue
                await self._candidate(delivery)
                if loading is None:
                    loading = asyncio.create_task(self._finish_loading())
        finally:
            if loading is not None:
                loading.cancel()

    async def _candidate(self, delivery: Delivery) -> None:
        """While loading: keep the copy with the highest sequence, ack the others."""
        if self._best is not None and _seq(delivery) <= self._best[0]:
            await delivery.ack()
            return
        try:
            state = State.loads(delivery.message.body)
        except MessageDecodeError as exc:
            log.error("relay: %s: dropped a state document that cannot be read: %s", self.queue, exc)
            await delivery.ack()
            return
        if self._best is not None:
            await self._best[1].ack()
        self._best = (_seq(delivery), delivery, state)

    async def _finish_loading(self) -> None:
        # Every ready copy is on its way to us once the queue shows none ready.
        while await self.engine.depth(self.queue) > 0:  # noqa: ASYNC110  (AMQP cannot notify a count)
            await asyncio.sleep(self.settle)
        await asyncio.sleep(self.settle)
        assert self._best is not None
        self._seq, self._held, self.state = self._best
        self._held_seq = self._seq
        self.saved = self._held.message.body
        self._written = time.monotonic()
        self._best = None
        log.info("relay: %s: state loaded (copy %d: %d digest(s) pending, %d outage(s) open)",
                 self.queue, self._seq, len(self.state.pending), len(self.state.outages))
        self._loaded.set()

    async def _take(self, delivery: Delivery) -> None:
        """A newer copy of ours replaces the one we held; anything else is an old or foreign copy.

        Newer, not only the latest: with saves in flight, copy N+1 may come back after N+2 was
        sent, and N+2 may never land; N+1 must then be the copy a restart finds.
        """
        seq = _seq(delivery)
        if delivery.message.headers.get("x-state-writer") != self._token or seq <= self._held_seq:
            if seq > self._held_seq and delivery.message.headers.get("x-state-writer") is not None:
                log.error("relay: %s: another relay wrote state copy %d; keeping ours (two owners?)",
                          self.queue, seq)
            await delivery.ack()
            return
        previous, self._held, self._held_seq = self._held, delivery, seq
        if previous is not None:
            await previous.ack()
