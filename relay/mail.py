"""Outbound mail: the envelope, the raw RFC 5322 bytes, and the delivery history.

A mail travels through the outbound, retry and dead-letter queues as one
engine :class:`~relay.engines.base.Message`: the body is the raw message as it
will be sent, the envelope and the retry state ride in headers (retry state
carried in the message, as dramatiq does), so any relay process can pick it up.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, formataddr, make_msgid

from relay.engines.base import HeaderValue, Message
from relay.errors import MessageDecodeError

__all__ = ["Attempt", "OutboundMail", "build_message", "clean_header", "from_message", "to_message"]

CONTENT_TYPE = "message/rfc822"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Attempt:
    at: str
    reply: str
    recipients: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundMail:
    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    attempts: int = 0
    history: tuple[Attempt, ...] = ()
    origin: str = "event"
    # Times delivery was held for a fault of the smarthost or our config (not attempts).
    holds: int = 0

    def after(self, attempt: Attempt, *, recipients: Sequence[str], held: bool = False) -> OutboundMail:
        """The same mail for another try: its remaining recipients, one more entry in its history."""
        return replace(
            self,
            recipients=tuple(recipients),
            attempts=self.attempts + (0 if held else 1),
            holds=self.holds + (1 if held else 0),
            history=(*self.history, attempt),
        )


def to_message(mail: OutboundMail, **extra: HeaderValue) -> Message:
    headers: dict[str, HeaderValue] = {
        "x-opsrelay-v": 1,
        "x-sender": mail.sender,
        "x-recipients": json.dumps(list(mail.recipients)),
        "x-attempts": mail.attempts,
        "x-history": json.dumps([[a.at, a.reply, list(a.recipients)] for a in mail.history]),
        "x-origin": mail.origin,
        "x-holds": mail.holds,
        **extra,
    }
    return Message(body=mail.raw, message_id=mail.message_id, content_type=CONTENT_TYPE, headers=headers)


def from_message(message: Message) -> OutboundMail:
    """Raise MessageDecodeError for anything that is not a mail we queued (it must not loop)."""
    h = message.headers
    try:
        if h.get("x-opsrelay-v") != 1:
            raise MessageDecodeError(f"not an opsrelay mail (x-opsrelay-v={h.get('x-opsrelay-v')!r})")
        sender = h["x-sender"]
        recipients = json.loads(str(h["x-recipients"]))
        attempts = h.get("x-attempts", 0)
        holds = h.get("x-holds", 0)
        history = json.loads(str(h.get("x-history") or "[]"))
        if not isinstance(sender, str) or not _counter(attempts) or not _counter(holds):
            raise MessageDecodeError("mail envelope headers have the wrong types")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise MessageDecodeError("x-recipients is not a list of addresses")
        if not recipients:
            raise MessageDecodeError("mail has no recipients")
        attempts_seen = tuple(Attempt(str(a[0]), str(a[1]), tuple(a[2])) for a in history)
    except MessageDecodeError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise MessageDecodeError(f"mail envelope headers are malformed: {exc!r}") from None
    if not message.body:
        raise MessageDecodeError("mail has an empty body")
    return OutboundMail(
        sender=sender,
        recipients=tuple(recipients),
        raw=message.body,
        message_id=message.message_id,
        attempts=int(attempts),  # type: ignore[arg-type]
        history=attempts_seen,
        origin=str(h.get("x-origin") or "event"),
        holds=int(holds),  # type: ignore[arg-type]
    )


def _counter(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Policy(EmailPolicy):
    """email's SMTP policy (CRLF, RFC 2047), without one folding quirk.

    CPython moves an ASCII value that fits on a line of its own, but not after its
    name, to the next line whole: ``Subject:`` CRLF SP value. RFC 5322 §3.2.2 unfolding
    then keeps the space, and parsers show " value". Keep the value after the name: the
    line is then at most 87 characters (the limit is 998, RFC 5322 §2.1.1).
    """

    def fold_binary(self, name: str, value: str) -> bytes:
        folded = super().fold_binary(name, value)
        gap = f"{name}:{self.linesep} ".encode("ascii")
        return f"{name}: ".encode("ascii") + folded[len(gap) :] if folded.startswith(gap) else folded


_SMTP = _Policy(linesep="\r\n")


def clean_header(value: str) -> str:
    """One line: CR, LF and other controls become a space, so no value can start a header."""
    return _CONTROL.sub(" ", value).strip()


def build_message(
    *,
    sender: str,
    to: Sequence[str],
    subject: str,
    body: str,
    message_id: str | None = None,
    sender_name: str = "opsrelay",
    date: datetime | None = None,
    extra_headers: Sequence[tuple[str, str]] = (),
    html: str | None = None,
    thread: str | None = None,
) -> bytes:
    """A mail built with ``email`` so that names are encoded (RFC 2047), never injected.

    text/plain, or multipart/alternative with the text first when ``html`` is given
    (RFC 2046 §5.1.4: the last part is the preferred one, the text is the fallback).
    ``thread`` is the Message-ID this mail replies to. An extra header replaces one of
    the same name set before it (a subscription may set its own Auto-Submitted).
    """
    msg = EmailMessage(policy=_SMTP)
    msg["From"] = formataddr((clean_header(sender_name), sender))
    msg["To"] = ", ".join(to)
    msg["Subject"] = clean_header(subject)
    msg["Date"] = format_datetime(date or datetime.now(UTC))
    msg["Message-ID"] = message_id or make_msgid(domain=sender.rpartition("@")[2] or None)
    if thread:
        # RFC 5322 §3.6.4: a reply names its parent in both; References would also
        # list the parent's own references, and a notice's parent is a thread's first mail.
        msg["In-Reply-To"] = clean_header(thread)
        msg["References"] = clean_header(thread)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies to alerts
    for name, value in extra_headers:
        name = clean_header(name)
        del msg[name]
        msg[name] = clean_header(value)
    msg.set_content(body)
    if html is not None:
        msg.add_alternative(html, subtype="html")
        for part in msg.iter_parts():
            del part["MIME-Version"]  # email adds it to a part made into a message; it belongs at the top only
    return msg.as_bytes()
