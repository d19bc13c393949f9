"""relay.notify.silence: matchers, the silence window, the add/expire record log and its fold, the summary."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relay.contract.event import Event
from relay.errors import MessageDecodeError
from relay.notify.silence import (
    MATCH_KEYS,
    Matcher,
    Record,
    Silence,
    active_silences,
    decode_record,
    encode_add,
    encode_expire,
    first_match,
    fold,
    make_silence,
    new_silence_id,
    parse_matcher,
    summarize,
)

T0 = 1_795_773_600.0  # 2026-11-27T10:00:00Z


def ev(state: str = "EXITED", *, host: str = "web1", group: str = "web", process: str = "web_01",
       expected: bool | None = False, second: int = 0, event: str | None = None) -> Event:
    return Event(host=host, group=group, process=process, event=event or f"PROCESS_STATE_{state}", state=state,
                 from_state="RUNNING", expected=expected, pid=4242, at=f"2026-11-27T10:00:{second:02d}.000000Z")


def silence(*matches: str, starts: float = T0, ends: float = T0 + 7200, id: str = "s1", **extra: Any) -> Silence:
    return make_silence([parse_matcher(m) for m in matches], starts=starts, ends=ends, id=id, **extra)


def add(sid: str, starts: float = T0, ends: float = T0 + 7200) -> Record:
    return decode_record(encode_add(silence("host=web1", starts=starts, ends=ends, id=sid)))


def expire(sid: str, at: float) -> Record:
    return decode_record(encode_expire(sid, at))


# -- matchers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "pattern"),
    [("program=web_*", "program", "web_*"), ("host=web1", "host", "web1"), ("state=exited", "state", "exited"),
     ("subscription=ops", "subscription", "ops"), (" host = web1 ", "host", "web1"), ("process=a=b", "process", "a=b"),
     ("group=[!x]*", "group", "[!x]*")],
)
def test_parse_matcher(text: str, key: str, pattern: str) -> None:
    matcher = parse_matcher(text)
    assert matcher == Matcher(key, pattern)
    assert str(matcher) == f"{key}={pattern}"


@pytest.mark.parametrize(
    ("text", "message"),
    [("web1", "needs the form key=pattern"), ("", "needs the form key=pattern"),
     ("name=web1", "unknown match key 'name' \\(known: host, group, process, program, state, subscription\\)"),
     ("=web1", "unknown match key ''"), ("host=", "empty pattern"), ("host=  ", "empty pattern")],
)
def test_parse_matcher_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_matcher(text)
    assert "\n" not in str(info.value)


def test_matcher_constructor_validates_too() -> None:
    with pytest.raises(ValueError, match="unknown match key 'pid'"):
        Matcher("pid", "1")
    assert MATCH_KEYS == ("host", "group", "process", "program", "state", "subscription")


@pytest.mark.parametrize(
    ("pattern", "group", "process", "expected"),
    [("web:web_01", "web", "web_01", True), ("web_01", "web", "web_01", True), ("web_*", "web", "web_01", True),
     ("web:*", "web", "web_01", True), ("*:web_01", "web", "web_01", True), ("db:*", "web", "web_01", False),
     ("web", "web", "web_01", False), ("worker", "worker", "worker", True), ("Web_01", "web", "web_01", False)],
)
def test_program_matches_group_colon_process_or_process(pattern: str, group: str, process: str,
                                                        expected: bool) -> None:
    assert Matcher("program", pattern).matches(ev(group=group, process=process), "ops") is expected


@pytest.mark.parametrize(
    ("key", "pattern", "expected"),
    [("host", "web1", True), ("host", "web*", True), ("host", "WEB1", False), ("host", "web2", False),
     ("group", "web", True), ("group", "we?", True), ("group", "db", False), ("process", "web_0[0-9]", True),
     ("process", "web", False), ("subscription", "ops", True), ("subscription", "o*", True),
     ("subscription", "pager", False)],
)
def test_field_matchers_are_case_sensitive_globs(key: str, pattern: str, expected: bool) -> None:
    assert Matcher(key, pattern).matches(ev(), "ops") is expected


@pytest.mark.parametrize(
    ("pattern", "state", "expected"),
    [("EXITED", "EXITED", True), ("exited", "EXITED", True), ("Fat*", "FATAL", True), ("exited", "FATAL", False),
     ("*", "RUNNING", True), ("back?ff", "BACKOFF", True)],
)
def test_state_matches_ignoring_case(pattern: str, state: str, expected: bool) -> None:
    assert Matcher("state", pattern).matches(ev(state), "ops") is expected


def test_all_matchers_must_match() -> None:
    both = silence("program=web_*", "host=web1")
    assert both.matches(ev(host="web1"), "ops")
    assert not both.matches(ev(host="web2"), "ops")
    assert not both.matches(ev(host="web1", group="db", process="db_01"), "ops")


# -- the silence -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [(T0 - 0.001, False), (T0, True), (T0 + 3600, True), (T0 + 7199.999, True), (T0 + 7200, False)],
)
def test_active_from_start_until_before_end(now: float, expected: bool) -> None:
    assert silence("host=web1").active(now) is expected


@pytest.mark.parametrize(
    ("matches", "starts", "ends", "message"),
    [((), T0, T0 + 1, "at least one match"), (("host=web1",), T0, T0, "a silence needs an end after its start"),
     (("host=web1",), T0, T0 - 1, "a silence needs an end after its start"),
     (("host=web1",), T0, float("inf"), "finite"), (("host=web1",), float("nan"), T0, "finite")],
)
def test_make_silence_validates(matches: tuple[str, ...], starts: float, ends: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        silence(*matches, starts=starts, ends=ends)


def test_make_silence_refuses_an_empty_id_and_makes_one_when_none() -> None:
    with pytest.raises(ValueError, match="non-empty id"):
        silence("host=web1", id="")
    made = make_silence([Matcher("host", "web1")], starts=T0, ends=T0 + 1)
    assert len(made.id) == 12 and set(made.id) <= set("0123456789abcdef")


def test_new_silence_ids_are_twelve_hex_and_differ() -> None:
    ids = {new_silence_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 12 and set(i) <= set("0123456789abcdef") for i in ids)


def test_to_dict() -> None:
    s = silence("program=web_*", "host=web1", comment="deploy 4711", created_by="ann@ops1", quiet_summary=True)
    assert s.to_dict() == {
        "id": "s1", "matchers": ["program=web_*", "host=web1"], "starts": T0, "ends": T0 + 7200,
        "starts_at": "2026-11-27T10:00:00.000000Z", "ends_at": "2026-11-27T12:00:00.000000Z",
        "comment": "deploy 4711", "created_by": "ann@ops1", "quiet_summary": True,
    }
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()


# -- records -------------------------------------------------------------------------


def test_add_round_trip() -> None:
    s = silence("program=web_*", "state=exited", comment="deploy ü 4711", created_by="ann@ops1", quiet_summary=True)
    body = encode_add(s)
    assert json.loads(body) == {"v": 1, "op": "add", "id": "s1", "matchers": ["program=web_*", "state=exited"],
                                "starts": T0, "ends": T0 + 7200, "comment": "deploy ü 4711",
                                "created_by": "ann@ops1", "quiet_summary": True}
    assert decode_record(body) == Record("add", "s1", silence=s, at=None)


def test_expire_round_trip() -> None:
    body = encode_expire("s1", T0 + 60.5)
    assert json.loads(body) == {"v": 1, "op": "expire", "id": "s1", "at": T0 + 60.5}
    assert decode_record(body) == Record("expire", "s1", silence=None, at=T0 + 60.5)


def _add_doc(**changes: Any) -> bytes:
    doc = json.loads(encode_add(silence("host=web1")))
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"not json", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[1]", "not a JSON object"),
     (_add_doc(v=2), "unsupported silence record version 2"), (_add_doc(v=...), "version None"),
     (_add_doc(v=True), "version True"), (_add_doc(op="delete"), "unknown silence record op 'delete'"),
     (_add_doc(op=...), "field 'op' is missing"), (_add_doc(id=...), "field 'id' is missing"),
     (_add_doc(id=""), "field 'id' is empty"), (_add_doc(ends=...), "field 'ends' is missing"),
     (_add_doc(comment=...), "field 'comment' is missing"), (_add_doc(matchers=...), "field 'matchers' is missing"),
     (_add_doc(starts="soon"), "'starts' is not a finite number"), (_add_doc(ends=True), "'ends' is not a finite"),
     (_add_doc(matchers="host=web1"), "'matchers' has the wrong type str"),
     (_add_doc(matchers=[1]), "'matchers' has the wrong type list"),
     (_add_doc(quiet_summary=1), "'quiet_summary' has the wrong type int"),
     (_add_doc(matchers=["pid=1"]), "invalid: unknown match key 'pid'"),
     (_add_doc(matchers=[]), "invalid: a silence needs at least one match"),
     (_add_doc(ends=T0), "invalid: a silence needs an end after its start"),
     (_add_doc(comment="\ud800"), "'comment' is not valid Unicode"),
     (b'{"v":1,"op":"add","id":"s1","matchers":["host=web1"],"starts":NaN,"ends":1,"comment":"",'
      b'"created_by":"","quiet_summary":false}', "'starts' is not a finite number"),
     (b'{"v":1,"op":"expire","id":"s1"}', "field 'at' is missing"),
     (b'{"v":1,"op":"expire","id":"s1","at":"now"}', "'at' is not a finite number")],
)
def test_decode_errors(body: bytes, message: str) -> None:
    with pytest.raises(MessageDecodeError, match=message) as info:
        decode_record(body)
    assert "\n" not in str(info.value)


# -- the fold ------------------------------------------------------------------------


def test_fold_keeps_the_order_added() -> None:
    assert list(fold([add("b"), add("a"), add("c")])) == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("at", "ends"),
    [(T0 + 600, T0 + 600), (T0 + 9000, T0 + 7200), (T0 - 600, T0), (T0, T0)],
    ids=["while-active", "after-end", "before-start", "at-start"],
)
def test_fold_expire(at: float, ends: float) -> None:
    folded = fold([add("s1"), add("s2"), expire("s1", at)])
    assert folded["s1"].ends == ends
    assert folded["s1"].starts == T0
    assert folded["s2"].ends == T0 + 7200


def test_fold_expired_silence_is_inactive_afterwards() -> None:
    folded = fold([add("s1"), expire("s1", T0 + 600)])
    assert folded["s1"].active(T0 + 599)
    assert not folded["s1"].active(T0 + 600)
    assert not fold([add("s1"), expire("s1", T0 - 1)])["s1"].active(T0)


def test_fold_second_expire_cannot_extend() -> None:
    assert fold([add("s1"), expire("s1", T0 + 60), expire("s1", T0 + 600)])["s1"].ends == T0 + 60


def test_fold_ignores_expire_of_unknown_id_and_second_add() -> None:
    folded = fold([expire("s1", T0 + 60), add("s1", ends=T0 + 100), add("s1", ends=T0 + 999), expire("zz", T0)])
    assert list(folded) == ["s1"]
    assert folded["s1"].ends == T0 + 100


# -- choosing a silence --------------------------------------------------------------


def test_active_silences() -> None:
    past = silence("host=web1", id="past", starts=T0 - 100, ends=T0)
    now = silence("host=web1", id="now")
    future = silence("host=web1", id="future", starts=T0 + 1, ends=T0 + 2)
    assert [s.id for s in active_silences([past, now, future], T0)] == ["now"]


def test_first_match_skips_inactive_and_unmatched() -> None:
    expired = silence("host=web1", id="expired", starts=T0 - 100, ends=T0 - 1)
    other_host = silence("host=web2", id="other")
    hit = silence("program=web_*", id="hit")
    later = silence("host=web1", id="later")
    assert first_match([expired, other_host, hit, later], ev(), "ops", T0) is hit
    assert first_match([expired, later], ev(), "ops", T0) is later
    assert first_match([expired, other_host], ev(), "ops", T0) is None
    assert first_match([hit], ev(), "ops", T0 + 7200) is None


def test_subscription_matcher_picks_the_subscription() -> None:
    only_ops = [silence("subscription=ops", "host=web1")]
    assert first_match(only_ops, ev(), "ops", T0) is not None
    assert first_match(only_ops, ev(), "pager", T0) is None


# -- summary -------------------------------------------------------------------------


def test_summarize_counts_processes_in_time_order() -> None:
    events = [ev(process="web_02", second=5), ev(process="web_01", second=1), ev("RUNNING", second=9),
              ev(group="worker", process="worker", second=3), ev(process="web_02", second=7)]
    summary = summarize(events)
    assert summary.total == 5
    assert summary.processes == ("web:web_01", "worker", "web:web_02")
    assert summary.text == "while silenced: 5 events, 3 processes"


def test_summarize_still_down_by_last_event() -> None:
    events = [
        ev("EXITED", process="a", second=1), ev("RUNNING", process="a", second=2),  # came back
        ev("RUNNING", process="b", second=1), ev("FATAL", process="b", expected=None, second=2),
        ev("STARTING", process="c", second=1), ev("BACKOFF", process="c", expected=None, second=3),
        ev("UNKNOWN", process="d", expected=None, second=1),
        ev("EXITED", process="e", expected=True, second=1),  # an expected exit is not down
        ev("RUNNING", process="f", second=1), ev("STOPPED", process="f", second=4),
        ev("RUNNING", process="g", second=9), ev("EXITED", process="g", second=8),  # sorted by at, not by list order
    ]
    summary = summarize(events)
    assert summary.processes == tuple(f"web:{p}" for p in "abcdefg")
    assert summary.still_down == ("web:b", "web:c", "web:d")


def test_summarize_singular_and_empty() -> None:
    one = summarize([ev()])
    assert (one.total, one.processes, one.still_down) == (1, ("web:web_01",), ("web:web_01",))
    assert one.text == "while silenced: 1 event, 1 process"
    assert summarize([ev(second=1), ev(second=2)]).text == "while silenced: 2 events, 1 process"
    assert summarize([]).text == "while silenced: 0 events, 0 processes"


def test_summarize_names_hosts_when_several() -> None:
    summary = summarize([ev(host="web1", second=1), ev(host="web2", second=2), ev("RUNNING", host="web1", second=3)])
    assert summary.processes == ("web1 web:web_01", "web2 web:web_01")
    assert summary.still_down == ("web2 web:web_01",)
    assert summary.text == "while silenced: 3 events, 2 processes"


def test_summarize_names_supervisord_itself() -> None:
    summary = summarize([ev("RUNNING", group="", process="", expected=None, event="SUPERVISOR_STATE_CHANGE_RUNNING")])
    assert summary.processes == ("supervisord",)
    assert summary.still_down == ()
