"""The v1 event message: the public contract between listeners and relays.

Anyone may bind their own queue to the events exchange and read these, so the
shape only changes by bumping ``v`` and keeping the old one readable.
Standard library only: the listener imports this on its fast path.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from relay.errors import MessageDecodeError

__all__ = ["CONTENT_TYPE", "STATES", "Event", "decode_event", "encode_event", "utcnow_iso"]

CONTENT_TYPE = "application/json"
VERSION = 1
STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN")


def utcnow_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Event:
    """One supervisord process state change, normalised."""

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

    @property
    def program(self) -> str:
        """``group:process`` as supervisorctl shows it, or the bare name when they are equal."""
        return self.process if self.group == self.process else f"{self.group}:{self.process}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def encode_event(event: Event) -> bytes:
    # Key order follows the design document; ensure_ascii=False keeps names readable.
    doc = {"v": event.v, **{name: getattr(event, name) for name in _FIELDS}}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_event(body: bytes) -> Event:
    """Parse a v1 event; anything else raises :class:`MessageDecodeError` (never loops)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageDecodeError(f"event is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MessageDecodeError("event is not a JSON object")
    version = doc.get("v")
    if version != VERSION:
        raise MessageDecodeError(f"unsupported event version {version!r}")
    values: dict[str, Any] = {}
    for name, types in _FIELDS.items():
        value = doc.get(name)
        required = type(None) not in types
        if value is None and required:
            raise MessageDecodeError(f"event field {name!r} is missing")
        # bool is an int subclass: a pid of true is not a pid.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise MessageDecodeError(f"event field {name!r} has the wrong type {type(value).__name__}")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise MessageDecodeError(f"event field {name!r} is not valid Unicode (lone surrogate)") from None
        values[name] = value
    return Event(**values)
