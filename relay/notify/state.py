"""What a subscription remembers between events, and its JSON form.

The relay keeps this in memory and, for a subscription with digests, damping or
recovery notices, writes it to the subscription's state queue after every
change (:mod:`relay.notify.keeper`), so that a restarted relay picks up pending
digests, damping windows and open outages where the last one left them.
Everything is bounded: a long crash loop keeps its first :data:`MAX_LISTED`
events and counts the rest.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from relay.contract.event import Event, decode_event, encode_event
from relay.errors import MessageDecodeError

__all__ = ["DOC_VERSION", "MAX_LISTED", "Outage", "Pending", "ProcessKey", "State", "Window", "process_key"]

DOC_VERSION = 1
# Events listed in one digest or suppression summary; the rest are counted.
MAX_LISTED = 100
# Event ids remembered to recognise a redelivered event (acked late after a crash).
_SEEN = 500
_RECENT = 100

ProcessKey = str


def process_key(event: Event) -> ProcessKey:
    # \x1f cannot occur in supervisord names (they are config section names), so keys never collide.
    return "\x1f".join((event.host, event.group, event.process))


@dataclass
class Pending:
    """A digest being collected: one per group (the values of ``group_by``)."""

    labels: dict[str, str]
    due: float
    events: list[Event] = field(default_factory=list)
    total: int = 0

    def add(self, event: Event) -> None:
        """List ``event``; past :data:`MAX_LISTED` the newest replaces the previous newest.

        Only the newest log tail is kept (the digest shows that one): the document is
        rewritten on every event, and a hundred 4 KiB tails per group add up.
        """
        self.total += 1
        if event.log_tail:
            self.events = [replace(e, log_tail=None) if e.log_tail else e for e in self.events]
        if len(self.events) < MAX_LISTED:
            self.events.append(event)
        else:
            self.events[-1] = event


@dataclass
class Window:
    """Flap damping: mails sent in the hour from ``start``, and what was held back."""

    start: float
    sent: int = 0
    held: list[Event] = field(default_factory=list)
    held_total: int = 0


@dataclass
class Outage:
    """A process we mailed about as down: the recovery notice threads under ``thread``."""

    since: str
    thread: str


@dataclass
class State:
    pending: dict[str, Pending] = field(default_factory=dict)
    # group key -> when its last digest went out (group_interval counts from there).
    last_sent: dict[str, float] = field(default_factory=dict)
    windows: dict[str, Window] = field(default_factory=dict)
    outages: dict[ProcessKey, Outage] = field(default_factory=dict)
    # Times of each process's recent events ("3rd time in the last hour").
    recent: dict[ProcessKey, list[float]] = field(default_factory=dict)
    seen: deque[str] = field(default_factory=lambda: deque(maxlen=_SEEN))

    def remember(self, event: Event, now: float, horizon: float = 3600.0) -> int:
        """Note an event of its process; returns how many it had within ``horizon``, this one included."""
        times = [t for t in self.recent.get(process_key(event), []) if now - t < horizon]
        times = [*times[-(_RECENT - 1):], now]
        self.recent[process_key(event)] = times
        self.seen.append(event.id)
        return len(times)

    def forget(self, event_id: str) -> None:
        """Undo :meth:`remember`'s duplicate check for an event that was not mailed after all."""
        with contextlib.suppress(ValueError):
            self.seen.remove(event_id)

    def forget_old(self, now: float, horizon: float = 3600.0) -> None:
        for key in [k for k, times in self.recent.items() if not times or now - times[-1] >= horizon]:
            del self.recent[key]

    # -- JSON ------------------------------------------------------------------------

    def to_doc(self) -> dict[str, Any]:
        return {
            "v": DOC_VERSION,
            "pending": {k: {"labels": p.labels, "due": p.due, "total": p.total,
                            "events": [_event_doc(e) for e in p.events]} for k, p in self.pending.items()},
            "last_sent": self.last_sent,
            "windows": {k: {"start": w.start, "sent": w.sent, "held_total": w.held_total,
                            "held": [_event_doc(e) for e in w.held]} for k, w in self.windows.items()},
            "outages": {k: {"since": o.since, "thread": o.thread} for k, o in self.outages.items()},
            "recent": self.recent,
            "seen": list(self.seen),
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_doc(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def loads(cls, body: bytes) -> State:
        """Raises MessageDecodeError for anything that is not a state document we wrote."""
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict) or doc.get("v") != DOC_VERSION:
                raise MessageDecodeError(f"not a v{DOC_VERSION} state document")
            state = cls(
                pending={k: Pending(dict(p["labels"]), float(p["due"]), [_event(e) for e in p["events"]],
                                    int(p["total"])) for k, p in doc["pending"].items()},
                last_sent={k: float(v) for k, v in doc["last_sent"].items()},
                windows={k: Window(float(w["start"]), int(w["sent"]), [_event(e) for e in w["held"]],
                                   int(w["held_total"])) for k, w in doc["windows"].items()},
                outages={k: Outage(str(o["since"]), str(o["thread"])) for k, o in doc["outages"].items()},
                recent={k: [float(t) for t in v] for k, v in doc["recent"].items()},
            )
            state.seen.extend(str(i) for i in doc["seen"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MessageDecodeError(f"state document cannot be read: {exc!r}") from None
        return state


def _event_doc(event: Event) -> Any:
    return json.loads(encode_event(event))


def _event(doc: Any) -> Event:
    return decode_event(json.dumps(doc).encode("utf-8"))
