"""The interface the relay reports its work through. This base reports nowhere: metrics off.

Labels carry no e-mail addresses or message ids: a subscription's name, ``host:port`` of a
smarthost, and small fixed vocabularies (outcome, reason, fault kind).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

__all__ = ["AttemptOutcome", "Observer", "QueueSample", "Sampler", "running_version"]


def running_version() -> str:
    """opsrelay's installed version (build_info, heartbeats)."""
    try:
        return metadata.version("opsrelay")
    except metadata.PackageNotFoundError:
        return "unknown"

# The outcome label of opsrelay_delivery_attempts_total.
AttemptOutcome = str  # "delivered" | "retry" | "dead" | "held"


@dataclass(frozen=True, slots=True)
class QueueSample:
    """One queue as read from the engine: ready messages and the age of the oldest (None: empty/unknown)."""

    queue: str
    messages: int
    oldest_seconds: float | None


# Reads the queues on the relay's loop; the metrics side bounds how long it waits for it.
Sampler = Callable[[], Awaitable[Sequence[QueueSample]]]


class Observer:
    """Every hook does nothing here; :class:`relay.observe.prom.PromObserver` counts."""

    def event(self, subscription: str) -> None:
        """An event was taken from the subscription's queue."""

    def notice(self, subscription: str, kind: str) -> None:
        """A mail was queued: event, digest, recovered, suppressed or silenced."""

    def silenced(self, subscription: str) -> None:
        """An event matched a silence and was not mailed."""

    def attempt(self, smarthost: str, outcome: AttemptOutcome) -> None:
        """One delivery decision for a group of recipients of one mail."""

    def delivered(self, smarthost: str) -> None:
        """A mail reached the smarthost (for some or all of its recipients)."""

    def dead_letter(self, reason: str) -> None:
        """permanent (5xx), attempts (max_attempts used up) or invalid (cannot be read or rendered)."""

    def session(self, smarthost: str, *, ok: bool, seconds: float | None = None) -> None:
        """A session with the smarthost ended: ok, or it could not take mail; ``seconds`` it took."""

    def held(self, smarthost: str, fault: str, *, on: bool) -> None:
        """Delivery is held (or no longer) for a fault of that kind at that smarthost."""

    def heartbeat(self) -> None:
        """The relay's loop is running (``/-/healthy``)."""

    def ready(self, reason: str | None) -> None:
        """None: connected and consuming (``/-/ready`` 200); else why not (503 with that line)."""

    def sample_queues(self, sampler: Sampler | None) -> None:
        """Where queue gauges are read from at scrape time (None: no relay running)."""
