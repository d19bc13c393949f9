"""Outbound mail as a value: the envelope, the raw RFC 5322 bytes, and the delivery history.

Its queue form (the ``x-*`` headers) is :mod:`relay.contract.envelope`'s; this module maps
the frozen :class:`OutboundMail` to and from a :class:`~relay.contract.message.Message`,
and makes dead letters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from relay.contract.envelope import CONTENT_TYPE, dead_headers, mail_headers, new_mail_id, read_envelope
from relay.contract.event import utcnow_iso
from relay.contract.message import Message
from relay.errors import MessageDecodeError

__all__ = ["CONTENT_TYPE", "Attempt", "OutboundMail", "dead_letter", "from_message", "to_message"]


@dataclass(frozen=True, slots=True)
class Attempt:
    at: str
    reply: str
    recipients: tuple[str, ...] = ()
    # host:port of the smarthost that answered ("" when none did, or in an older release's history).
    smarthost: str = ""


@dataclass(frozen=True, slots=True)
class OutboundMail:
    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    message_id: str = field(default_factory=new_mail_id)
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


def to_message(mail: OutboundMail, *, held: str | None = None) -> Message:
    """The mail as it waits on a queue (``held``: the fault it waits for, in a retry queue)."""
    headers = mail_headers(mail.sender, mail.recipients, attempts=mail.attempts,
                           history=[(a.at, a.reply, a.recipients, a.smarthost) for a in mail.history],
                           origin=mail.origin, holds=mail.holds, held=held)
    return Message(body=mail.raw, message_id=mail.message_id, content_type=CONTENT_TYPE, headers=headers)


def from_message(message: Message) -> OutboundMail:
    """Raise MessageDecodeError for anything that is not a mail we queued (it must not loop)."""
    sender, recipients, attempts, holds, history, origin = read_envelope(message.headers)
    if not message.body:
        raise MessageDecodeError("mail has an empty body")
    return OutboundMail(sender=sender, recipients=recipients, raw=message.body, message_id=message.message_id,
                        attempts=attempts, history=tuple(Attempt(*entry) for entry in history), origin=origin,
                        holds=holds)


def dead_letter(message: Message, *, reason: str, source: str, kind: str) -> Message:
    """The message as it was, plus why and from where it was dead-lettered."""
    headers = {**message.headers, **dead_headers(reason=reason, at=utcnow_iso(), source=source, kind=kind)}
    return Message(message.body, message.message_id, message.content_type, headers)
