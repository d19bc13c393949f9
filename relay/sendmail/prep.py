"""A message from stdin made ready to queue, as pure functions over bytes.

- Input ends at EOF, or (without ``-i``) at a line holding only ``.``, as sendmail reads it;
  the data is read in chunks, never past that line, so a writer that waits for us is not blocked.
- Line ends become CRLF (RFC 5322 §2.3), as they go on the wire: a bare LF or CR is what
  aiosmtplib would turn into CRLF anyway, and storing the wire form makes the queued size
  the SMTP ``SIZE``. Every other byte (8-bit text, lines longer than 998) is kept as it came.
- A leading mbox ``From `` line is dropped, as sendmail does. Input that does not start with
  a header field is all body (``echo hi | sendmail root``); a header block with a line that
  is neither a field nor a continuation is refused, rather than sent with its head cut off.
- Missing ``Date`` and ``Message-ID`` are added; ``From`` is added from the envelope when
  absent, or replaces the message's own when ``from_line_override`` is off (ssmtp's
  ``FromLineOverride=NO``); with ``-t`` the ``Bcc`` fields are removed from what is sent.

No email-package import: it costs more than the whole rest of a submission.
"""

from __future__ import annotations

import time

from relay.sendmail.addresses import AddressError, format_mailbox, parse_address_list

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class _Reader(Protocol):
        def read1(self, size: int = ..., /) -> bytes: ...

__all__ = [
    "MessageError",
    "Prepared",
    "TooLarge",
    "format_date",
    "make_message_id",
    "normalise_newlines",
    "prepare",
    "read_message",
    "split_header",
]

_CHUNK = 1 << 16
# RFC 5322 §3.6.3 (and §3.6.6 for Resent-*): where -t finds recipients.
_RCPT_FIELDS = (b"to", b"cc", b"bcc")
_RESENT_FIELDS = (b"resent-to", b"resent-cc", b"resent-bcc")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class MessageError(ValueError):
    """The message cannot be sent as given: exit 65 (EX_DATAERR) with this one line."""


class TooLarge(MessageError):
    pass


class Prepared:
    """The bytes to queue and the recipients ``-t`` found in the header."""

    __slots__ = ("header_recipients", "raw")

    def __init__(self, raw: bytes, header_recipients: tuple[str, ...]) -> None:
        self.raw = raw
        self.header_recipients = header_recipients


def _dot_end(data: bytes | bytearray, start: int, *, eof: bool) -> int | None:
    """Where the message ends if a line holding only "." begins at or after ``start``."""
    if start == 0 and (data[:2] == b".\n" or data[:3] == b".\r\n" or (eof and data == b".")):
        return 0
    found = [i for i in (data.find(b"\n.\n", max(0, start - 1)), data.find(b"\n.\r\n", max(0, start - 1)))
             if i >= 0]
    if found:
        return min(found) + 1
    if eof and data.endswith(b"\n."):
        return len(data) - 1
    return None


def read_message(stream: _Reader, *, dot_ends: bool, max_size: int) -> bytes:
    """Read one message; TooLarge past ``max_size`` bytes (the rest is left unread)."""
    data = bytearray()
    while True:
        before = len(data)
        chunk = stream.read1(_CHUNK)
        data += chunk
        if dot_ends:
            # Look again from the start of the last line before this chunk: "." may straddle chunks.
            end = _dot_end(data, data.rfind(b"\n", 0, before) + 1, eof=not chunk)
            if end is not None and end <= max_size:
                return bytes(data[:end])
        if len(data) > max_size:
            raise TooLarge(f"the message is larger than sendmail.max_size ({max_size} bytes)")
        if not chunk:
            return bytes(data)


def normalise_newlines(data: bytes) -> bytes:
    """CRLF for every line end: a bare LF or a bare CR becomes CRLF, CRLF stays."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _field_name(line: bytes) -> bytes | None:
    """The lower-cased name if ``line`` starts a header field (RFC 5322 §2.2, obs WSP before ':')."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon].rstrip(b" \t")
    if not name or any(b < 33 or b > 126 for b in name):
        return None
    return name.lower()


def split_header(data: bytes) -> tuple[list[bytes], bytes]:
    """``(fields, body)`` of CRLF data; each field keeps its continuation lines, without the final CRLF.

    MessageError when a line inside the header is neither a field nor a continuation.
    """
    if data.startswith(b"From "):
        data = data.partition(b"\r\n")[2]  # the mbox separator is not a header field
    first = data.partition(b"\r\n")[0]
    if _field_name(first) is None:
        return [], data  # no header at all: all of it is body
    fields: list[bytes] = []
    pos = 0
    number = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        line = data[pos:] if end < 0 else data[pos:end]
        nxt = len(data) if end < 0 else end + 2
        number += 1
        if line == b"":
            return fields, data[nxt:]
        if line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        elif _field_name(line) is not None:
            fields.append(line)
        else:
            shown = line[:60].decode("utf-8", "replace")
            raise MessageError(f"line {number} of the header is not a header field ({shown!r}); "
                               "a blank line must separate the header from the body")
        pos = nxt
    return fields, b""


def _name(field: bytes) -> bytes:
    return field[:field.find(b":")].rstrip(b" \t").lower()


def _value(field: bytes) -> str:
    raw = field[field.find(b":") + 1:]
    return raw.replace(b"\r\n", b"").decode("utf-8", "replace").strip()


def format_date(now: float) -> str:
    """RFC 5322 §3.3 date in local time, English names whatever the locale."""
    t = time.localtime(now)
    offset = (t.tm_gmtoff or 0) // 60
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset), 60)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hours:02d}{minutes:02d}")


def make_message_id(now: float, unique: str, domain: str) -> str:
    """``<20261127103000.4242.5f1c9a0b@domain>``: time, then the caller's unique part."""
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}.{unique}@{domain}>"


def prepare(data: bytes, *, from_address: str, full_name: str, extract_recipients: bool,
            from_line_override: bool, now: float, unique: str, domain: str) -> Prepared:
    """The message as it will be queued: CRLF, Date/Message-ID/From filled in, Bcc gone with -t.

    ``data`` is the input as read; ``from_address`` the mailbox a generated From: names.
    MessageError when it is empty, has a malformed header, or -t finds a malformed address.
    """
    if not data.strip():
        raise MessageError("the message is empty")
    fields, body = split_header(normalise_newlines(data))
    names = [_name(f) for f in fields]
    recipients: list[str] = []
    if extract_recipients:
        # RFC 5322 §3.6.6: a resent message goes to its Resent-* recipients only.
        wanted = _RESENT_FIELDS if any(n in _RESENT_FIELDS for n in names) else _RCPT_FIELDS
        for field, name in zip(fields, names, strict=True):
            if name in wanted:
                try:
                    recipients += parse_address_list(_value(field))
                except AddressError as exc:
                    raise MessageError(f"{name.decode().title()}: {exc}") from None
    # The blind copies must not show who else got the mail, with or without -t (as sendmail 8).
    drop = {b"bcc", b"resent-bcc"}
    if not from_line_override:
        drop.add(b"from")
    kept = [f for f, n in zip(fields, names, strict=True) if n not in drop]
    present = {n for f, n in zip(fields, names, strict=True) if n not in drop}
    added: list[str] = []
    if b"from" not in present:
        added.append(f"From: {format_mailbox(full_name, from_address)}")
    if b"date" not in present:
        added.append(f"Date: {format_date(now)}")
    if b"message-id" not in present:
        added.append(f"Message-ID: {make_message_id(now, unique, domain)}")
    header = b"".join(f + b"\r\n" for f in kept) + "".join(f"{a}\r\n" for a in added).encode("utf-8")
    return Prepared(header + b"\r\n" + body, tuple(recipients))
