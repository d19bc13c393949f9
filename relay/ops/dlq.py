"""Dead letters: list, show, replay (back to where they came from, with fresh counters) and purge."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any

from relay.contract.envelope import (
    DEAD_AT,
    DEAD_FROM,
    DEAD_HEADERS,
    DEAD_KIND,
    DEAD_REASON,
    broker_dead_letter,
)
from relay.contract.event import Event, decode_event
from relay.contract.mail import OutboundMail, from_message, to_message
from relay.contract.message import Message
from relay.contract.names import (
    dead_queue,
    outbound_queue,
    subscription_queue,
)
from relay.engines.base import Engine
from relay.errors import ConfigurationError, MessageDecodeError
from relay.ops.browse import browse, exists, holding

__all__ = ["DeadEntry", "PurgeReport", "ReplayReport", "list_dead", "purge", "replay", "show_dead"]



@dataclass(frozen=True, slots=True)
class DeadEntry:
    """One message in the dead-letter queue, decoded as far as it goes."""

    message: Message
    # The message id, or a content hash for a message that came without one (to name it still).
    id: str
    mail: OutboundMail | None = None
    event: Event | None = None
    subject: str | None = None

    @classmethod
    def of(cls, message: Message) -> DeadEntry:
        kind = message.headers.get(DEAD_KIND)
        if kind is None and broker_dead_letter(message.headers) is not None:
            # Dead-lettered by the broker as it was: a mail if its envelope reads, else an event.
            try:
                from_message(message)
                kind = "mail"
            except MessageDecodeError:
                kind = "event"
        mail = event = subject = None
        if kind == "mail":
            with contextlib.suppress(MessageDecodeError):
                mail = from_message(message)
                subject = _subject(mail.raw)
        else:
            with contextlib.suppress(MessageDecodeError):
                event = decode_event(message.body)
                subject = f"{event.program} {event.state} on {event.host}"
        return cls(message, message.message_id or _content_id(message), mail, event, subject)

    def _header(self, name: str) -> str:
        value = self.message.headers.get(name)
        return "" if value is None else str(value)

    @property
    def kind(self) -> str:
        if not self._header(DEAD_KIND) and broker_dead_letter(self.message.headers) is not None:
            return "mail" if self.mail is not None else "event" if self.event is not None else "invalid"
        return self._header(DEAD_KIND) or "invalid"

    @property
    def reason(self) -> str:
        by_broker = broker_dead_letter(self.message.headers)
        if by_broker is not None:
            reason, queue = by_broker
            if reason == "delivery_limit":
                return (f"delivery_limit: {queue} delivered it broker.delivery_limit times and it was never "
                        "settled (it kept killing the relay)")
            return f"{reason} (dead-lettered by the broker from {queue})"
        return self._header(DEAD_REASON)

    @property
    def dead_at(self) -> str:
        return self._header(DEAD_AT)

    @property
    def source(self) -> str:
        by_broker = broker_dead_letter(self.message.headers)
        return by_broker[1] if by_broker is not None else self._header(DEAD_FROM)

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.mail.recipients if self.mail else ()

    @property
    def attempts(self) -> int | None:
        return self.mail.attempts if self.mail else None

    def why_not_replayable(self, prefix: str) -> str | None:
        if self.kind == "mail":
            return None if self.mail else "the mail's envelope headers cannot be read"
        if self.kind == "event":
            if not self.source.startswith(subscription_queue(prefix, "")):
                return f"it came from {self.source or 'no queue'!r}, not a subscription queue of {prefix!r}"
            return None
        return f"kind {self.kind!r} cannot be replayed, only purged (it would fail the same way)"

    def summary(self, prefix: str) -> dict[str, Any]:
        why = self.why_not_replayable(prefix)
        return {"id": self.id, "kind": self.kind, "reason": self.reason, "dead_at": self.dead_at,
                "from": self.source, "recipients": list(self.recipients), "attempts": self.attempts,
                "subject": self.subject, "replayable": why is None, "not_replayable_because": why}

    def detail(self, prefix: str) -> dict[str, Any]:
        mail = self.mail
        return {
            **self.summary(prefix),
            "sender": mail.sender if mail else None,
            "holds": mail.holds if mail else None,
            "origin": mail.origin if mail else None,
            "history": [{"at": a.at, "reply": a.reply, "recipients": list(a.recipients),
                         "smarthost": a.smarthost} for a in (mail.history if mail else ())],
            "message_id": self.message.message_id,
            "content_type": self.message.content_type,
            "headers": dict(self.message.headers),
            # Mail is 7-bit or UTF-8 in practice; a stray byte shows as U+FFFD rather than failing.
            "message": self.message.body.decode("utf-8", errors="replace"),
        }


def _subject(raw: bytes) -> str | None:
    # The default policy decodes RFC 2047 encoded words ("=?utf-8?q?...?=").
    try:
        subject = BytesHeaderParser(policy=default_policy).parsebytes(raw)["Subject"]
    except Exception:  # the header parser has raised on malformed input (IndexError, ...): no subject
        return None
    return None if subject is None else str(subject)


def _content_id(message: Message) -> str:
    """A stable stand-in id for a message that came without one (so it can still be named)."""
    digest = hashlib.sha256(message.body)
    digest.update(json.dumps(dict(message.headers), sort_keys=True, default=str).encode())
    return f"sha256:{digest.hexdigest()[:16]}"


async def list_dead(engine: Engine, prefix: str) -> list[DeadEntry]:
    """Every dead letter, oldest first, left in place."""
    return [DeadEntry.of(m) for m in await browse(engine, dead_queue(prefix))]


async def show_dead(engine: Engine, prefix: str, dead_id: str) -> list[DeadEntry]:
    """The dead letters with this id: one, or several when parts of one mail died apart."""
    return [e for e in await list_dead(engine, prefix) if e.id == dead_id]


@dataclass(frozen=True, slots=True)
class ReplayReport:
    replayed: tuple[tuple[DeadEntry, str], ...] = ()  # (entry, queue it went back to)
    refused: tuple[tuple[DeadEntry, str], ...] = ()  # (entry, why it stays)
    missing: tuple[str, ...] = ()  # ids asked for that are not in the dead-letter queue


@dataclass(frozen=True, slots=True)
class PurgeReport:
    purged: tuple[DeadEntry, ...] = ()
    missing: tuple[str, ...] = ()


_BROKER_FIELDS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


def _fresh(entry: DeadEntry, prefix: str) -> tuple[str, Message]:
    """Where a replayable dead letter goes back to, and as what."""
    if entry.mail is not None:
        # Fresh counters, so the full retry schedule runs again; the history stays, so a mail
        # that dies again shows every attempt, before and after the replay.
        again = replace(entry.mail, attempts=0, holds=0)
        return outbound_queue(prefix), to_message(again)
    # Ours and the broker's dead-letter fields go; the event is as it was published.
    headers = {k: v for k, v in entry.message.headers.items()
               if k not in DEAD_HEADERS and not k.startswith(_BROKER_FIELDS)}
    return entry.source, replace(entry.message, headers=headers, routing_key="")


async def replay(engine: Engine, prefix: str, ids: Collection[str] | None) -> ReplayReport:
    """Send dead letters back (``ids=None``: all that can go); each leaves the dead-letter queue.

    A mail goes to outbound with its counters reset; an event to the subscription
    queue it died in. A copy is confirmed before its dead letter is acked.
    """
    replayed: list[tuple[DeadEntry, str]] = []
    refused: list[tuple[DeadEntry, str]] = []
    found: set[str] = set()
    queue = dead_queue(prefix)
    if await exists(engine, queue):
        async with holding(engine, queue) as held:
            for delivery in list(held):
                entry = DeadEntry.of(delivery.message)
                if ids is not None and entry.id not in ids:
                    continue
                found.add(entry.id)
                why = entry.why_not_replayable(prefix)
                if why is not None:
                    refused.append((entry, why))
                    continue
                target, fresh = _fresh(entry, prefix)
                try:
                    await engine.send(target, fresh)
                except ConfigurationError as exc:  # e.g. that subscription's queue is gone
                    refused.append((entry, f"cannot send it to {target}: {exc}"))
                    continue
                await delivery.ack()
                held.remove(delivery)
                replayed.append((entry, target))
    missing = tuple(i for i in dict.fromkeys(ids or ()) if i not in found)
    return ReplayReport(tuple(replayed), tuple(refused), missing)


async def purge(engine: Engine, prefix: str, ids: Collection[str] | None) -> PurgeReport:
    """Delete dead letters for good (``ids=None``: all of them)."""
    purged: list[DeadEntry] = []
    queue = dead_queue(prefix)
    if await exists(engine, queue):
        async with holding(engine, queue) as held:
            for delivery in list(held):
                entry = DeadEntry.of(delivery.message)
                if ids is None or entry.id in ids:
                    await delivery.ack()
                    held.remove(delivery)
                    purged.append(entry)
    gone = {e.id for e in purged}
    return PurgeReport(tuple(purged), tuple(i for i in dict.fromkeys(ids or ()) if i not in gone))
