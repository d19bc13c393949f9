"""The outbound mail's wire format: the ``x-*`` headers that carry its envelope and history.

A mail travels through the outbound, retry and dead-letter queues as one message: the
body is the raw RFC 5322 message as it will be sent, and these headers carry the
envelope, the retry state (in the message, as dramatiq does, so any relay can pick it
up), why delivery is held, and why and where it was dead-lettered. This module is the
one writer and reader of those headers: :mod:`relay.contract.mail` builds its models on
it, and the sendmail fast path and the queue listings read and write through it.

Standard library (``json``) only, no dataclasses: the sendmail path imports it.

Format version 1 (``x-opsrelay-v``); a queue written by an earlier release reads the same:

=================  =====================================================================
``x-opsrelay-v``   1
``x-sender``       the envelope sender (MAIL FROM), a string
``x-recipients``   a JSON list of addresses, as a string (json.dumps defaults)
``x-attempts``     attempts made so far (int); ``x-holds``: times delivery was held (int)
``x-history``      JSON ``[[at, reply, [recipients], smarthost], ...]``, as a string (the fourth
                   element, ``host:port`` of who answered, is new in 0.2: a 3-element entry reads as "")
``x-origin``       event | sendmail | send-test | self (the relay about itself)
``x-held``         the smarthost/config fault, on a mail waiting in a retry queue because of one
``x-dead-*``       reason, at, from (the queue), kind (mail | event | invalid) on a dead letter
``x-first-death-*`` RabbitMQ's own, on a message the broker dead-lettered (a quorum queue's
                   delivery limit: it kept killing the relay); read by :func:`broker_dead_letter`
=================  =====================================================================
"""

from __future__ import annotations

import json
import os

from relay.errors import MessageDecodeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from relay.contract.message import HeaderValue

    HistoryEntry = tuple[str, str, tuple[str, ...], str]

__all__ = [
    "CONTENT_TYPE",
    "DEAD_AT",
    "DEAD_FROM",
    "DEAD_HEADERS",
    "DEAD_KIND",
    "DEAD_REASON",
    "HELD",
    "VERSION",
    "broker_dead_letter",
    "dead_headers",
    "held_fault",
    "mail_headers",
    "new_mail_id",
    "read_envelope",
    "read_history",
    "read_recipients",
]

CONTENT_TYPE = "message/rfc822"
VERSION = 1
HELD = "x-held"
DEAD_REASON, DEAD_AT, DEAD_FROM, DEAD_KIND = "x-dead-reason", "x-dead-at", "x-dead-from", "x-dead-kind"
DEAD_HEADERS = (DEAD_REASON, DEAD_AT, DEAD_FROM, DEAD_KIND)


def new_mail_id() -> str:
    """A fresh queue id for a mail: 128 random bits in hex.

    Opaque (ids written by earlier releases are UUIDs and read the same); not a UUID because
    ``import uuid`` costs the sendmail path ~7 ms (it imports platform), a third of a submission.
    """
    return os.urandom(16).hex()


def mail_headers(sender: str, recipients: Sequence[str], *, attempts: int = 0,
                 history: Sequence[HistoryEntry] = (), origin: str = "event", holds: int = 0,
                 held: str | None = None) -> dict[str, HeaderValue]:
    """The headers of a mail on a queue (``held``: the fault it waits for, in a retry queue)."""
    headers: dict[str, HeaderValue] = {
        "x-opsrelay-v": VERSION,
        "x-sender": sender,
        "x-recipients": json.dumps(list(recipients)),
        "x-attempts": attempts,
        "x-history": json.dumps([[at, reply, list(rcpts), *([host] if host else [])]
                                 for at, reply, rcpts, host in history]),
        "x-origin": origin,
        "x-holds": holds,
    }
    if held is not None:
        headers[HELD] = held
    return headers


def dead_headers(*, reason: str, at: str, source: str, kind: str) -> dict[str, HeaderValue]:
    """What a dead letter carries besides the message's own headers: why, when, from where, what."""
    return {DEAD_REASON: reason, DEAD_AT: at, DEAD_FROM: source, DEAD_KIND: kind}


def broker_dead_letter(headers: Mapping[str, HeaderValue]) -> tuple[str, str] | None:
    """(reason, queue) of a message RabbitMQ dead-lettered itself, not opsrelay; None otherwise.

    ``delivery_limit``: a quorum queue delivered it ``broker.delivery_limit`` times and it was never
    settled, so it kept killing whoever took it.
    """
    if DEAD_REASON in headers:
        return None
    reason, queue = headers.get("x-first-death-reason"), headers.get("x-first-death-queue")
    return (reason, queue) if isinstance(reason, str) and isinstance(queue, str) else None


def _counter(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_recipients(headers: Mapping[str, HeaderValue]) -> tuple[str, ...]:
    """``x-recipients``; MessageDecodeError unless it is a list of strings."""
    try:
        recipients = json.loads(str(headers["x-recipients"]))
    except (KeyError, ValueError) as exc:
        raise MessageDecodeError(f"mail envelope headers are malformed: {exc!r}") from None
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise MessageDecodeError("x-recipients is not a list of addresses")
    return tuple(recipients)


def read_history(headers: Mapping[str, HeaderValue]) -> tuple[HistoryEntry, ...]:
    """``x-history`` as (at, reply, recipients, smarthost) entries, oldest first."""
    try:
        history = json.loads(str(headers.get("x-history") or "[]"))
        return tuple((str(a[0]), str(a[1]), tuple(a[2]), str(a[3]) if len(a) > 3 else "") for a in history)
    except (ValueError, TypeError, IndexError) as exc:
        raise MessageDecodeError(f"mail envelope headers are malformed: {exc!r}") from None


def read_envelope(headers: Mapping[str, HeaderValue]) -> tuple[str, tuple[str, ...], int, int,
                                                               tuple[HistoryEntry, ...], str]:
    """(sender, recipients, attempts, holds, history, origin); MessageDecodeError for anything
    that is not a mail we queued (it must not loop)."""
    if headers.get("x-opsrelay-v") != VERSION:
        raise MessageDecodeError(f"not an opsrelay mail (x-opsrelay-v={headers.get('x-opsrelay-v')!r})")
    if "x-sender" not in headers:
        raise MessageDecodeError("mail envelope headers are malformed: KeyError('x-sender')")
    sender = headers["x-sender"]
    attempts = headers.get("x-attempts", 0)
    holds = headers.get("x-holds", 0)
    recipients = read_recipients(headers)
    history = read_history(headers)
    if not isinstance(sender, str) or not _counter(attempts) or not _counter(holds):
        raise MessageDecodeError("mail envelope headers have the wrong types")
    if not recipients:
        raise MessageDecodeError("mail has no recipients")
    return sender, recipients, int(attempts), int(holds), history, str(headers.get("x-origin") or "event")  # type: ignore[arg-type]


def held_fault(headers: Mapping[str, HeaderValue]) -> str | None:
    """The fault a held mail waits for, or None when it is an ordinary retry."""
    value = headers.get(HELD)
    return None if value is None else str(value)
