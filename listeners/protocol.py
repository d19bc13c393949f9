"""supervisord's eventlistener protocol as pure functions over text (no IO).

The exchange, one event at a time (supervisor ``dispatchers.py`` and
``process.py`` ``EventListenerPool._eventEnvelope``)::

    listener -> supervisord   READY\\n
    supervisord -> listener   ver:3.0 server:supervisor serial:21 pool:opsrelay poolserial:10 \\
                              eventname:PROCESS_STATE_EXITED len:84\\n
                              <payload: exactly len characters>
    listener -> supervisord   RESULT 2\\nOK          (or RESULT 4\\nFAIL: the event is re-sent later)

``len`` counts *characters*: supervisord measures ``len(payload)`` on the str
and only then encodes the whole envelope as UTF-8. Read the payload with
``TextIO.read(length)`` on a UTF-8 text stream, never as bytes.

Fields are ``key:value`` separated by one space (0x20). supervisord refuses
only the space, ``:`` and ``/`` in the names it validates
(``datatypes.process_or_group_name``); tabs, U+3000 and the like pass, and the
server identifier is free text. So unlike ``childutils.get_headers``
(``str.split()`` then ``split(':')``) a value here runs until the next
`` knownkey:``, and only the ASCII space separates fields.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from relay.errors import ProtocolError

__all__ = [
    "HEADER_KEYS",
    "PAYLOAD_KEYS",
    "READY",
    "Header",
    "HeaderError",
    "header_start",
    "parse_fields",
    "parse_header",
    "result_fail",
    "result_ok",
]

READY = "READY\n"

HEADER_KEYS = frozenset({"ver", "server", "serial", "pool", "poolserial", "eventname", "len"})
# Every key supervisord's own events put on their first payload line (supervisor/events.py).
PAYLOAD_KEYS = frozenset(
    {"processname", "groupname", "from_state", "expected", "pid", "tries", "channel", "when", "type"}
)

_DIGITS = re.compile(r"[0-9]+")
# A header begins with "ver:<no space> server:"; used to find it behind junk on the same line.
_HEADER_START = re.compile(r"ver:[^ ]* server:")


def _result(body: str) -> str:
    # RESULT's length counts what supervisord reads back: bytes. Ours are ASCII, so chars == bytes.
    return f"RESULT {len(body.encode('utf-8'))}\n{body}"


def result_ok() -> str:
    """Acknowledge the event: supervisord forgets it."""
    return _result("OK")


def result_fail() -> str:
    """Refuse the event: supervisord re-buffers it at the head and sends it again."""
    return _result("FAIL")


@dataclass(frozen=True, slots=True)
class Header:
    ver: str
    server: str
    serial: str
    pool: str
    poolserial: str
    eventname: str
    length: int


class HeaderError(ProtocolError):
    """A header line that cannot be used.

    ``length`` is the payload length when ``len:`` itself was readable, so the
    caller can still skip the payload and keep the stream framed.
    """

    def __init__(self, reason: str, *, length: int | None = None) -> None:
        super().__init__(reason)
        self.length = length


def _split(line: str, keys: Collection[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    key: str | None = None
    parts: list[str] = []
    for token in line.split(" "):
        name, colon, value = token.partition(":")
        if colon and name in keys:
            if key is not None:
                fields[key] = " ".join(parts)
            if name in fields:
                raise ProtocolError(f"field {name!r} appears twice")
            key, parts = name, [value]
        elif key is None:
            raise ProtocolError(f"expected a key:value field, got {token!r}")
        else:
            # Not a known key: still part of the previous value (e.g. a name with ':' in it).
            parts.append(token)
    if key is not None:
        fields[key] = " ".join(parts)
    return fields


def parse_fields(payload_line: str, keys: Collection[str] = PAYLOAD_KEYS) -> dict[str, str]:
    """``processname:a groupname:b pid:3`` -> ``{"processname": "a", ...}``.

    A value runs until the next `` key:`` whose key is in ``keys``. An empty
    line gives ``{}`` (supervisord's SUPERVISOR_STATE_CHANGE payload is empty).
    """
    if not payload_line:
        return {}
    return _split(payload_line, keys)


def _length(raw: str | None) -> int:
    if raw is None:
        raise HeaderError("header has no len field")
    if raw.startswith("-") and _DIGITS.fullmatch(raw[1:]):
        raise HeaderError(f"header len is negative: {raw!r}")
    # Not int(): it also takes "+5", " 5", "1_0" and non-ASCII digits, none of which supervisord writes.
    if not _DIGITS.fullmatch(raw):
        raise HeaderError(f"header len is not an integer: {raw!r}")
    return int(raw)


def parse_header(line: str) -> Header:
    """Parse one header line (its trailing newline is optional).

    Raises :class:`HeaderError` (a :class:`ProtocolError`) with a one-line reason.
    """
    text = line.removesuffix("\n")
    if "\n" in text:
        raise HeaderError("header spans more than one line")
    try:
        fields = _split(text, HEADER_KEYS)
    except ProtocolError as exc:
        raise HeaderError(f"bad header: {exc}") from None
    length = _length(fields.get("len"))
    eventname = fields.get("eventname", "")
    if not eventname:
        raise HeaderError("header has no eventname", length=length)
    return Header(
        ver=fields.get("ver", ""),
        server=fields.get("server", ""),
        serial=fields.get("serial", ""),
        pool=fields.get("pool", ""),
        poolserial=fields.get("poolserial", ""),
        eventname=eventname,
        length=length,
    )


def header_start(line: str) -> int | None:
    """Where the last thing that looks like a header starts in ``line``, or None.

    After a header without a usable ``len`` the payload cannot be skipped; it
    stays in the pipe and (a PROCESS_STATE payload has no newline) arrives glued
    to the front of the next header line. This finds that next header.
    """
    starts = [m.start() for m in _HEADER_START.finditer(line)]
    return starts[-1] if starts else None
