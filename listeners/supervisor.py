"""supervisord PROCESS_STATE_* and SUPERVISOR_STATE_CHANGE_* payloads -> :class:`relay.contract.event.Event` (pure).

What each type carries after ``processname groupname from_state`` is fixed by
``get_extra_values`` in supervisor/events.py:

========================  ==========================
STARTING, BACKOFF         ``tries`` (the backoff count)
RUNNING, STOPPING,        ``pid``
STOPPED
EXITED                    ``expected`` (0 or 1), ``pid``
FATAL, UNKNOWN            nothing more
========================  ==========================

supervisord's own lifecycle, ``SUPERVISOR_STATE_CHANGE_RUNNING`` and
``_STOPPING`` (``SupervisorRunningEvent`` / ``SupervisorStoppingEvent``), has an
empty payload: it becomes an event with empty ``group`` and ``process``.
"""

from __future__ import annotations

import re
from dataclasses import replace

from listeners.protocol import parse_fields
from relay.contract.event import STATES, SUPERVISOR_PREFIX, Event
from relay.errors import ProtocolError

__all__ = ["PREFIX", "SUPERVISOR_STATES", "event_from_payload", "handles"]

PREFIX = "PROCESS_STATE_"
# The only SUPERVISOR_STATE_CHANGE_* types supervisor/events.py defines.
SUPERVISOR_STATES = ("RUNNING", "STOPPING")
_DIGITS = re.compile(r"[0-9]+")


def handles(eventname: str) -> bool:
    """True for the event types this listener turns into events."""
    if eventname.startswith(SUPERVISOR_PREFIX):
        return eventname[len(SUPERVISOR_PREFIX) :] in SUPERVISOR_STATES
    return eventname.startswith(PREFIX) and eventname[len(PREFIX) :] in STATES


def _count(fields: dict[str, str], key: str) -> int | None:
    raw = fields.get(key)
    if raw is None:
        return None
    # supervisord writes plain decimal ints; int() would also take "+1", "1_0" and other digits.
    if not _DIGITS.fullmatch(raw):
        raise ProtocolError(f"{key} is not a non-negative integer: {raw!r}")
    return int(raw)


def _expected(raw: str | None) -> bool | None:
    if raw is None:
        return None
    if raw not in ("0", "1"):  # events.py writes int(self.expected)
        raise ProtocolError(f"expected is not 0 or 1: {raw!r}")
    return raw == "1"


def event_from_payload(eventname: str, payload: str, *, host: str, at: str | None = None) -> Event | None:
    """The event for a PROCESS_STATE_* or SUPERVISOR_STATE_CHANGE_* payload; None for types not handled
    (TICK_*, PROCESS_LOG_*, ...).

    Raises :class:`ProtocolError` for a PROCESS_STATE payload that cannot be read.
    """
    if not handles(eventname):
        return None
    if eventname.startswith(SUPERVISOR_PREFIX):
        # The payload is empty (events.SupervisorStateChangeEvent); nothing in it to read or refuse.
        event = Event(host=host, group="", process="", event=eventname, state=eventname[len(SUPERVISOR_PREFIX) :])
        return event if at is None else replace(event, at=at)
    if "\n" in payload:
        raise ProtocolError("PROCESS_STATE payload spans more than one line")
    fields = parse_fields(payload)
    process = fields.get("processname")
    group = fields.get("groupname")
    if not process:
        raise ProtocolError("PROCESS_STATE payload has no processname")
    if not group:
        raise ProtocolError("PROCESS_STATE payload has no groupname")
    state = eventname[len(PREFIX) :]
    pid = _count(fields, "pid")
    # supervisord sends pid:0 when there is no process (BACKOFF -> STOPPED in
    # Subprocess.kill, or after Subprocess.finish reset it): not a pid.
    if pid == 0:
        pid = None
    # from_state is getProcessStateDescription(code), which is None for an unknown code.
    from_state = fields.get("from_state") or None
    event = Event(
        host=host,
        group=group,
        process=process,
        event=eventname,
        state=state,
        from_state=None if from_state == "None" else from_state,
        expected=_expected(fields.get("expected")) if state == "EXITED" else None,
        pid=pid,
        tries=_count(fields, "tries"),
    )
    return event if at is None else replace(event, at=at)
