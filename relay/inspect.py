"""What waits where, and the operator's hands on it: browse, dead letters, unrouted events.

Engine-neutral: everything here goes through :class:`~relay.engines.base.Engine`
(``depth``, ``get``, ``publish``, ack/reject), so the same code serves RabbitMQ
and the embedded queue.

Browsing takes every ready message of a queue unsettled, then settles each one:
a kept message is rejected with requeue. Both engines put a requeued message
back where it was, not at the tail (the SQLite engine keeps the row and its id;
RabbitMQ classic queues keep publication order across requeues, since 2.7), so
a browse leaves the queue in its order; the messages come back marked
``redelivered``. While a browse holds them they are not ready: ``depth`` and a
consumer do not see them, and a retry queue's TTL cannot expire them (they
expire on return if due). Only queues nobody consumes are browsed (retry, dead,
unrouted), and all of a queue is held in memory for the moment.

Taking the whole queue before acting is also what keeps ``replay`` and
``replay_unrouted`` from looping: a copy that lands in the same queue again
(an event still no subscription matches, a replayed event that fails again)
arrives after the snapshot and is left alone.

Nothing is lost on the way: a copy is published (confirmed durable) before
the original is acked; a failure on the way returns whatever is not settled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any

from relay.engines.base import Delivery, Engine, HeaderValue, Message
from relay.errors import ConfigurationError, MessageDecodeError, RelayError
from relay.event import Event, decode_event
from relay.mail import OutboundMail, from_message, to_message
from relay.topology import (
    dead_queue,
    events_exchange,
    outbound_queue,
    retry_queue,
    subscription_queue,
    unrouted_queue,
)

__all__ = [
    "DeadEntry",
    "HeldMail",
    "PurgeReport",
    "QueueCount",
    "QueueStats",
    "ReplayReport",
    "UnroutedReport",
    "browse",
    "list_dead",
    "purge",
    "queue_stats",
    "replay",
    "replay_unrouted",
    "show_dead",
    "unrouted_summary",
]

DEAD_HEADERS = ("x-dead-reason", "x-dead-at", "x-dead-from", "x-dead-kind")


@contextlib.asynccontextmanager
async def _holding(engine: Engine, queue: str) -> AsyncIterator[list[Delivery]]:
    """Every ready message of ``queue``, taken unsettled, oldest first.

    The caller removes from the list what it settled; the rest is requeued on exit,
    whatever happened (and the broker returns it anyway if the connection is gone).
    """
    held: list[Delivery] = []
    try:
        while (delivery := await engine.get(queue)) is not None:
            held.append(delivery)
        yield held
    finally:
        for delivery in held:
            with contextlib.suppress(RelayError):
                await delivery.reject(requeue=True)


async def _exists(engine: Engine, queue: str) -> bool:
    # ``depth`` first: on RabbitMQ a passive declare of a missing queue closes the channel it
    # runs on, and the AMQP engine's ``get`` would run it on its publishing channel.
    try:
        await engine.depth(queue)
    except ConfigurationError:
        return False
    return True


async def browse(engine: Engine, queue: str) -> list[Message]:
    """The ready messages of ``queue``, oldest first, left in place (see the module docstring)."""
    if not await _exists(engine, queue):
        return []
    async with _holding(engine, queue) as held:
        return [d.message for d in held]


# -- what waits where ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueCount:
    role: str  # outbound | retry | dead | unrouted | subscription
    name: str
    ready: int | None  # None: the queue is not declared (the relay never ran with this config)


@dataclass(frozen=True, slots=True)
class HeldMail:
    """A mail waiting in a retry queue because the smarthost or our config is at fault."""

    queue: str
    id: str
    fault: str
    holds: int
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QueueStats:
    queues: tuple[QueueCount, ...]
    held: tuple[HeldMail, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": [{"role": q.role, "name": q.name, "ready": q.ready} for q in self.queues],
            "held": [{"queue": h.queue, "id": h.id, "fault": h.fault, "holds": h.holds,
                      "recipients": list(h.recipients)} for h in self.held],
        }


async def queue_stats(engine: Engine, prefix: str, retry_delays_ms: Sequence[int],
                      subscriptions: Sequence[str]) -> QueueStats:
    """Ready counts of the relay's queues, and the held mails found by browsing the retry queues."""
    named = [("outbound", outbound_queue(prefix))]
    named += [("retry", retry_queue(prefix, d)) for d in sorted(set(retry_delays_ms))]
    named += [("dead", dead_queue(prefix)), ("unrouted", unrouted_queue(prefix))]
    named += [("subscription", subscription_queue(prefix, s)) for s in subscriptions]
    counts: list[QueueCount] = []
    held: list[HeldMail] = []
    for role, name in named:
        try:
            ready: int | None = await engine.depth(name)
        except ConfigurationError:
            ready = None
        counts.append(QueueCount(role, name, ready))
        if role == "retry" and ready:
            held += [_held(name, m) for m in await browse(engine, name) if m.headers.get("x-held") is not None]
    return QueueStats(tuple(counts), tuple(held))


def _held(queue: str, message: Message) -> HeldMail:
    h = message.headers
    holds = h.get("x-holds")
    try:
        recipients = tuple(str(r) for r in json.loads(str(h.get("x-recipients") or "[]")))
    except (ValueError, TypeError):
        recipients = ()
    return HeldMail(queue, message.message_id, str(h.get("x-held")),
                    holds if isinstance(holds, int) else 0, recipients)


# -- dead letters ----------------------------------------------------------------------------


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
        kind = message.headers.get("x-dead-kind")
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
        return self._header("x-dead-kind") or "invalid"

    @property
    def reason(self) -> str:
        return self._header("x-dead-reason")

    @property
    def dead_at(self) -> str:
        return self._header("x-dead-at")

    @property
    def source(self) -> str:
        return self._header("x-dead-from")

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
            "history": [{"at": a.at, "reply": a.reply, "recipients": list(a.recipients)}
                        for a in (mail.history if mail else ())],
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


def _fresh(entry: DeadEntry, prefix: str) -> tuple[str, Message]:
    """Where a replayable dead letter goes back to, and as what."""
    if entry.mail is not None:
        # Fresh counters, so the full retry schedule runs again; the history stays, so a mail
        # that dies again shows every attempt, before and after the replay.
        again = replace(entry.mail, attempts=0, holds=0)
        return outbound_queue(prefix), to_message(again)
    headers = {k: v for k, v in entry.message.headers.items() if k not in DEAD_HEADERS}
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
    if await _exists(engine, queue):
        async with _holding(engine, queue) as held:
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
    if await _exists(engine, queue):
        async with _holding(engine, queue) as held:
            for delivery in list(held):
                entry = DeadEntry.of(delivery.message)
                if ids is None or entry.id in ids:
                    await delivery.ack()
                    held.remove(delivery)
                    purged.append(entry)
    gone = {e.id for e in purged}
    return PurgeReport(tuple(purged), tuple(i for i in dict.fromkeys(ids or ()) if i not in gone))


# -- unrouted events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnroutedReport:
    replayed: int
    # Ready in the unrouted queue afterwards: what still matches no binding (and any
    # event that arrived unmatched meanwhile).
    remaining: int
    keys: Mapping[str, int] = field(default_factory=dict)  # routing key -> events replayed


async def replay_unrouted(engine: Engine, prefix: str) -> UnroutedReport:
    """Publish every event kept in ``<prefix>.unrouted`` to the events exchange again, with its key.

    It reaches the subscriptions bound now; one that still matches nothing comes back
    to unrouted once (through the alternate exchange), after the snapshot, so it is not
    taken again. Each original is acked only after its copy was confirmed.
    """
    queue = unrouted_queue(prefix)
    if not await _exists(engine, queue):
        return UnroutedReport(0, 0)
    keys: dict[str, int] = {}
    async with _holding(engine, queue) as held:
        for delivery in list(held):
            original = delivery.message
            # Through an alternate exchange a message keeps the key it was published with.
            await engine.publish(events_exchange(prefix), original.routing_key, replace(original, routing_key=""))
            await delivery.ack()
            held.remove(delivery)
            keys[original.routing_key] = keys.get(original.routing_key, 0) + 1
    return UnroutedReport(sum(keys.values()), await engine.depth(queue), keys)


def unrouted_summary(message: Message) -> dict[str, HeaderValue]:
    """One kept event, for ``opsrelay unrouted list``."""
    try:
        event = decode_event(message.body)
    except MessageDecodeError as exc:
        return {"id": message.message_id, "key": message.routing_key, "event": None, "error": str(exc)}
    return {"id": message.message_id, "key": message.routing_key,
            "event": f"{event.program} {event.state} on {event.host}", "at": event.at}
