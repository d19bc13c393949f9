"""Silences: what an operator muted (``opsrelay silence add --match host=web1 --for 2h``), as pure values.

The silences live in the broker as a log of add and expire records that every relay
reads (``relay.contract.names.silences_queue``); a record is never edited in place, so
the current silences are a fold over the log. This module holds the records' one writer
and one reader, the matching and the summary of what a silence held back. It does no
IO and imports only the standard library, the event contract and the notice value types, so that the CLI, the
relay and the tests share it without loading pydantic, the config or an engine.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from relay.contract.event import Event, iso_utc
from relay.errors import MessageDecodeError
from relay.notify.notice import Notice, NoticeKind, mail_id
from relay.notify.state import MAX_LISTED

__all__ = [
    "MATCH_KEYS", "RECORD_VERSION", "Matcher", "Record", "Silence", "SilencedSummary", "active_silences",
    "decode_record", "encode_add", "encode_expire", "first_match", "fold", "make_silence", "new_silence_id",
    "parse_matcher", "read_silenced", "silenced_headers", "summarize", "summary_notice",
]

MATCH_KEYS = ("host", "group", "process", "program", "state", "subscription")
RECORD_VERSION = 1
_DOWN_STATES = frozenset({"EXITED", "FATAL", "BACKOFF", "UNKNOWN"})
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Matcher:
    """``key=pattern``: an fnmatch glob, case-sensitive as supervisord names are (``state`` is not)."""

    key: str
    pattern: str

    def __post_init__(self) -> None:
        if self.key not in MATCH_KEYS:
            raise ValueError(f"unknown match key {self.key!r} (known: {', '.join(MATCH_KEYS)})")
        if not self.pattern:
            raise ValueError(f"match {self.key}= has an empty pattern")

    def matches(self, event: Event, subscription: str) -> bool:
        if self.key == "state":
            return fnmatchcase(event.state.upper(), self.pattern.upper())
        if self.key == "program":
            # As crashmail's -p: "group:process", or the process name alone.
            names: tuple[str, ...] = (f"{event.group}:{event.process}", event.process)
        elif self.key == "subscription":
            names = (subscription,)
        else:
            names = (str(getattr(event, self.key)),)
        return any(fnmatchcase(name, self.pattern) for name in names)

    def __str__(self) -> str:
        return f"{self.key}={self.pattern}"


def parse_matcher(text: str) -> Matcher:
    """``'program=web_*'`` -> Matcher; ValueError with a one-line message otherwise."""
    key, sep, pattern = text.partition("=")
    if not sep:
        raise ValueError(f"match {text!r} needs the form key=pattern (keys: {', '.join(MATCH_KEYS)})")
    # supervisord names never start or end with spaces (config section names are stripped).
    return Matcher(key.strip(), pattern.strip())


def _iso(when: float) -> str:
    return iso_utc(datetime.fromtimestamp(when, UTC))


@dataclass(frozen=True, slots=True)
class Silence:
    """Mutes events that every matcher matches, from ``starts`` until before ``ends`` (unix seconds)."""

    id: str
    matchers: tuple[Matcher, ...]
    starts: float
    ends: float
    comment: str = ""
    created_by: str = ""
    quiet_summary: bool = False

    def active(self, now: float) -> bool:
        return self.starts <= now < self.ends

    def matches(self, event: Event, subscription: str) -> bool:
        return all(m.matches(event, subscription) for m in self.matchers)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "matchers": [str(m) for m in self.matchers], "starts": self.starts, "ends": self.ends,
                "starts_at": _iso(self.starts), "ends_at": _iso(self.ends), "comment": self.comment,
                "created_by": self.created_by, "quiet_summary": self.quiet_summary}


def new_silence_id() -> str:
    return secrets.token_hex(6)


def make_silence(matchers: Sequence[Matcher], *, starts: float, ends: float, comment: str = "",
                 created_by: str = "", quiet_summary: bool = False, id: str | None = None) -> Silence:
    """A validated Silence: at least one matcher, finite times, ``ends`` after ``starts``."""
    if not matchers:
        raise ValueError("a silence needs at least one match")
    if not (math.isfinite(starts) and math.isfinite(ends)):
        raise ValueError("a silence needs a finite start and end")
    if ends <= starts:
        raise ValueError("a silence needs an end after its start")
    if id == "":
        raise ValueError("a silence needs a non-empty id")
    return Silence(id or new_silence_id(), tuple(matchers), float(starts), float(ends), comment, created_by,
                   quiet_summary)


# -- records ------------------------------------------------------------------------


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode_add(silence: Silence) -> bytes:
    return _dumps({"v": RECORD_VERSION, "op": "add", "id": silence.id, "matchers": [str(m) for m in silence.matchers],
                   "starts": silence.starts, "ends": silence.ends, "comment": silence.comment,
                   "created_by": silence.created_by, "quiet_summary": silence.quiet_summary})


def encode_expire(silence_id: str, at: float) -> bytes:
    return _dumps({"v": RECORD_VERSION, "op": "expire", "id": silence_id, "at": at})


@dataclass(frozen=True, slots=True)
class Record:
    op: str
    id: str
    silence: Silence | None = None
    at: float | None = None


def _field(doc: dict[str, Any], name: str, kind: type[Any]) -> Any:
    if name not in doc:
        raise MessageDecodeError(f"silence record field {name!r} is missing")
    value = doc[name]
    if kind is float:
        # bool is an int subclass: true is not a time. json.loads reads NaN and Infinity.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise MessageDecodeError(f"silence record field {name!r} is not a finite number")
        return float(value)
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        raise MessageDecodeError(f"silence record field {name!r} has the wrong type {type(value).__name__}")
    # A \ud800 escape decodes to a lone surrogate, which `silence list` could not print.
    texts = value if kind is list else [value] if kind is str else []
    if any(_SURROGATE.search(text) for text in texts):
        raise MessageDecodeError(f"silence record field {name!r} is not valid Unicode (lone surrogate)")
    return value


def decode_record(body: bytes) -> Record:
    """Parse a record we wrote; anything else raises MessageDecodeError with a one-line reason."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageDecodeError(f"silence record is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MessageDecodeError("silence record is not a JSON object")
    version = doc.get("v")
    if version != RECORD_VERSION or isinstance(version, bool):
        raise MessageDecodeError(f"unsupported silence record version {version!r}")
    op, silence_id = _field(doc, "op", str), _field(doc, "id", str)
    if not silence_id:
        raise MessageDecodeError("silence record field 'id' is empty")
    if op == "expire":
        return Record("expire", silence_id, at=_field(doc, "at", float))
    if op != "add":
        raise MessageDecodeError(f"unknown silence record op {op!r}")
    texts: list[str] = _field(doc, "matchers", list)
    fields = (("starts", float), ("ends", float), ("comment", str), ("created_by", str), ("quiet_summary", bool))
    values: dict[str, Any] = {name: _field(doc, name, kind) for name, kind in fields}
    try:
        silence = make_silence([parse_matcher(t) for t in texts], id=silence_id, **values)
    except ValueError as exc:
        raise MessageDecodeError(f"silence record is invalid: {exc}") from None
    return Record("add", silence_id, silence=silence)


def fold(records: Iterable[Record]) -> dict[str, Silence]:
    """The silences by id, in the order added, each ended early by its expire records.

    An expire never moves an end past the start, and one for an unknown id (or a second
    add of an id) is ignored: the log is append-only, so the first add wins.
    """
    silences: dict[str, Silence] = {}
    for record in records:
        if record.op == "add" and record.silence is not None and record.id not in silences:
            silences[record.id] = record.silence
        elif record.op == "expire" and record.at is not None and (old := silences.get(record.id)) is not None:
            silences[record.id] = replace(old, ends=max(old.starts, min(old.ends, record.at)))
    return silences


def active_silences(silences: Iterable[Silence], now: float) -> list[Silence]:
    return [s for s in silences if s.active(now)]


def first_match(silences: Iterable[Silence], event: Event, subscription: str, now: float) -> Silence | None:
    return next((s for s in silences if s.active(now) and s.matches(event, subscription)), None)


# -- the summary when a silence ends ------------------------------------------------


@dataclass(frozen=True, slots=True)
class SilencedSummary:
    total: int
    processes: tuple[str, ...]
    still_down: tuple[str, ...]
    text: str


def summarize(events: Sequence[Event]) -> SilencedSummary:
    """What a silence held back: distinct processes (host first when several hosts) and those left down."""
    ordered = sorted(events, key=lambda e: e.at)  # ISO UTC strings of one format sort as times
    several_hosts = len({e.host for e in ordered}) > 1
    last: dict[str, Event] = {}
    for event in ordered:
        program = "supervisord" if event.is_supervisor else event.program
        last[f"{event.host} {program}" if several_hosts else program] = event
    down = tuple(p for p, e in last.items() if e.state in _DOWN_STATES and e.expected is not True)
    text = (f"while silenced: {len(events)} event{'' if len(events) == 1 else 's'},"
            f" {len(last)} process{'' if len(last) == 1 else 'es'}")
    return SilencedSummary(len(events), tuple(last), down, text)


# -- an event a silence kept, as it waits in <prefix>.silenced -------------------------

_SILENCE, _SUBSCRIPTION = "x-silence", "x-subscription"


def silenced_headers(silence_id: str, subscription: str) -> dict[str, str]:
    """The headers of a silenced event's message (its body is the event as published)."""
    return {_SILENCE: silence_id, _SUBSCRIPTION: subscription}


def read_silenced(headers: Mapping[str, object]) -> tuple[str, str] | None:
    """(silence id, subscription) of a silenced event's message; None for anything else."""
    silence, subscription = headers.get(_SILENCE), headers.get(_SUBSCRIPTION)
    if isinstance(silence, str) and isinstance(subscription, str) and silence and subscription:
        return silence, subscription
    return None


def summary_notice(silence_id: str, silence: Silence | None, subscription: str, events: Sequence[Event],
                   now: float, *, listed: int = MAX_LISTED) -> Notice:
    """The one mail per subscription when a silence ended: what it held back (first ``listed`` listed).

    ``silence`` None: its record is gone (ended long ago); the events still get their summary.
    Its mail id comes from the silence and subscription: a summary sent again after a crash is
    recognisably the same mail.
    """
    unique = sorted({e.id: e for e in events}.values(), key=lambda e: e.at)
    summary = summarize(unique)
    about = {"id": silence_id, "text": summary.text,
             "matchers": " ".join(str(m) for m in silence.matchers) if silence else "(its record is gone)",
             "comment": silence.comment if silence else ""}
    return Notice(NoticeKind.SILENCED, mail_id(NoticeKind.SILENCED, silence_id, subscription),
                  tuple(unique[:listed]), summary.total,
                  since=_iso(silence.starts) if silence else unique[0].at,
                  until=_iso(min(silence.ends, now) if silence else now),
                  silence=about, still_down=summary.still_down)
