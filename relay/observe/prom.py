"""Prometheus metrics with prometheus_client: counters and gauges fed by the relay, queues read at scrape.

The queue gauges are not kept up to date by the relay: a scrape asks the relay's loop to read
the engine (:data:`~relay.observe.observer.Sampler`), and waits at most ``sample_timeout``.
A broker that is slow or gone answers the last values it gave, and
``opsrelay_queue_sample_age_seconds`` says how old they are: a scrape never hangs on the broker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from relay.observe.observer import AttemptOutcome, Observer, QueueSample, Sampler, running_version

__all__ = ["DEAD_REASONS", "PromObserver"]

DEAD_REASONS = ("permanent", "attempts", "invalid")
# Seconds: SMTP sessions take from milliseconds (loopback) to a minute (a slow provider).
_SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Queues(Collector):
    """opsrelay_queue_messages / _oldest_seconds, read through the sampler when scraped."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._target: tuple[asyncio.AbstractEventLoop, Sampler] | None = None
        self._last: Sequence[QueueSample] = ()
        self._taken: float | None = None
        self._pending: concurrent.futures.Future[Sequence[QueueSample]] | None = None

    def point_at(self, loop: asyncio.AbstractEventLoop | None, sampler: Sampler | None) -> None:
        with self._lock:
            self._target = None if loop is None or sampler is None else (loop, sampler)

    def _refresh(self) -> None:
        with self._lock:
            target, pending = self._target, self._pending
            if target is None:
                return
            if pending is None or pending.done():
                # One read at a time: a scrape during a slow read waits on that one.
                pending = self._pending = asyncio.run_coroutine_threadsafe(_call(target[1]), target[0])
        try:
            samples = pending.result(self.timeout)
        except (concurrent.futures.TimeoutError, TimeoutError):
            return  # still running: the next scrape may get it
        except Exception:  # the broker went away: the last values, with their age, say so
            with self._lock:
                self._pending = None
            return
        with self._lock:
            self._last, self._taken, self._pending = samples, time.monotonic(), None

    def collect(self) -> Iterable[Metric]:
        self._refresh()
        messages = GaugeMetricFamily("opsrelay_queue_messages", "Ready messages in the queue", labels=["queue"])
        oldest = GaugeMetricFamily("opsrelay_queue_oldest_seconds",
                                   "Age of the oldest ready message (0: empty)", labels=["queue"])
        for sample in self._last:
            messages.add_metric([sample.queue], sample.messages)
            oldest.add_metric([sample.queue], sample.oldest_seconds or 0.0)
        yield messages
        yield oldest
        age = GaugeMetricFamily("opsrelay_queue_sample_age_seconds",
                                "How old the queue gauges are (they are read when scraped)")
        if self._taken is not None:
            age.add_metric([], time.monotonic() - self._taken)
        yield age


async def _call(sampler: Sampler) -> Sequence[QueueSample]:
    return await sampler()


class PromObserver(Observer):
    """The relay's metrics in a registry of its own (several relays in one test process stay apart)."""

    def __init__(self, subscriptions: Sequence[str] = (), *, sample_timeout: float = 1.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._events = Counter("opsrelay_events", "Events taken from a subscription queue",
                               ["subscription"], registry=r)
        self._notices = Counter("opsrelay_notices", "Mails queued, by kind", ["subscription", "kind"], registry=r)
        self._silenced = Counter("opsrelay_silenced", "Events a silence kept from being mailed",
                                 ["subscription"], registry=r)
        self._attempts = Counter("opsrelay_delivery_attempts", "Delivery decisions, by outcome",
                                 ["smarthost", "outcome"], registry=r)
        self._delivered = Counter("opsrelay_mails_delivered", "Mails a smarthost took", ["smarthost"], registry=r)
        self._dead = Counter("opsrelay_dead_letters", "Messages dead-lettered, by reason", ["reason"], registry=r)
        self._send = Histogram("opsrelay_smtp_send_seconds", "SMTP session time", ["smarthost"],
                               buckets=_SEND_BUCKETS, registry=r)
        self._up = Gauge("opsrelay_smtp_up", "1 after the last session succeeded, 0 after it failed",
                         ["smarthost"], registry=r)
        self._held = Gauge("opsrelay_held", "1 while delivery is held for that fault", ["smarthost", "fault"],
                           registry=r)
        Gauge("opsrelay_build_info", "The running version", ["version"], registry=r).labels(running_version()).set(1)
        self._queues = _Queues(sample_timeout)
        r.register(self._queues)
        # Present at 0 from the start, so that rate() and absent() work before the first one.
        for name in subscriptions:
            self._events.labels(name)
            self._silenced.labels(name)
        for reason in DEAD_REASONS:
            self._dead.labels(reason)
        self._beat = time.monotonic()
        self._not_ready: str | None = "starting"
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what the HTTP side reads ------------------------------------------------------

    def healthy(self, within: float) -> bool:
        """The relay's loop reported in the last ``within`` seconds."""
        return time.monotonic() - self._beat < within

    @property
    def not_ready(self) -> str | None:
        return self._not_ready

    # -- Observer ----------------------------------------------------------------------

    def event(self, subscription: str) -> None:
        self._events.labels(subscription).inc()

    def notice(self, subscription: str, kind: str) -> None:
        self._notices.labels(subscription, kind).inc()

    def silenced(self, subscription: str) -> None:
        self._silenced.labels(subscription).inc()

    def attempt(self, smarthost: str, outcome: AttemptOutcome) -> None:
        self._attempts.labels(smarthost, outcome).inc()

    def delivered(self, smarthost: str) -> None:
        self._delivered.labels(smarthost).inc()

    def dead_letter(self, reason: str) -> None:
        self._dead.labels(reason).inc()

    def session(self, smarthost: str, *, ok: bool, seconds: float | None = None) -> None:
        self._up.labels(smarthost).set(1 if ok else 0)
        if seconds is not None:
            self._send.labels(smarthost).observe(seconds)

    def held(self, smarthost: str, fault: str, *, on: bool) -> None:
        self._held.labels(smarthost, fault).set(1 if on else 0)

    def heartbeat(self) -> None:
        self._beat = time.monotonic()

    def ready(self, reason: str | None) -> None:
        self._not_ready = reason

    def sample_queues(self, sampler: Sampler | None) -> None:
        loop = asyncio.get_running_loop() if sampler is not None else None
        self._queues.point_at(loop, sampler)
