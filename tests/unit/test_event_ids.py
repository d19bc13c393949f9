"""A resent supervisord event keeps its id, so a duplicate mail is recognisable by its Message-ID."""

from __future__ import annotations

from listeners.eventlistener import Publish, decide
from listeners.protocol import parse_header

PAYLOAD = "processname:worker groupname:workers from_state:RUNNING expected:0 pid:4242"


def _header(serial: int) -> str:
    return (f"ver:3.0 server:supervisor serial:{serial} pool:opsrelay poolserial:7 "
            f"eventname:PROCESS_STATE_EXITED len:{len(PAYLOAD)}")


def _id(serial: int, *, host: str = "web1", origin: str = "100") -> str:
    decision = decide(parse_header(_header(serial)), PAYLOAD, host=host, origin=origin)
    assert isinstance(decision, Publish)
    return decision.event.id


def test_the_same_envelope_gets_the_same_id() -> None:
    assert _id(21) == _id(21)


def test_another_event_another_supervisord_or_another_host_gets_another_id() -> None:
    ids = {_id(21), _id(22), _id(21, origin="101"), _id(21, host="web2")}
    assert len(ids) == 4
