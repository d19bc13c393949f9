"""What one mail says: the value the notifier hands to the renderer.

A :class:`Notice` is one of five kinds: one event (as crashmail), a digest of a
group's events, a process that recovered, the summary of what flap damping
held back, or the summary of what a silence held back when it ended. Its
``mail_id`` is derived from what it covers, so a notice that is produced again
after a crash gets the same Message-ID.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from relay.contract.event import Event

__all__ = ["Notice", "NoticeKind", "event_mail_id", "mail_id", "message_id_header"]

_MESSAGE_IDS = uuid.UUID("6f7073e2-7265-4c61-b900-000000000001")


class NoticeKind(StrEnum):
    EVENT = "event"
    DIGEST = "digest"
    RECOVERED = "recovered"
    SUPPRESSED = "suppressed"
    SILENCED = "silenced"


def event_mail_id(event_id: str, subscription: str) -> str:
    """The mail id of a one-event mail (unchanged since v1: duplicates stay recognisable)."""
    return str(uuid.uuid5(_MESSAGE_IDS, f"{event_id}/{subscription}"))


def mail_id(kind: NoticeKind, key: str, subscription: str) -> str:
    if kind is NoticeKind.EVENT:
        return event_mail_id(key, subscription)
    return str(uuid.uuid5(_MESSAGE_IDS, f"{kind.value}/{key}/{subscription}"))


def message_id_header(mail_id: str, host: str) -> str:
    """The Message-ID header value of a mail id sent from ``host``."""
    return f"<{mail_id}@opsrelay.{host}>"


@dataclass(frozen=True, slots=True)
class Notice:
    """One mail to write.

    ``events`` are in the order they happened: the one event (EVENT), the group's
    events (DIGEST, possibly fewer than ``total`` when a long loop was capped), the
    RUNNING event (RECOVERED) or the events held back (SUPPRESSED, capped likewise).
    """

    kind: NoticeKind
    mail_id: str
    events: tuple[Event, ...]
    # How many events this notice stands for (>= len(events)).
    total: int
    # The Message-ID header value this mail threads under (In-Reply-To and References).
    thread: str | None = None
    # RECOVERED: when the outage began; SUPPRESSED: when the damping window began.
    since: str | None = None
    # SUPPRESSED: when the window ended.
    until: str | None = None
    # EVENT: how many events of this process this subscription saw in the last hour, this one included.
    recent: int = 1
    # DIGEST: the group's labels, e.g. {"process": "worker_03"} (empty: one group for the subscription).
    group: dict[str, str] = field(default_factory=dict)
    # SILENCED: the silence (id, matchers, comment) and the processes still down when it ended.
    silence: dict[str, str] = field(default_factory=dict)
    still_down: tuple[str, ...] = ()

    @property
    def first(self) -> Event:
        return self.events[0]

    @property
    def last(self) -> Event:
        return self.events[-1]
