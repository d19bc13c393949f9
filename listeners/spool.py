"""Store-and-forward for the listener while the AMQP broker is away.

The spool is the embedded engine's file at ``broker.spool`` (0600, WAL, fsync
on commit), holding one topic exchange and one queue, both ``<prefix>.spool``,
bound with ``#``: a spooled row keeps the event's routing key and body. A
forwarder thread sends the rows to the broker's events exchange oldest first.

Rules (DESIGN.md: a listener acks supervisord only after a broker confirm or
an fsync in the spool):

* While the spool holds anything, a new event goes to the spool too, behind
  the older ones, and the forwarder is woken: events reach the broker in order.
* A row leaves the spool only after the broker confirmed it. A crash between
  that confirm and the row's removal sends it once more (by the next process,
  whose engine takes back a dead process's leased rows): at-least-once, and the
  event ``id`` (the AMQP ``message_id``) is stable, so a duplicate can be told.
* The broker does not confirm within ``confirm_timeout``: the event is spooled,
  and until a forward succeeds later events go to the spool without trying the
  broker. The forwarder probes it on later events, on TICK_* and on its own
  timer, no more often than the backoff allows (0.5 s doubling to 5 s).
* Neither the broker nor the spool takes the event (disk full): ``publish``
  raises, the loop answers FAIL and supervisord keeps the event.
* Rows left by an earlier process are found at start and forwarded first.

How long supervisord waits for one answer (the hold bound):

===============================================  ==========================================
broker healthy, spool empty                      one confirm (at most ``confirm_timeout``)
broker fails on this event                       ``confirm_timeout`` + one spool commit
broker known down, or spool not empty            one spool commit (an fsync: milliseconds)
spool fails too                                  at most ``confirm_timeout`` + ``SPOOL_TIMEOUT``
===============================================  ==========================================

A spool commit is bounded by ``SPOOL_TIMEOUT`` (the write lock wait included).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from listeners.bridge import LoopThread
from listeners.publish import Upstream
from relay.contract.event import Event, event_message
from relay.contract.message import Message
from relay.contract.names import spool_name
from relay.contract.topology import spool_topology
from relay.engines.base import Delivery
from relay.engines.sqlite import SqliteEngine, db_path
from relay.errors import BrokerUnavailable, RelayError
from relay.timing import doubling

__all__ = ["SPOOL_TIMEOUT", "Spool", "SpoolingPublisher", "spool_name", "spool_topology"]

log = logging.getLogger("opsrelay.listener")
_T = TypeVar("_T")

SPOOL_TIMEOUT = 5.0


class Spool:
    """The spool queue in the embedded engine, for blocking callers; each call bounded by ``timeout``."""

    def __init__(self, url: str, prefix: str, *, timeout: float = SPOOL_TIMEOUT) -> None:
        self.path = db_path(url)
        self.prefix = prefix
        self.name = spool_name(prefix)
        self.timeout = timeout
        self._engine = SqliteEngine(url, busy_timeout=timeout)
        self._open = False
        self._lock: asyncio.Lock | None = None
        self._thread = LoopThread("opsrelay-spool")

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._thread.run(coro, timeout=self.timeout, what=f"spool {self.path}")

    async def _ready(self) -> None:
        # Opened on first use and again after a failed open: the directory may appear later.
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not self._open:
                await self._engine.connect()
                await self._engine.declare(spool_topology(self.prefix))
                self._open = True

    async def _depth(self) -> int:
        await self._ready()
        # depth() first takes back rows leased by a process that died (a listener killed mid-forward).
        return await self._engine.depth(self.name)

    async def _append(self, routing_key: str, message: Message) -> None:
        await self._ready()
        await self._engine.publish(self.name, routing_key, message)

    async def _take(self) -> Delivery | None:
        await self._ready()
        return await self._engine.get(self.name)

    def depth(self) -> int:
        return self._run(self._depth())

    def append(self, routing_key: str, message: Message) -> None:
        """Returns once the row is committed and fsynced."""
        self._run(self._append(routing_key, message))

    def take(self) -> Delivery | None:
        """Lease the oldest row (it stays in the file until :meth:`remove`); None when empty."""
        return self._run(self._take())

    def remove(self, delivery: Delivery) -> None:
        self._run(delivery.ack())

    def close(self) -> None:
        # Closing returns our leased row to the queue, at its place (rows are ordered by id).
        try:
            self._run(self._engine.close())
        except RelayError as exc:
            log.warning("closing the spool: %s", exc)
        self._thread.stop(timeout=self.timeout)


@dataclass
class _Backoff:
    first: float
    cap: float
    failures: int = 0
    next_try: float = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        self.next_try = now + doubling(self.failures, first=self.first, cap=self.cap)

    def succeeded(self) -> None:
        self.failures, self.next_try = 0, 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_try


class SpoolingPublisher:
    """A listener publisher that spools while ``upstream`` (the broker) is away; see the module docstring."""

    def __init__(self, upstream: Upstream, spool: Spool, *, confirm_timeout: float,
                 first_backoff: float = 0.5, max_backoff: float = 5.0) -> None:
        self.upstream = upstream
        self.spool = spool
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._broker = _Backoff(first_backoff, max_backoff)
        self._spool_retry = _Backoff(first_backoff, max_backoff)
        # Rows in the spool not yet confirmed by the broker (the leased one included);
        # raised before an append starts, so it never reads 0 while a row may exist.
        self._pending = 0
        self._appending = False
        self._held: Delivery | None = None  # the forwarder's leased head row, kept until confirmed
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._crashed: BaseException | None = None
        try:
            self._pending = spool.depth()
        except RelayError as exc:
            # Unknown: assume rows may be there; the forwarder looks again with backoff.
            self._pending = 1
            log.warning("cannot read the spool %s yet: %s", spool.path, exc)
        if self._pending:
            log.info("the spool %s holds events from an earlier listener: forwarding them first", spool.path)
        self._forwarder = threading.Thread(target=self._forward_forever, name="opsrelay-forwarder", daemon=True)
        self._forwarder.start()

    @property
    def pending(self) -> int:
        """Events in the spool not yet confirmed by the broker."""
        with self._lock:
            return max(self._pending, 0)

    # -- the loop's side -------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Return once the broker confirmed the event or the spool fsynced it; RelayError otherwise."""
        self._check_forwarder()
        key, message = event_message(event)
        broker_error: RelayError | None = None
        with self._lock:
            direct = self._pending <= 0 and self._broker.ready(time.monotonic())
        if direct:
            broker_error = self._send_direct(key, message)
            if broker_error is None:
                return
        try:
            self._append(key, message)
        except RelayError as spool_error:
            with self._lock:
                retry_broker = broker_error is None and self._broker.ready(time.monotonic())
            if retry_broker:
                # The spool is broken, the broker may not be: a confirm is as durable as an fsync.
                # (Only here may an event overtake older spooled ones, which cannot be read anyway.)
                broker_error = self._send_direct(key, message)
                if broker_error is None:
                    return
            reason = f"broker: {broker_error}; " if broker_error else "broker not tried (backing off); "
            raise BrokerUnavailable(f"event {event.id} not stored: {reason}spool: {spool_error}") from spool_error
        self._wake.set()

    def _send_direct(self, key: str, message: Message) -> RelayError | None:
        """One bounded try at the broker, keeping its up/down state; the error, or None once confirmed."""
        try:
            self.upstream.send(key, message, timeout=self.confirm_timeout)
        except RelayError as exc:
            self._broker_failed(exc)
            return exc
        self._broker_back()
        return None

    def _append(self, key: str, message: Message) -> None:
        with self._lock:
            self._pending += 1  # before the commit: the forwarder must not think the spool empty
            self._appending = True
        try:
            # A timed-out append may still commit: the count stays raised, the forwarder corrects it.
            self.spool.append(key, message)
        finally:
            with self._lock:
                self._appending = False

    def tick(self) -> None:
        """supervisord's TICK_*: nudge the forwarder (it keeps its backoff); never blocks."""
        self._check_forwarder()
        self._wake.set()

    def _check_forwarder(self) -> None:
        # A forwarder that died on a bug would leave the spool growing for ever: end the listener
        # unanswered, so supervisord re-buffers the event and restarts us (the next one forwards).
        if self._crashed is not None:
            raise RuntimeError("the spool forwarder thread died") from self._crashed

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        self._forwarder.join(timeout=self.confirm_timeout + 2 * self.spool.timeout + 1.0)
        left = self.pending
        if left:
            log.info("%d event(s) stay in the spool %s; the next listener forwards them", left, self.spool.path)
        self.spool.close()
        self.upstream.close()

    # -- state -----------------------------------------------------------------------------

    def _broker_failed(self, exc: RelayError) -> None:
        with self._lock:
            first = self._broker.failures == 0
            self._broker.failed(time.monotonic())
        if first:
            log.warning("broker unavailable (%s: %s): spooling events in %s until it is back",
                        type(exc).__name__, " ".join(str(exc).split()), self.spool.path)
        else:
            log.debug("broker still unavailable: %s", exc)

    def _broker_back(self) -> None:
        with self._lock:
            was_down = self._broker.failures > 0
            self._broker.succeeded()
        if was_down:
            log.info("broker is back")

    # -- the forwarder thread --------------------------------------------------------------

    def _delay(self) -> float | None:
        """Seconds until the next forward attempt; None: nothing to forward, sleep until woken."""
        with self._lock:
            if self._pending <= 0:
                return None
            due = max(self._broker.next_try, self._spool_retry.next_try)
        return max(0.0, due - time.monotonic())

    def _forward_forever(self) -> None:
        try:
            while not self._closing.is_set():
                self._wake.wait(self._delay())
                # Cleared before looking at the state: a wake after this point is not lost.
                self._wake.clear()
                if self._closing.is_set():
                    return
                delay = self._delay()
                if delay is not None and delay <= 0:
                    self._drain()
        except BaseException as exc:
            self._crashed = exc
            log.exception("the spool forwarder died")

    def _drain(self) -> None:
        """Forward oldest first until the spool is empty, a failure, or close."""
        forwarded = 0
        while not self._closing.is_set():
            if self._held is None:
                try:
                    self._held = self.spool.take()
                except RelayError as exc:
                    with self._lock:
                        self._spool_retry.failed(time.monotonic())
                    log.warning("cannot read the spool to forward it: %s", exc)
                    break
                with self._lock:
                    self._spool_retry.succeeded()
                if self._held is None:
                    with self._lock:
                        if not self._appending:
                            self._pending = 0
                    break
            message = self._held.message
            try:
                self.upstream.send(message.routing_key, message, timeout=self.confirm_timeout)
            except RelayError as exc:
                self._broker_failed(exc)
                break
            self._broker_back()
            try:
                self.spool.remove(self._held)
            except RelayError as exc:
                # Confirmed but still in the file: a later listener sends it again (same id).
                log.warning("event %s was forwarded but not removed from the spool: %s", message.message_id, exc)
            self._held = None
            forwarded += 1
            with self._lock:
                self._pending -= 1
        if forwarded:
            log.info("forwarded %d spooled event(s) to the broker, %d left", forwarded, self.pending)
