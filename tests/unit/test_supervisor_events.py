"""listeners.supervisor: each PROCESS_STATE_* payload, in the form supervisord writes it, -> Event."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from supervisor import events
from supervisor.states import ProcessStates

from listeners.supervisor import event_from_payload, handles
from relay.contract.event import STATES, decode_event, encode_event
from relay.errors import ProtocolError

AT = "2026-11-27T10:00:00.123456Z"


def supervisord_payload(
    event_cls: type, *, name: str = "worker_03", group: str = "workers", pid: int = 4242, backoff: int = 2,
    from_state: int = ProcessStates.RUNNING, expected: bool = True,
) -> str:
    """The payload supervisord's own event class renders for a process like this."""
    process = SimpleNamespace(
        config=SimpleNamespace(name=name), group=SimpleNamespace(config=SimpleNamespace(name=group)),
        pid=pid, backoff=backoff,
    )
    payload: str = event_cls(process, from_state, expected).payload()
    return payload


# (supervisord's class, eventname, from_state, payload as supervisord writes it, expected Event fields)
CASES: list[tuple[type, str, int, str, dict[str, Any]]] = [
    (events.ProcessStateStoppedEvent, "PROCESS_STATE_STOPPED", ProcessStates.STOPPING,
     "processname:worker_03 groupname:workers from_state:STOPPING pid:4242",
     {"from_state": "STOPPING", "pid": 4242, "tries": None}),
    (events.ProcessStateStartingEvent, "PROCESS_STATE_STARTING", ProcessStates.BACKOFF,
     "processname:worker_03 groupname:workers from_state:BACKOFF tries:2",
     {"from_state": "BACKOFF", "pid": None, "tries": 2}),
    (events.ProcessStateRunningEvent, "PROCESS_STATE_RUNNING", ProcessStates.STARTING,
     "processname:worker_03 groupname:workers from_state:STARTING pid:4242",
     {"from_state": "STARTING", "pid": 4242, "tries": None}),
    (events.ProcessStateBackoffEvent, "PROCESS_STATE_BACKOFF", ProcessStates.STARTING,
     "processname:worker_03 groupname:workers from_state:STARTING tries:2",
     {"from_state": "STARTING", "pid": None, "tries": 2}),
    (events.ProcessStateStoppingEvent, "PROCESS_STATE_STOPPING", ProcessStates.RUNNING,
     "processname:worker_03 groupname:workers from_state:RUNNING pid:4242",
     {"from_state": "RUNNING", "pid": 4242, "tries": None}),
    (events.ProcessStateExitedEvent, "PROCESS_STATE_EXITED", ProcessStates.RUNNING,
     "processname:worker_03 groupname:workers from_state:RUNNING expected:1 pid:4242",
     {"from_state": "RUNNING", "pid": 4242, "tries": None, "expected": True}),
    (events.ProcessStateFatalEvent, "PROCESS_STATE_FATAL", ProcessStates.BACKOFF,
     "processname:worker_03 groupname:workers from_state:BACKOFF",
     {"from_state": "BACKOFF", "pid": None, "tries": None}),
    (events.ProcessStateUnknownEvent, "PROCESS_STATE_UNKNOWN", ProcessStates.RUNNING,
     "processname:worker_03 groupname:workers from_state:RUNNING",
     {"from_state": "RUNNING", "pid": None, "tries": None}),
]


def test_cases_cover_every_state() -> None:
    assert sorted(eventname for _, eventname, *_ in CASES) == sorted(f"PROCESS_STATE_{s}" for s in STATES)


@pytest.mark.parametrize(("event_cls", "eventname", "from_state", "payload", "want"), CASES,
                         ids=[case[1] for case in CASES])
def test_each_process_state_event(
    event_cls: type, eventname: str, from_state: int, payload: str, want: dict[str, Any]
) -> None:
    assert supervisord_payload(event_cls, from_state=from_state) == payload
    event = event_from_payload(eventname, payload, host="web1", at=AT)
    assert event is not None
    assert (event.host, event.group, event.process, event.event, event.state, event.at) == (
        "web1", "workers", "worker_03", eventname, eventname.removeprefix("PROCESS_STATE_"), AT,
    )
    assert event.from_state == want["from_state"]
    assert event.pid == want["pid"]
    assert event.tries == want["tries"]
    assert event.expected is want.get("expected")
    assert event.log_tail is None
    # What we build is a valid v1 wire event.
    assert decode_event(encode_event(event)) == event


def test_exited_unexpected() -> None:
    payload = supervisord_payload(events.ProcessStateExitedEvent, expected=False)
    assert payload == "processname:worker_03 groupname:workers from_state:RUNNING expected:0 pid:4242"
    event = event_from_payload("PROCESS_STATE_EXITED", payload, host="web1")
    assert event is not None
    assert event.expected is False


def test_expected_is_only_read_for_exited() -> None:
    event = event_from_payload("PROCESS_STATE_FATAL", "processname:a groupname:a expected:0", host="h")
    assert event is not None
    assert event.expected is None


def test_pid_zero_means_no_process() -> None:
    # Subprocess.kill sends BACKOFF -> STOPPED with the pid it has then: 0.
    payload = supervisord_payload(events.ProcessStateStoppedEvent, pid=0, from_state=ProcessStates.BACKOFF)
    assert payload.endswith(" pid:0")
    event = event_from_payload("PROCESS_STATE_STOPPED", payload, host="h")
    assert event is not None
    assert event.pid is None


def test_unknown_from_state_code() -> None:
    # getProcessStateDescription returns None for a code it does not know, and events.py prints it.
    payload = supervisord_payload(events.ProcessStateFatalEvent, from_state=999)
    assert "from_state:None" in payload
    event = event_from_payload("PROCESS_STATE_FATAL", payload, host="h")
    assert event is not None
    assert event.from_state is None


def test_names_with_non_ascii_colons_and_wide_spaces() -> None:
    payload = supervisord_payload(events.ProcessStateExitedEvent, name="wörker:ß\u30001", group="grüppe\t2")
    event = event_from_payload("PROCESS_STATE_EXITED", payload, host="wéb")
    assert event is not None
    assert (event.process, event.group, event.host) == ("wörker:ß\u30001", "grüppe\t2", "wéb")
    assert event.pid == 4242


def test_defaults_for_at_and_id() -> None:
    payload = supervisord_payload(events.ProcessStateFatalEvent)
    first = event_from_payload("PROCESS_STATE_FATAL", payload, host="h")
    second = event_from_payload("PROCESS_STATE_FATAL", payload, host="h")
    assert first is not None and second is not None
    assert first.at.endswith("Z") and first.at[:2] == "20"
    assert first.id != second.id


@pytest.mark.parametrize(
    ("eventname", "payload"),
    [
        ("TICK_60", "when:1700000000"),
        ("TICK_5", "not even fields"),
        ("PROCESS_LOG_STDERR", "processname:a groupname:a pid:1 channel:stderr\nTraceback (most recent):\n"),
        ("PROCESS_COMMUNICATION_STDOUT", "processname:a groupname:a pid:1\nhello"),
        ("PROCESS_GROUP_ADDED", "groupname:workers\n"),
        ("SUPERVISOR_STATE_CHANGE", ""),
        ("SUPERVISOR_STATE_CHANGE_RESTARTING", ""),
        ("REMOTE_COMMUNICATION", "type:x\ndata"),
        ("PROCESS_STATE", "processname:a groupname:a from_state:RUNNING"),
        ("PROCESS_STATE_BOGUS", "processname:a groupname:a from_state:RUNNING"),
    ],
)
def test_other_event_types_are_not_handled(eventname: str, payload: str) -> None:
    assert not handles(eventname)
    assert event_from_payload(eventname, payload, host="h") is None


@pytest.mark.parametrize(
    ("eventname", "payload", "reason"),
    [
        ("PROCESS_STATE_FATAL", "groupname:a from_state:BACKOFF", "no processname"),
        ("PROCESS_STATE_FATAL", "processname:a from_state:BACKOFF", "no groupname"),
        ("PROCESS_STATE_FATAL", "processname: groupname:a from_state:BACKOFF", "no processname"),
        ("PROCESS_STATE_FATAL", "", "no processname"),
        ("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:abc", "pid"),
        ("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:-1", "pid"),
        ("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:+1", "pid"),
        ("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:", "pid"),
        ("PROCESS_STATE_EXITED", "processname:a groupname:a from_state:RUNNING expected:y pid:1", "expected"),
        ("PROCESS_STATE_EXITED", "processname:a groupname:a from_state:RUNNING expected:2 pid:1", "expected"),
        ("PROCESS_STATE_BACKOFF", "processname:a groupname:a from_state:STARTING tries:1.5", "tries"),
        ("PROCESS_STATE_FATAL", "processname:a groupname:a\nfrom_state:BACKOFF", "more than one line"),
        ("PROCESS_STATE_FATAL", "nonsense", "key:value"),
    ],
)
def test_malformed_process_state_payload(eventname: str, payload: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        event_from_payload(eventname, payload, host="h")


# -- supervisord's own lifecycle ------------------------------------------------------------


@pytest.mark.parametrize(("event_cls", "state"), [(events.SupervisorRunningEvent, "RUNNING"),
                                                  (events.SupervisorStoppingEvent, "STOPPING")])
def test_supervisord_lifecycle_events(event_cls: type, state: str) -> None:
    eventname = events.getEventNameByType(event_cls)
    payload = event_cls().payload()
    assert (eventname, payload) == (f"SUPERVISOR_STATE_CHANGE_{state}", "")
    assert handles(eventname)
    event = event_from_payload(eventname, payload, host="web1", at=AT)
    assert event is not None
    assert (event.host, event.group, event.process, event.event, event.state, event.at) == (
        "web1", "", "", eventname, state, AT)
    assert (event.from_state, event.expected, event.pid, event.tries, event.log_tail) == (None,) * 5
    assert event.is_supervisor
    assert decode_event(encode_event(event)) == event


def test_supervisord_lifecycle_events_are_published_under_sup() -> None:
    from relay.contract.event import event_message

    running = event_from_payload("SUPERVISOR_STATE_CHANGE_RUNNING", "", host="db.main")
    assert running is not None
    key, message = event_message(running)
    assert key == "sup.db%2Emain.RUNNING"
    assert decode_event(message.body) == running
    assert message.message_id == running.id
    crash = event_from_payload("PROCESS_STATE_FATAL", "processname:a groupname:g from_state:BACKOFF", host="h")
    assert crash is not None
    assert event_message(crash)[0] == "proc.h.g.a.FATAL"
