"""RFC 5322 messages built with ``email``: names are encoded (RFC 2047), never injected."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, formataddr, make_msgid

__all__ = ["build_message", "clean_header"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


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
