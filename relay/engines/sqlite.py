"""The embedded engine: one SQLite file shared by every process on the host.

``sqlite:////var/lib/opsrelay/queue.db`` (SQLAlchemy's convention). Same
semantics as the RabbitMQ engine: topic and fanout exchanges with alternate
exchanges, durable queues, publish that returns once durable (WAL,
``synchronous=FULL``), ack/reject, per-queue TTL that dead-letters into another
queue. The SQL lives in :mod:`relay.engines.sqlite_store`.

Leases and crashes: a taken message row carries the taker's *token* (random,
per engine). The engine holds a ``flock`` on ``<db>.run/<token>.lock`` while it
runs; the kernel releases it when the process dies, even by SIGKILL. Engines
look at the tokens of leased rows when they start consuming and then at most
once per ``wake_interval``: a token whose lock they can take belongs to a dead
process, and its rows return to their queues marked ``redelivered``. A
cleanly closed engine returns its own unsettled rows first.

Single active consumer (a queue declared ``single_active``, as RabbitMQ's
``x-single-active-consumer``; the flag is known to the engines that declared
the queue, as every relay does before it consumes): a consumer first takes a ``flock`` on
``<db>.run/active-<hash>.lock`` and only then leases rows, so a second
consumer stands by until the first process ends or stops consuming.

Wake-ups (:mod:`relay.engines.sqlite_wake`): consumers sleep on a unix datagram
socket that publishers poke after commit, so a new message is noticed in a few
milliseconds without polling. A fallback timer (``wake_interval``, 1 s) and the
next TTL due time bound the sleep, for expiry and missed pokes.

SQLite blocks, so each engine runs all its SQL in one dedicated worker thread
and the event loop stays free. sqlite3 and OS errors become
:class:`~relay.errors.BrokerUnavailable` here; a missing exchange or queue, or
a message no queue takes, is a :class:`~relay.errors.ConfigurationError` (as
in the AMQP engine: the topology was not declared, retrying cannot help).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import ParamSpec, TypeVar

from relay.contract.message import Message
from relay.contract.topology import Topology
from relay.contract.urls import sqlite_path
from relay.engines import sqlite_rows
from relay.engines import sqlite_store as store
from relay.engines.base import Delivery, Engine
from relay.engines.sqlite_wake import WAKE_ALL, Poker, RunDir, WakeSocket, run_dir
from relay.errors import BrokerUnavailable, ConfigError, RelayError

__all__ = ["SqliteEngine", "db_path"]

_log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")
_OPTIONS = {"busy_timeout": 15.0, "wake_interval": 1.0}
# prefetch=0 means "no limit" in AMQP; we still take rows in batches of this size.
_UNLIMITED_BATCH = 100


def db_path(url: str) -> str:
    """The file of ``sqlite:///PATH``; ConfigError naming ``broker.url`` otherwise."""
    try:
        return sqlite_path(url)
    except ValueError as exc:
        raise ConfigError(str(exc), key="broker.url") from None


class _SqliteDelivery:
    __slots__ = ("_engine", "_on_settle", "_row_id", "_settled", "message", "redelivered")

    def __init__(
        self, engine: SqliteEngine, row: store.Row, on_settle: Callable[[int], None] | None
    ) -> None:
        self._engine = engine
        self._row_id = row.id
        self._on_settle = on_settle
        self._settled = False
        self.message: Message = row.message
        self.redelivered: bool = row.redelivered

    async def ack(self) -> None:
        await self._settle(store.Settle.ACK)

    async def reject(self, *, requeue: bool) -> None:
        await self._settle(store.Settle.REQUEUE if requeue else store.Settle.REJECT)

    async def _settle(self, how: store.Settle) -> None:
        if self._settled:
            raise RuntimeError(f"delivery {self.message.message_id!r} was already settled")
        try:
            await self._engine._call(self._engine._settle_sync, self._row_id, how)
            self._settled = True  # a settle that failed settled nothing: a reject may follow
        finally:
            if self._on_settle is not None:
                self._on_settle(self._row_id)


class SqliteEngine(Engine):
    def __init__(self, url: str, **options: float) -> None:
        # The engine-neutral bound on a publish: here, how long to wait for the write lock.
        if "confirm_timeout" in options:
            options.setdefault("busy_timeout", options.pop("confirm_timeout"))
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown sqlite engine option(s) {sorted(unknown)}", key="broker")
        settings = {**_OPTIONS, **options}
        self.url = url
        self.path = db_path(url)
        self.busy_timeout = settings["busy_timeout"]
        self.wake_interval = settings["wake_interval"]
        self._token = secrets.token_hex(8)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Owned by the worker thread:
        self._conn: sqlite3.Connection | None = None
        self._run: RunDir | None = None
        self._poker: Poker | None = None
        self._lock_fd: int | None = None
        self._last_reclaim = -float("inf")
        # Owned by the event loop:
        self._wake: WakeSocket | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._single_active: set[str] = set()

    def __repr__(self) -> str:
        return f"SqliteEngine({self.url!r})"

    # -- worker thread -------------------------------------------------------------

    def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> asyncio.Future[_T]:
        """Run ``fn`` in the worker thread; the one place sqlite3 and OS errors are translated."""
        if self._pool is None or self._loop is None:
            raise BrokerUnavailable(f"sqlite queue {self.path}: engine is not connected")

        def job() -> _T:
            try:
                return fn(*args, **kwargs)
            except (sqlite3.Error, OSError) as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise BrokerUnavailable(f"sqlite queue {self.path}: {reason}") from exc

        return self._loop.run_in_executor(self._pool, job)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BrokerUnavailable(f"sqlite queue {self.path}: engine is not connected")
        return self._conn

    def _open_sync(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
            os.chmod(directory, 0o700)
        self._conn = sqlite_rows.connect(self.path, self.busy_timeout)
        # Beside the real file, so a symlinked path cannot hide a live engine's lock from us.
        self._run = RunDir(run_dir(self.path))
        self._poker = Poker(self._run)

    def _close_sync(self) -> None:
        try:
            if self._conn is not None and self._lock_fd is not None:
                self._poke(store.release(self._conn, [self._token], redelivered=True))
        finally:
            if self._conn is not None:
                self._conn.close()
            if self._run is not None:
                if self._lock_fd is not None:
                    self._run.let_go(self._token, self._lock_fd)
                self._run.close()
            if self._poker is not None:
                self._poker.close()
            self._conn = self._run = self._poker = self._lock_fd = None

    def _poke(self, queues: Iterable[str]) -> None:
        if self._poker is not None:
            self._poker.poke(queues)

    def _publish_sync(self, exchange: str, routing_key: str, message: Message) -> None:
        queues, ttl_ms = store.publish(self._db(), exchange, routing_key, message)
        # A row due before the consumers' fallback wake-up moves their due time: each re-computes
        # how long it may sleep. A longer TTL (the unrouted week) is seen on the next wake anyway.
        soon = ttl_ms is not None and ttl_ms < self.wake_interval * 1000
        self._poke([*queues, WAKE_ALL] if soon else queues)

    def _reclaim_sync(self, force: bool) -> None:
        """Return the leases of engines whose process is gone (see the module docstring)."""
        now = time.monotonic()
        if not force and now - self._last_reclaim < self.wake_interval:
            return
        self._last_reclaim = now
        assert self._run is not None
        dead = [t for t in store.foreign_owners(self._db(), self._token) if self._run.is_gone(t)]
        if dead:
            self._poke(store.release(self._db(), dead, redelivered=True))

    def _take_sync(self, queue: str, limit: int, first: bool) -> tuple[list[store.Row], int | None]:
        conn = self._db()
        assert self._run is not None
        if first:
            store.require_queue(conn, queue)
        if self._lock_fd is None:
            self._lock_fd = self._run.hold(self._token)
        self._reclaim_sync(force=first)
        rows, moved = store.take(conn, queue, self._token, limit)
        self._poke(moved)
        return rows, store.next_due(conn)

    def _settle_sync(self, row_id: int, how: store.Settle) -> None:
        queues = store.settle(self._db(), row_id, self._token, how)
        if queues is None:
            raise BrokerUnavailable(f"sqlite queue {self.path}: lease of message row {row_id} was lost")
        self._poke(queues)

    def _release_sync(self, seen: list[int], unseen: list[int]) -> None:
        for ids, redelivered in ((seen, True), (unseen, False)):
            if ids:
                self._poke(store.release(self._db(), [self._token], ids, redelivered=redelivered))

    def _depth_sync(self, queue: str) -> int:
        self._reclaim_sync(force=True)
        self._poke(store.expire(self._db()))
        return store.depth(self._db(), queue)

    # -- Engine --------------------------------------------------------------------

    async def connect(self) -> None:
        if self._pool is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._token = secrets.token_hex(8)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="relay-sqlite")
        try:
            await self._call(self._open_sync)
        except BaseException:
            with contextlib.suppress(RelayError):
                await self._call(self._close_sync)
            await self._shutdown()
            raise

    async def close(self) -> None:
        if self._pool is None:
            return
        self._stop_consumers()
        if self._wake is not None and self._loop is not None:
            self._loop.remove_reader(self._wake.fileno())
            self._wake.close()
            self._wake = None
        try:
            await self._call(self._close_sync)
        except RelayError as exc:
            # Nothing is lost: with our liveness lock gone, other engines take our leases back.
            _log.warning("closing %s: %s", self.path, exc)
        finally:
            await self._shutdown()

    def _stop_consumers(self) -> None:
        self._closed = True
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def _shutdown(self) -> None:
        self._stop_consumers()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    async def check_publish(self, exchange: str, routing_key: str) -> None:
        """The queue file has no per-login permissions: whoever may open it may publish (connect checks that)."""
        await self.connect()

    async def declare(self, topology: Topology, *, use_existing: bool = False) -> None:
        await self._call(lambda: store.declare(self._db(), topology))
        self._single_active.update(q.name for q in topology.queues if q.single_active)

    async def _stand_by(self, queue: str) -> int | None:
        """Wait until this engine is the one active consumer of ``queue``; the lock's fd (None: closed)."""
        assert self._run is not None
        name = "active-" + hashlib.sha256(queue.encode("utf-8")).hexdigest()[:16]
        while not self._closed:
            fd = await self._call(self._run.try_hold, name)
            if fd is not None:
                return fd
            await asyncio.sleep(self.wake_interval)
        return None

    async def publish(self, exchange: str, routing_key: str, message: Message) -> None:
        await self._call(self._publish_sync, exchange, routing_key, message)

    async def get(self, queue: str) -> Delivery | None:
        rows, _ = await self._take(queue, 1, first=True)
        return _SqliteDelivery(self, rows[0], None) if rows else None

    async def depth(self, queue: str) -> int:
        return await self._call(self._depth_sync, queue)

    async def oldest(self, queue: str) -> float | None:
        def sync() -> int | None:
            self._poke(store.expire(self._db()))
            return store.oldest(self._db(), queue)

        queued = await self._call(sync)
        return None if queued is None else queued / 1000

    async def read_all(self, queue: str, *, drop: Callable[[Message], bool] | None = None) -> list[Message]:
        return await self._call(lambda: store.read_all(self._db(), queue, drop))

    async def consume(self, queue: str, *, prefetch: int = 10,
                      subscribed: asyncio.Event | None = None) -> AsyncIterator[Delivery]:
        self._listen()
        event = asyncio.Event()
        self._waiters.setdefault(queue, set()).add(event)
        unsettled: set[int] = set()
        buffer: deque[_SqliteDelivery] = deque()

        def settled(row_id: int) -> None:
            unsettled.discard(row_id)
            event.set()

        first = True
        active_fd: int | None = None
        try:
            if queue in self._single_active:
                await self._call(store.require_queue, self._db(), queue)
                if subscribed is not None:
                    subscribed.set()  # standing by is subscribed
                active_fd = await self._stand_by(queue)
            while not self._closed:
                if buffer:
                    yield buffer.popleft()
                    continue
                # Cleared before looking: a settle or a poke from now on wakes the wait below (a full
                # prefetch window must wait for one, not spin on an event that stays set).
                event.clear()
                room = prefetch - len(unsettled) if prefetch > 0 else _UNLIMITED_BATCH
                due: int | None = None
                if room > 0:
                    rows, due = await self._take(queue, room, first=first)
                    if first and subscribed is not None:
                        subscribed.set()  # the queue exists: from now on its rows come here
                    first = False
                    for row in rows:
                        unsettled.add(row.id)
                        buffer.append(_SqliteDelivery(self, row, settled))
                    if buffer:
                        continue
                delay = self.wake_interval
                if due is not None:
                    delay = min(delay, max(0.0, due / 1000 - time.time()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await event.wait()
        finally:
            self._waiters[queue].discard(event)
            # As a closed AMQP channel: every unsettled delivery returns to the queue, and
            # only those the caller saw count as redelivered. A later ack finds no lease.
            unseen = [d._row_id for d in buffer]
            seen = sorted(unsettled.difference(unseen))
            if (seen or unseen) and not self._closed and self._pool is not None:
                with contextlib.suppress(RuntimeError):
                    self._call(self._release_sync, seen, unseen)
            if active_fd is not None:
                # After the release above was queued on the worker: the next consumer finds the rows back.
                self._give_up_active(active_fd)

    def _give_up_active(self, fd: int) -> None:
        if self._pool is not None and not self._closed:
            with contextlib.suppress(RuntimeError):
                self._call(os.close, fd)
                return
        os.close(fd)

    async def _take(self, queue: str, limit: int, *, first: bool) -> tuple[list[store.Row], int | None]:
        future = self._call(self._take_sync, queue, limit, first)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The worker may still lease rows for nobody: hand them back when it does.
            def give_back(done: asyncio.Future[tuple[list[store.Row], int | None]]) -> None:
                if done.cancelled() or done.exception() is not None or self._closed:
                    return
                ids = [row.id for row in done.result()[0]]
                if ids:
                    self._call(self._release_sync, [], ids)

            future.add_done_callback(give_back)
            raise

    def _listen(self) -> None:
        """Bind our wake socket (once), so publishers' pokes reach our consumers."""
        if self._wake is not None or self._closed or self._loop is None:
            return
        if self._run is None:
            raise BrokerUnavailable(f"sqlite queue {self.path}: engine is not connected")
        try:
            self._wake = WakeSocket(self._run, self._token)
        except OSError as exc:
            raise BrokerUnavailable(f"sqlite queue {self.path}: cannot listen for wake-ups: {exc}") from exc
        self._loop.add_reader(self._wake.fileno(), self._woken)

    def _woken(self) -> None:
        if self._wake is None:
            return
        names = self._wake.drain()
        if WAKE_ALL in names:
            names = set(self._waiters)
        for name in names:
            for event in self._waiters.get(name, ()):
                event.set()
