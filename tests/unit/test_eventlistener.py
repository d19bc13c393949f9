"""listeners.eventlistener: the loop over in-memory streams and a real OS pipe, and its pure policy."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from supervisor import events
from supervisor.process import EventListenerPool
from supervisor.states import ProcessStates

from listeners.eventlistener import (
    FAIL_PAUSE_CAP,
    FAIL_PAUSE_FIRST,
    Ignore,
    Malformed,
    Publish,
    decide,
    run,
    text_streams,
)
from listeners.protocol import Header
from relay.contract.event import Event
from relay.errors import BrokerUnavailable
from relay.timing import doubling

LOGGER = "opsrelay.listener"


def envelope(eventname: str, payload: str, serial: int = 1) -> str:
    """Header + payload in supervisord's format; len counts characters as _eventEnvelope does."""
    return (
        f"ver:3.0 server:supervisor serial:{serial} pool:opsrelay poolserial:{serial} "
        f"eventname:{eventname} len:{len(payload)}\n{payload}"
    )


def exited(name: str, group: str | None = None, pid: int = 4242, expected: int = 0) -> str:
    return (
        f"processname:{name} groupname:{group or name} from_state:RUNNING expected:{expected} pid:{pid}"
    )


def answers(stdout: str) -> list[str]:
    """What the listener wrote, read strictly the way supervisord reads it; nothing else may be there."""
    out: list[str] = []
    rest = stdout
    while rest:
        if rest.startswith("READY\n"):
            out.append("READY")
            rest = rest[len("READY\n") :]
            continue
        line, newline, rest = rest.partition("\n")
        assert line.startswith("RESULT ") and newline, f"not protocol: {line!r}"
        length = int(line.removeprefix("RESULT "))
        out.append(rest[:length])
        rest = rest[length:]
    return out


class RecordingPublisher:
    """Records what was published; raises ``error`` for the first ``failures`` calls."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.events: list[Event] = []
        self.calls = 0
        self.failures = failures
        self.error = error or BrokerUnavailable("broker down")

    def publish(self, event: Event) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        self.events.append(event)


def serve(
    text: str, publisher: RecordingPublisher, *, sleep: Callable[[float], object] = time.sleep
) -> tuple[int, list[str]]:
    stdout = io.StringIO()
    code = run(io.StringIO(text), stdout, publisher, host="web1", sleep=sleep)
    return code, answers(stdout.getvalue())


def test_non_ascii_name_then_second_event_on_the_same_stream() -> None:
    name = "wörker_ß_工作"
    first = exited(name, "grüppe")
    assert len(first.encode("utf-8")) > len(first)
    stream = envelope("PROCESS_STATE_EXITED", first, 1) + envelope("PROCESS_STATE_FATAL",
        "processname:db groupname:db from_state:BACKOFF", 2)
    publisher = RecordingPublisher()
    code, said = serve(stream, publisher)
    assert code == 0
    assert said == ["READY", "OK", "READY", "OK", "READY"]
    assert [(e.process, e.group, e.state, e.pid, e.expected) for e in publisher.events] == [
        (name, "grüppe", "EXITED", 4242, False),
        ("db", "db", "FATAL", None, None),
    ]
    assert {e.host for e in publisher.events} == {"web1"}


def test_ok_is_written_only_after_publish_returned() -> None:
    stdout = io.StringIO()
    seen: list[str] = []

    class Watching(RecordingPublisher):
        def publish(self, event: Event) -> None:
            seen.append(stdout.getvalue())
            super().publish(event)

    stream = envelope("PROCESS_STATE_EXITED", exited("a"), 1)
    stream += envelope("PROCESS_STATE_EXITED", exited("b"), 2)
    assert run(io.StringIO(stream), stdout, Watching(), host="h") == 0
    assert [answers(text) for text in seen] == [["READY"], ["READY", "OK", "READY"]]


def test_failing_publisher_answers_fail_then_ok_on_resend(caplog: pytest.LogCaptureFixture) -> None:
    # supervisord re-buffers a FAILed event at the head and sends it again: three times the same event.
    payload = exited("worker_03", "workers")
    stream = "".join(envelope("PROCESS_STATE_EXITED", payload, 7) for _ in range(3))
    error = BrokerUnavailable("connection refused\nby 127.0.0.1:5672")
    publisher = RecordingPublisher(failures=2, error=error)
    pauses: list[float] = []
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        code, said = serve(stream, publisher, sleep=pauses.append)
    assert code == 0
    assert said == ["READY", "FAIL", "READY", "FAIL", "READY", "OK", "READY"]
    assert [e.process for e in publisher.events] == ["worker_03"]
    assert pauses == [0.5, 1.0]  # before the 2nd and 3rd READY; none after the success
    failures = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(failures) == 2
    for message in failures:
        assert "\n" not in message
        assert "workers:worker_03 EXITED" in message
        assert "BrokerUnavailable" in message and "FAIL" in message


def test_an_error_that_is_not_a_relay_error_leaves_the_event_unanswered() -> None:
    # A bug must not be acked: the process dies and supervisord re-buffers the event it was busy with.
    publisher = RecordingPublisher(failures=1, error=KeyError("bug"))
    stdout = io.StringIO()
    with pytest.raises(KeyError):
        run(io.StringIO(envelope("PROCESS_STATE_EXITED", exited("a"))), stdout, publisher, host="h")
    assert answers(stdout.getvalue()) == ["READY"]


def test_unhandled_event_types_are_acked_without_publishing() -> None:
    stream = (
        envelope("TICK_60", "when:1700000000", 1)
        + envelope("PROCESS_LOG_STDERR", "processname:a groupname:a pid:1 channel:stderr\nboom\n", 2)
        + envelope("PROCESS_GROUP_ADDED", "groupname:a\n", 3)
        + envelope("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:9", 4)
    )
    publisher = RecordingPublisher()
    code, said = serve(stream, publisher)
    assert code == 0
    assert said == ["READY", "OK"] * 4 + ["READY"]
    assert [(e.state, e.pid) for e in publisher.events] == [("RUNNING", 9)]


def test_malformed_header_then_a_good_event(caplog: pytest.LogCaptureFixture) -> None:
    raw = "ver:3.0 server:supervisor eventname:TICK_5 len:x\x1b\n"
    stream = raw + envelope("PROCESS_STATE_EXITED", exited("a"))
    publisher = RecordingPublisher()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        code, said = serve(stream, publisher)
    assert code == 0
    assert said == ["READY", "OK", "READY", "OK", "READY"]
    assert [e.process for e in publisher.events] == ["a"]
    [record] = [r for r in caplog.records if r.name == LOGGER]
    message = record.getMessage()
    assert "not an integer" in message
    assert repr(raw) in message
    assert "\n" not in message and "\x1b" not in message


def test_malformed_header_with_a_len_skips_its_payload() -> None:
    # No eventname, but len is readable: the two-line payload is skipped and the stream stays framed.
    stream = (
        "ver:3.0 server:supervisor serial:1 len:12\nline1\nline2\n"
        + envelope("PROCESS_STATE_FATAL", "processname:b groupname:b from_state:BACKOFF", 2)
    )
    publisher = RecordingPublisher()
    code, said = serve(stream, publisher)
    assert (code, said) == (0, ["READY", "OK", "READY", "OK", "READY"])
    assert [e.process for e in publisher.events] == ["b"]


def test_header_without_len_resyncs_on_the_next_header(caplog: pytest.LogCaptureFixture) -> None:
    # The payload of a len-less header cannot be skipped: its lines must not be answered (one RESULT
    # per envelope, or supervisord drops the listener), and its last line arrives glued to the next header.
    stream = (
        "ver:3.0 server:supervisor serial:1 eventname:PROCESS_LOG_STDERR\n"
        "processname:x groupname:x pid:1 channel:stderr\nTraceback\n  File x"
        + envelope("PROCESS_STATE_EXITED", exited("y"), 2)
    )
    publisher = RecordingPublisher()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        code, said = serve(stream, publisher)
    assert (code, said) == (0, ["READY", "OK", "READY", "OK", "READY"])
    assert [e.process for e in publisher.events] == ["y"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'  File x'" in messages and "'Traceback\\n'" in messages


def test_malformed_payload_is_logged_acked_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    bad = "processname:a groupname:a from_state:RUNNING expected:0 pid:12ab"
    stream = envelope("PROCESS_STATE_EXITED", bad, 1) + envelope("PROCESS_STATE_EXITED", exited("b"), 2)
    publisher = RecordingPublisher()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        code, said = serve(stream, publisher)
    assert (code, said) == (0, ["READY", "OK", "READY", "OK", "READY"])
    assert [e.process for e in publisher.events] == ["b"]
    [record] = [r for r in caplog.records if r.name == LOGGER]
    assert repr(bad) in record.getMessage() and "pid" in record.getMessage()


def test_max_events_stops_without_reading_further() -> None:
    second = envelope("PROCESS_STATE_EXITED", exited("b"), 2)
    stdin = io.StringIO(envelope("PROCESS_STATE_EXITED", exited("a"), 1) + second)
    stdout = io.StringIO()
    publisher = RecordingPublisher()
    assert run(stdin, stdout, publisher, host="h", max_events=1) == 0
    assert answers(stdout.getvalue()) == ["READY", "OK"]
    assert [e.process for e in publisher.events] == ["a"]
    assert stdin.read() == second


@pytest.mark.parametrize(
    "stream",
    [
        "",
        "ver:3.0 server:supervisor eventname:TICK_5 len:4",  # header cut before its newline
        "ver:3.0 server:supervisor eventname:PROCESS_STATE_FATAL len:40\nprocessname:a",  # payload cut
    ],
    ids=["empty", "cut-header", "cut-payload"],
)
def test_end_of_stdin_exits_0_without_answering(stream: str) -> None:
    publisher = RecordingPublisher()
    assert serve(stream, publisher) == (0, ["READY"])
    assert publisher.events == []


def test_crlf_in_a_payload_keeps_framing_with_text_streams() -> None:
    log_payload = "processname:a groupname:a pid:1 channel:stderr\nline one\r\nline two\r\n"
    raw = (envelope("PROCESS_LOG_STDERR", log_payload, 1)
           + envelope("PROCESS_STATE_EXITED", exited("a"), 2)).encode("utf-8")
    stdin, stdout = text_streams(io.BytesIO(raw), io.BytesIO())
    publisher = RecordingPublisher()
    assert run(stdin, stdout, publisher, host="h") == 0
    assert [e.process for e in publisher.events] == ["a"]
    # Why text_streams sets newline="\n": universal newlines turn "\r\n" into "\n" and
    # mis-frame the next event.
    naive = RecordingPublisher()
    run(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"), io.StringIO(), naive, host="h")
    assert naive.events == []


def supervisord_envelope(event_cls: type, name: str, serial: int) -> bytes:
    """One envelope built and encoded by supervisord's own code (events.py, process.py)."""
    config = SimpleNamespace(name=name)
    process = SimpleNamespace(config=config, group=SimpleNamespace(config=config), pid=serial)
    payload = event_cls(process, ProcessStates.RUNNING, False).payload()
    options = SimpleNamespace(identifier="supervisor")
    pool = SimpleNamespace(config=SimpleNamespace(name="opsrelay", options=options))
    text: str = EventListenerPool._eventEnvelope(pool, event_cls, serial, serial, payload)
    return text.encode("utf-8")  # process.write(as_bytes(envelope))


@pytest.mark.timeout(10)
def test_real_pipe_in_lockstep_with_utf8_bytes() -> None:
    """A fake supervisord on real pipes: waits for READY, writes UTF-8 bytes one at a time, reads RESULT."""
    names = ["wörker_ß", "工作者", "plain"]
    envelopes = [supervisord_envelope(events.ProcessStateExitedEvent, n, i + 1) for i, n in enumerate(names)]
    to_listener_r, to_listener_w = os.pipe()
    from_listener_r, from_listener_w = os.pipe()
    heard: list[bytes] = []

    def supervisord() -> None:
        with os.fdopen(from_listener_r, "rb", buffering=0) as replies:
            def read_exactly(n: int) -> bytes:
                data = b""
                while len(data) < n:
                    chunk = replies.read(n - len(data))
                    assert chunk, "listener closed its stdout early"
                    data += chunk
                return data

            for data in envelopes:
                heard.append(read_exactly(len(b"READY\n")))
                for i in range(len(data)):  # splits multi-byte characters across writes
                    os.write(to_listener_w, data[i : i + 1])
                line = b""
                while not line.endswith(b"\n"):
                    line += read_exactly(1)
                heard.append(line + read_exactly(int(line.split()[1])))
            os.close(to_listener_w)  # EOF: supervisord stops the listener
            heard.append(replies.read())

    thread = threading.Thread(target=supervisord, daemon=True)
    thread.start()
    stdin, stdout = text_streams(os.fdopen(to_listener_r, "rb"), os.fdopen(from_listener_w, "wb"))
    publisher = RecordingPublisher()
    with stdin, stdout:
        assert run(stdin, stdout, publisher, host="h") == 0
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert heard == [b"READY\n", b"RESULT 2\nOK"] * 3 + [b"READY\n"]
    assert [(e.process, e.pid, e.expected) for e in publisher.events] == [(n, i + 1, False) for i, n in
                                                                          enumerate(names)]
    assert any(len(e) != len(e.decode("utf-8")) for e in envelopes)


@settings(max_examples=60, deadline=None)
@given(st.lists(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters=" \n"), min_size=1, max_size=12),
    min_size=1, max_size=5,
))
def test_any_names_stay_framed_through_utf8(names: list[str]) -> None:
    stream = "".join(
        envelope("TICK_5", "when:1", 2 * i)
        + envelope("PROCESS_STATE_EXITED", exited(n, n, pid=i + 1), 2 * i + 1)
        for i, n in enumerate(names)
    )
    stdin, stdout = text_streams(io.BytesIO(stream.encode("utf-8")), io.BytesIO())
    publisher = RecordingPublisher()
    assert run(stdin, stdout, publisher, host="h") == 0
    published = [(e.process, e.group, e.pid) for e in publisher.events]
    assert published == [(n, n, i + 1) for i, n in enumerate(names)]


def header(eventname: str) -> Header:
    return Header(ver="3.0", server="s", serial="1", pool="p", poolserial="1", eventname=eventname, length=0)


def test_decide() -> None:
    at = "2026-01-01T00:00:00.000000Z"
    payload = "processname:a groupname:g from_state:BACKOFF"
    fatal = decide(header("PROCESS_STATE_FATAL"), payload, host="h", at=at)
    assert isinstance(fatal, Publish)
    event = fatal.event
    assert (event.program, event.state, event.host, event.at) == ("g:a", "FATAL", "h", at)
    assert decide(header("TICK_60"), "when:1", host="h") == Ignore("TICK_60")
    bad = decide(header("PROCESS_STATE_FATAL"), "groupname:g", host="h")
    assert isinstance(bad, Malformed) and "processname" in bad.reason


def retry_pause(failures: int) -> float:
    return doubling(failures, first=FAIL_PAUSE_FIRST, cap=FAIL_PAUSE_CAP)


def test_retry_pause_doubles_up_to_a_cap() -> None:
    assert [retry_pause(n) for n in range(9)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert retry_pause(1000) == 30.0
