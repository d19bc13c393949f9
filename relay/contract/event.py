"""The event message: the public contract between listeners and relays.

Anyone may bind their own queue to the events exchange and read these, so the
shape only changes by bumping ``v`` and keeping the old one readable.

* v1: the supervisord PROCESS_STATE payload, normalised.
* v2 adds what the listener learns from supervisord's XML-RPC at event time:
  ``exit_status`` (the code a process exited with), ``signal`` (``"SIGKILL"``
  when it was killed by one), ``spawnerr``, and ``notes`` (why any of those or
  ``log_tail`` is missing). It also carries supervisord's own lifecycle
  (``SUPERVISOR_STATE_CHANGE_*``): ``group`` and ``process`` are then empty.
  A v1 message decodes with those fields empty; the encoder writes v2.

Standard library only: the listener imports this on its fast path.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from relay.contract.keys import event_key, supervisor_key
from relay.contract.message import Message
from relay.errors import MessageDecodeError

__all__ = [
    "CONTENT_TYPE", "STATES", "SUPERVISOR_PREFIX", "Event", "decode_event", "encode_event", "event_message", "iso_utc",
    "utcnow_iso",
]

CONTENT_TYPE = "application/json"
VERSION = 2
READABLE_VERSIONS = (1, 2)
# supervisord's own lifecycle events: SUPERVISOR_STATE_CHANGE_RUNNING / _STOPPING.
SUPERVISOR_PREFIX = "SUPERVISOR_STATE_CHANGE_"
STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN")


def iso_utc(when: datetime) -> str:
    """An event's ``at``: UTC, microseconds, ``Z``."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow_iso() -> str:
    return iso_utc(datetime.now(UTC))


def _new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Event:
    """One supervisord process state change (or supervisord's own, see :attr:`is_supervisor`)."""

    host: str
    group: str
    process: str
    event: str
    state: str
    from_state: str | None = None
    expected: bool | None = None
    pid: int | None = None
    tries: int | None = None
    at: str = field(default_factory=utcnow_iso)
    log_tail: str | None = None
    id: str = field(default_factory=_new_id)
    v: int = VERSION
    # v2: from supervisord's getProcessInfo at event time (None: not known, see notes).
    exit_status: int | None = None
    signal: str | None = None
    spawnerr: str | None = None
    # Why something above or log_tail is missing ("supervisord not reachable: ...").
    notes: tuple[str, ...] = ()

    @property
    def is_supervisor(self) -> bool:
        """supervisord itself (SUPERVISOR_STATE_CHANGE_*), not one of its processes."""
        return self.event.startswith(SUPERVISOR_PREFIX)

    @property
    def program(self) -> str:
        """``group:process`` as supervisorctl shows it, or the bare name when they are equal."""
        return self.process if self.group == self.process else f"{self.group}:{self.process}"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["notes"] = list(self.notes)
        return doc


_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "host": (str,),
    "group": (str,),
    "process": (str,),
    "event": (str,),
    "state": (str,),
    "from_state": (str, type(None)),
    "expected": (bool, type(None)),
    "pid": (int, type(None)),
    "tries": (int, type(None)),
    "at": (str,),
    "log_tail": (str, type(None)),
}
_V2_FIELDS: dict[str, tuple[type, ...]] = {
    "exit_status": (int, type(None)),
    "signal": (str, type(None)),
    "spawnerr": (str, type(None)),
}


def encode_event(event: Event) -> bytes:
    # Key order follows the design document; ensure_ascii=False keeps names readable.
    doc: dict[str, Any] = {"v": VERSION, **{name: getattr(event, name) for name in (*_FIELDS, *_V2_FIELDS)}}
    doc["notes"] = list(event.notes)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _checked(doc: dict[str, Any], name: str, types: tuple[type, ...]) -> Any:
    value = doc.get(name)
    required = type(None) not in types
    if value is None and required:
        raise MessageDecodeError(f"event field {name!r} is missing")
    # bool is an int subclass: a pid of true is not a pid.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise MessageDecodeError(f"event field {name!r} has the wrong type {type(value).__name__}")
    if isinstance(value, str):
        _unicode(name, value)
    return value


def _unicode(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MessageDecodeError(f"event field {name!r} is not valid Unicode (lone surrogate)") from None


def _notes(doc: dict[str, Any]) -> tuple[str, ...]:
    notes = doc.get("notes")
    if notes is None:
        return ()
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise MessageDecodeError("event field 'notes' is not a list of strings")
    for note in notes:
        _unicode("notes", note)
    return tuple(notes)


def decode_event(body: bytes) -> Event:
    """Parse a v1 or v2 event; anything else raises :class:`MessageDecodeError` (never loops)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageDecodeError(f"event is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MessageDecodeError("event is not a JSON object")
    version = doc.get("v")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise MessageDecodeError(f"unsupported event version {version!r}")
    values: dict[str, Any] = {name: _checked(doc, name, types) for name, types in _FIELDS.items()}
    if version >= 2:
        values.update({name: _checked(doc, name, types) for name, types in _V2_FIELDS.items()})
        values["notes"] = _notes(doc)
    return Event(**values)


def event_message(event: Event) -> tuple[str, Message]:
    """The routing key and the message of an event (DESIGN.md: the public event contract).

    supervisord's own state changes go to ``sup.<host>.<STATE>``, so that no ``proc.`` binding sees them.
    """
    if event.is_supervisor:
        key = supervisor_key(event.host, event.state)
    else:
        key = event_key(event.host, event.group, event.process, event.state)
    return key, Message(encode_event(event), message_id=event.id, content_type=CONTENT_TYPE)
