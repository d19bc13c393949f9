"""The eventlistener loop: READY, read one event, decide, publish, answer, repeat.

The policy is pure (:func:`decide`, and :func:`relay.timing.doubling` for the pause after a FAIL); :func:`run` only
moves text between the streams it is given and the publisher.

* A handled event is answered OK only after ``publish`` returned (durable).
* ``publish`` raised a :class:`RelayError`: answer FAIL. supervisord puts the
  event back at the head of its buffer and sends it again (``handle_rejected``
  in supervisor/process.py), so nothing is lost; we pause before the next READY
  so that an outage does not turn into a hot resend loop.
* Any other exception ends the process unanswered; supervisord re-buffers the
  event of a listener that dies while busy and restarts the listener.
* Other event types, and events we cannot read, are answered OK (logged): a
  FAIL would only bring the same unreadable event back forever.
* TICK_* events call the publisher's ``tick()`` when it has one (a spooling
  publisher forwards what it spooled); it must not block.
* An ``enrich`` callable (listeners.enrich: exit status, signal, log tail from
  supervisord's XML-RPC) may add to an event before it is published. It runs
  while supervisord waits for our answer, so it must bound itself
  (``listener.fetch_timeout``); it never changes the event's id, which comes
  from the envelope, so a resend is still the same event. An exception from it
  costs the enrichment, never the event.

stdout carries the protocol and nothing else; logs go to the
``opsrelay.listener`` logger (stderr).
"""

from __future__ import annotations

import io
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol, TextIO, runtime_checkable

from listeners import protocol
from listeners.protocol import Header, HeaderError
from listeners.supervisor import event_from_payload
from relay.contract.event import Event
from relay.errors import ProtocolError, RelayError
from relay.timing import doubling

__all__ = [
    "Decision",
    "Enrich",
    "Ignore",
    "Malformed",
    "Publish",
    "Publisher",
    "Ticker",
    "decide",
    "run",
    "text_streams",
]

log = logging.getLogger("opsrelay.listener")
# The pause before READY after FAILs in a row: supervisord resends, we must not spin.
FAIL_PAUSE_FIRST, FAIL_PAUSE_CAP = 0.5, 30.0


class Publisher(Protocol):
    def publish(self, event: Event) -> None:
        """Return once the event is durable; raise a :class:`RelayError` otherwise."""


# Adds what supervisord knows beyond the payload; returns at once for events it does not enrich.
Enrich = Callable[[Event], Event]


@runtime_checkable
class Ticker(Protocol):
    """A publisher that wants supervisord's TICK_* events (optional: a plain publisher ignores them)."""

    def tick(self) -> None:
        """Return at once; a RelayError is logged, the TICK is answered OK either way."""


@dataclass(frozen=True, slots=True)
class Publish:
    event: Event


@dataclass(frozen=True, slots=True)
class Ignore:
    eventname: str


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: str


Decision = Publish | Ignore | Malformed


_EVENT_IDS = uuid.UUID("6f7073e2-7265-4c61-b900-000000000002")


def event_id(header: Header, payload: str, *, host: str, origin: str) -> str:
    """The same id each time supervisord sends the same event.

    After FAIL (or a confirm that came too late) supervisord resends the very envelope, with its
    ``serial``; hashing it with the host and ``origin`` (which supervisord process: its pid, since
    serials restart with it) makes the resend a recognisable duplicate, down to the Message-ID.
    """
    key = "\0".join((host, origin, header.server, str(header.serial), header.eventname, payload))
    return str(uuid.uuid5(_EVENT_IDS, key))


def decide(header: Header, payload: str, *, host: str, at: str | None = None, origin: str = "") -> Decision:
    """What to do with one framed event."""
    try:
        event = event_from_payload(header.eventname, payload, host=host, at=at)
    except ProtocolError as exc:
        return Malformed(str(exc))
    if event is None:
        return Ignore(header.eventname)
    return Publish(replace(event, id=event_id(header, payload, host=host, origin=origin)))


def text_streams(stdin: BinaryIO, stdout: BinaryIO) -> tuple[TextIO, TextIO]:
    """Text streams fit for the protocol over binary stdin/stdout.

    UTF-8 whatever the locale (supervisord encodes the envelope as UTF-8), and
    ``newline="\\n"``: the default universal-newline mode would turn a payload's
    ``\\r\\n`` into ``\\n`` and shift the character framing of every later event.
    """
    return (
        io.TextIOWrapper(stdin, encoding="utf-8", newline="\n"),
        io.TextIOWrapper(stdout, encoding="utf-8", newline="\n", write_through=True),
    )


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _send(stdout: TextIO, text: str) -> None:
    stdout.write(text)
    stdout.flush()


def _parse_header(line: str) -> Header | HeaderError:
    try:
        return protocol.parse_header(line)
    except HeaderError as exc:
        error = exc
    start = protocol.header_start(line)
    if start:
        try:
            header = protocol.parse_header(line[start:])
        except HeaderError:
            return error
        # The rest of an envelope we could not frame, glued to the next header.
        log.warning("discarded %r before an event header", line[:start])
        return header
    return error


def _next_header(stdin: TextIO, *, framed: bool) -> tuple[str, Header | HeaderError] | None:
    """The next envelope's header line and its parse; None at the end of stdin.

    ``framed`` is False after a header without a usable ``len``: the rest of
    that envelope may still come as lines, and supervisord sends one envelope
    per READY, so answering those lines would break the lockstep (a RESULT while
    supervisord waits for READY makes it drop the listener into its UNKNOWN
    state). Skip them quietly until something that looks like a header.
    """
    while True:
        line = stdin.readline()
        if not line:
            log.info("stdin closed, exiting")
            return None
        if not line.endswith("\n"):
            log.warning("stdin ended inside a header: %r", line)
            return None
        parsed = _parse_header(line)
        if framed or isinstance(parsed, Header) or protocol.header_start(line) is not None:
            return line, parsed
        log.warning("discarded %r while looking for the next event header", line)


def _enriched(event: Event, enrich: Enrich | None) -> Event:
    if enrich is None:
        return event
    try:
        return enrich(event)
    except Exception:
        # A bug in the enrichment must not cost the event (nor leave it unanswered).
        log.exception("enriching %s %s failed; published without it", event.program, event.state)
        return replace(event, notes=(*event.notes, "log tail unavailable: the listener failed to fetch it "
                                                   "(see its log)"))


def _publish(event: Event, publisher: Publisher) -> str:
    try:
        publisher.publish(event)
    except RelayError as exc:
        log.warning(
            "publish of %s %s failed, answered FAIL (supervisord will resend): %s: %s",
            event.program or "supervisord", event.state, type(exc).__name__, _one_line(str(exc)),
        )
        return protocol.result_fail()
    return protocol.result_ok()


def _answer(header: Header, payload: str, publisher: Publisher, host: str, enrich: Enrich | None) -> str:
    decision = decide(header, payload, host=host, origin=str(os.getppid()))
    if isinstance(decision, Publish):
        return _publish(_enriched(decision.event, enrich), publisher)
    if isinstance(decision, Ignore) and decision.eventname.startswith("TICK_") and isinstance(publisher, Ticker):
        try:
            publisher.tick()
        except RelayError as exc:
            # A TICK is not worth resending: supervisord sends the next one in a few seconds.
            log.warning("tick: %s: %s", type(exc).__name__, _one_line(str(exc)))
    if isinstance(decision, Malformed):
        log.warning("malformed %s payload (%s), answered OK: %r", header.eventname, decision.reason, payload)
    return protocol.result_ok()


def _read_exactly(stdin: TextIO, length: int) -> str | None:
    payload = stdin.read(length)
    if len(payload) < length:
        log.warning("stdin ended inside a payload: %r", payload)
        return None
    return payload


def run(
    stdin: TextIO,
    stdout: TextIO,
    publisher: Publisher,
    *,
    host: str,
    max_events: int | None = None,
    sleep: Callable[[float], object] = time.sleep,
    enrich: Enrich | None = None,
) -> int:
    """Serve supervisord until stdin ends (or ``max_events`` were answered); returns the exit code.

    ``stdin`` must count characters as supervisord does: see :func:`text_streams`.
    ``enrich`` adds to each event before it is published (see the module's docstring).
    """
    answered = 0
    failures = 0
    framed = True
    while max_events is None or answered < max_events:
        if failures:
            sleep(doubling(failures, first=FAIL_PAUSE_FIRST, cap=FAIL_PAUSE_CAP))
        _send(stdout, protocol.READY)
        got = _next_header(stdin, framed=framed)
        if got is None:
            return 0
        line, header = got
        if isinstance(header, HeaderError):
            # With a readable len the payload can still be skipped and the stream stays framed.
            framed = header.length is not None
            if framed and _read_exactly(stdin, header.length or 0) is None:
                return 0
            log.warning("malformed header (%s), answered OK: %r", header, line)
            result = protocol.result_ok()
        else:
            framed = True
            payload = _read_exactly(stdin, header.length)
            if payload is None:
                return 0
            result = _answer(header, payload, publisher, host, enrich)
        failures = failures + 1 if result == protocol.result_fail() else 0
        _send(stdout, result)
        answered += 1
    return 0
