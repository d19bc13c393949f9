"""listeners.protocol against the wire format supervisord itself writes and reads."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from supervisor import childutils, events
from supervisor.dispatchers import PEventListenerDispatcher
from supervisor.process import EventListenerPool
from supervisor.states import ProcessStates

from listeners.protocol import (
    READY,
    Header,
    HeaderError,
    header_start,
    parse_fields,
    parse_header,
    result_fail,
    result_ok,
)
from relay.errors import ProtocolError

# A name supervisord accepts (no space, ':' or '/') but str.split() cuts: U+3000 IDEOGRAPHIC SPACE.
WIDE_NAME = "ワーカー\u30001"
# Names without spaces, as supervisord's process_or_group_name allows (colons only before 4.x).
names = st.text(alphabet=st.characters(codec="utf-8", exclude_characters=" \n"), min_size=1, max_size=20)


def supervisord_envelope(event_cls: type, payload: str, *, identifier: str = "supervisor") -> str:
    """The envelope exactly as supervisord's EventListenerPool builds it."""
    options = SimpleNamespace(identifier=identifier)
    pool = SimpleNamespace(config=SimpleNamespace(name="opsrelay", options=options))
    envelope: str = EventListenerPool._eventEnvelope(pool, event_cls, 21, 10, payload)
    return envelope


def exited_payload(name: str, group: str) -> str:
    process = SimpleNamespace(
        config=SimpleNamespace(name=name), group=SimpleNamespace(config=SimpleNamespace(name=group)), pid=4242
    )
    payload: str = events.ProcessStateExitedEvent(process, ProcessStates.RUNNING, expected=False).payload()
    return payload


def test_tokens_match_supervisords_own() -> None:
    assert PEventListenerDispatcher.READY_FOR_EVENTS_TOKEN.decode() == READY
    for send, body in ((result_ok, "OK"), (result_fail, "FAIL")):
        out = io.StringIO()
        childutils.listener.send(body, out)
        assert send() == out.getvalue()
    assert (result_ok(), result_fail()) == ("RESULT 2\nOK", "RESULT 4\nFAIL")


def test_parse_header_of_a_real_envelope() -> None:
    payload = exited_payload("worker_03", "workers")
    line, _, rest = supervisord_envelope(events.ProcessStateExitedEvent, payload).partition("\n")
    header = parse_header(line + "\n")
    assert header == Header(
        ver="3.0", server="supervisor", serial="21", pool="opsrelay", poolserial="10",
        eventname="PROCESS_STATE_EXITED", length=len(payload),
    )
    assert rest == payload
    assert parse_header(line) == header  # the trailing newline is optional


def test_len_counts_characters_not_bytes() -> None:
    payload = exited_payload("wörker_ß", "grüppe")
    envelope = supervisord_envelope(events.ProcessStateExitedEvent, payload)
    line, _, rest = envelope.partition("\n")
    header = parse_header(line)
    assert len(payload.encode("utf-8")) > len(payload)
    assert header.length == len(payload)
    assert rest[: header.length] == payload


def test_server_identifier_with_spaces_and_colons() -> None:
    payload = exited_payload("a", "a")
    envelope = supervisord_envelope(events.ProcessStateExitedEvent, payload, identifier="web 1:9001")
    header = parse_header(envelope.partition("\n")[0])
    assert header.server == "web 1:9001"
    assert (header.pool, header.eventname) == ("opsrelay", "PROCESS_STATE_EXITED")
    assert header.length == len(payload)


@pytest.mark.parametrize(
    ("line", "reason", "length"),
    [
        ("ver:3.0 server:s serial:1 pool:p poolserial:1 eventname:TICK_5", "no len", None),
        ("ver:3.0 server:s serial:1 pool:p poolserial:1 eventname:TICK_5 len:abc", "not an integer", None),
        ("ver:3.0 eventname:TICK_5 len:", "not an integer", None),
        ("ver:3.0 eventname:TICK_5 len:+5", "not an integer", None),
        ("ver:3.0 eventname:TICK_5 len:1_0", "not an integer", None),
        ("ver:3.0 eventname:TICK_5 len:\u0663", "not an integer", None),  # ARABIC-INDIC DIGIT THREE
        ("ver:3.0 eventname:TICK_5 len:-4", "negative", None),
        ("ver:3.0 server:s serial:1 pool:p poolserial:1 len:15", "no eventname", 15),
        ("ver:3.0 eventname: len:15", "no eventname", 15),
        ("garbage", "expected a key:value field", None),
        ("", "expected a key:value field", None),
        ("ver:3.0 eventname:TICK_5 len:4 len:5", "appears twice", None),
        ("ver:3.0 eventname:TICK_5\nlen:5", "more than one line", None),
    ],
)
def test_malformed_header(line: str, reason: str, length: int | None) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_header(line)
    assert isinstance(info.value, HeaderError)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.length == length


def test_parse_fields_keeps_names_that_str_split_cuts() -> None:
    payload = exited_payload(WIDE_NAME, "grp\tx")
    fields = parse_fields(payload)
    assert fields == {
        "processname": WIDE_NAME, "groupname": "grp\tx", "from_state": "RUNNING",
        "expected": "0", "pid": "4242",
    }
    # supervisor's own helper splits on every whitespace and mis-reads the same payload.
    with pytest.raises(ValueError, match="dictionary update sequence"):
        childutils.get_headers(payload)


def test_parse_fields_value_with_colons_and_unknown_keys() -> None:
    assert parse_fields("processname:a:b groupname:x:y pid:7") == {
        "processname": "a:b", "groupname": "x:y", "pid": "7",
    }
    # A token whose key is not known stays part of the value before it.
    assert parse_fields("processname:a note:b groupname:g") == {"processname": "a note:b", "groupname": "g"}
    assert parse_fields("processname:a  b groupname:g") == {"processname": "a  b", "groupname": "g"}
    assert parse_fields("groupname: processname:p") == {"groupname": "", "processname": "p"}
    assert parse_fields("") == {}
    assert parse_fields("when:1700000000") == {"when": "1700000000"}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("hello processname:a", "expected a key:value field"),
        ("processname:a pid:1 pid:2", "appears twice"),
    ],
)
def test_parse_fields_rejects(line: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_fields(line)


def test_header_start_finds_a_header_behind_junk() -> None:
    payload = exited_payload("a", "a")
    line = supervisord_envelope(events.ProcessStateExitedEvent, payload).partition("\n")[0]
    assert header_start(line) == 0
    assert header_start("pid:42" + line) == len("pid:42")
    assert header_start("processname:a groupname:a pid:42") is None
    # A key that merely ends in "ver" is not a header.
    assert header_start("server:x") is None


@given(name=names, group=names)
def test_supervisord_payloads_round_trip(name: str, group: str) -> None:
    payload = exited_payload(name, group)
    fields = parse_fields(payload)
    assert (fields["processname"], fields["groupname"], fields["pid"]) == (name, group, "4242")
    header = parse_header(supervisord_envelope(events.ProcessStateExitedEvent, payload).partition("\n")[0])
    assert header.length == len(payload)
