"""listeners.enrich: the pure decisions (what to ask, what the answers mean) and the enricher over a stub RPC.

The same code against a real supervisord is in tests/integration/test_enrich_supervisord.py.
"""

from __future__ import annotations

import base64
import io
import xmlrpc.client
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from listeners.enrich import (
    MAIN_LOG_BYTES,
    QUIET,
    Call,
    Deadline,
    Enricher,
    ExitFacts,
    Fault,
    Fetched,
    LogTail,
    ProcessInfo,
    SupervisorRpc,
    SupervisorUnreachable,
    _fetched,
    choose_tail,
    enriched,
    exit_cause,
    exit_facts,
    make_enricher,
    parse_cause,
    plan,
    shorter,
    trim_tail,
    unreachable,
    wants,
    xml_safe,
)
from listeners.eventlistener import run
from listeners.supervisor_rpc import SupervisorTimeout
from relay.config.models import Config
from relay.contract.event import Event, decode_event, encode_event

AT = "2026-11-27T10:00:00.123456Z"
MID_CHARACTER = Fault(30, "FAILED: <class 'UnicodeDecodeError'>:'utf-8' codec can't decode byte 0xa9 in "
                          "position 0: invalid start byte")


def event(state: str = "EXITED", *, pid: int | None = 4242, process: str = "worker_03",
          group: str = "workers") -> Event:
    return Event(host="web1", group=group, process=process, event=f"PROCESS_STATE_{state}", state=state,
                 pid=pid, expected=False if state == "EXITED" else None, at=AT, id="e-1")


def info(statename: str = "EXITED", exitstatus: int = 0, spawnerr: str = "", *,
         stdout: str = "/log/out", stderr: str = "/log/err") -> ProcessInfo:
    return ProcessInfo(statename, exitstatus, spawnerr, stdout, stderr)


def fetched(info_: ProcessInfo | Fault, log: str | Fault = "", *, stderr: LogTail | Fault | None = None,
            stdout: LogTail | Fault | None = None) -> Fetched:
    return Fetched(info_, stderr, stdout, log)


def supervisord_log(*messages: str) -> str:
    """Lines as supervisor/loggers.py writes them."""
    return "".join(f"2026-11-27 10:00:0{i % 10},{i:03d} INFO {m}\n" for i, m in enumerate(messages))


# -- which events, which calls ----------------------------------------------------------------

@pytest.mark.parametrize(("state", "wanted"), [("EXITED", True), ("FATAL", True), ("BACKOFF", True),
                                               ("RUNNING", False), ("STOPPED", False), ("STARTING", False)])
def test_only_crash_states_are_enriched(state: str, wanted: bool) -> None:
    assert wants(event(state)) is wanted


def test_supervisord_lifecycle_is_not_enriched() -> None:
    sup = Event(host="web1", group="", process="", event="SUPERVISOR_STATE_CHANGE_RUNNING", state="RUNNING")
    assert not wants(sup)


def test_plan_names_group_and_process_and_reads_supervisords_log() -> None:
    calls = plan(event(process="wörker.v2", group="grüppe"), 4096)
    assert calls == (
        Call("supervisor.getProcessInfo", ("grüppe:wörker.v2",)),
        Call("supervisor.tailProcessStderrLog", ("grüppe:wörker.v2", 0, 4096)),
        Call("supervisor.tailProcessStdoutLog", ("grüppe:wörker.v2", 0, 4096)),
        Call("supervisor.readLog", (-MAIN_LOG_BYTES, 0)),
    )
    assert calls[1].struct() == {"methodName": "supervisor.tailProcessStderrLog",
                                 "params": ["grüppe:wörker.v2", 0, 4096]}


def test_plan_without_log_tail_still_asks_for_the_exit() -> None:
    assert [c.method for c in plan(event(), 0)] == ["supervisor.getProcessInfo", "supervisor.readLog"]


def test_shorter_reads_for_a_cut_inside_a_character() -> None:
    assert shorter(Call("supervisor.tailProcessStderrLog", ("a:a", 0, 4096))) == tuple(
        Call("supervisor.tailProcessStderrLog", ("a:a", 0, n)) for n in (4095, 4094, 4093))
    assert shorter(Call("supervisor.readLog", (-100, 0))) == tuple(
        Call("supervisor.readLog", (n, 0)) for n in (-99, -98, -97))


# -- the wire ---------------------------------------------------------------------------------

def test_xml_safe_makes_control_characters_parseable_and_visible() -> None:
    # supervisord puts a coloured log's ESC raw into its XML; expat refuses it.
    raw = xmlrpc.client.dumps((["\x1b[31mred\x1b[0m\x00 tab\tok\r\n", "\ufffe"],), methodresponse=True)
    with pytest.raises(Exception, match="not well-formed"):
        xmlrpc.client.loads(raw.encode("utf-8"))
    (value,), _ = xmlrpc.client.loads(xml_safe(raw.encode("utf-8")))
    assert value == ["\u241b[31mred\u241b[0m\u2400 tab\tok\n", "\ufffd"]


def test_fetched_reads_the_multicall_answers() -> None:
    calls = plan(event(), 10)
    answers = [{"statename": "EXITED", "exitstatus": 3, "spawnerr": "Bad exit code 3", "stdout_logfile": "/o",
                "stderr_logfile": "", "pid": 0}, ["", 0, False], ["boom\n", 5, True], "log text"]
    got = _fetched(calls, answers)
    assert got == Fetched(ProcessInfo("EXITED", 3, "Bad exit code 3", "/o", ""), LogTail("", False),
                          LogTail("boom\n", True), "log text")


def test_fetched_turns_nonsense_into_faults() -> None:
    got = _fetched(plan(event(), 10), [{"statename": "EXITED"}, "not a tail", Fault(20, "NO_FILE"), 42])
    assert got.info == Fault(0, "unexpected answer to getProcessInfo")
    assert got.stderr == Fault(0, "unexpected answer to supervisor.tailProcessStderrLog")
    assert got.stdout == Fault(20, "NO_FILE")
    assert got.log == Fault(0, "unexpected answer to supervisor.readLog")


def test_mid_character_fault_is_told_apart() -> None:
    assert MID_CHARACTER.mid_character
    assert not Fault(30, "FAILED: <class 'UnicodeDecodeError'>: ... in position 17: invalid start byte").mid_character
    assert not Fault(20, "NO_FILE: position 0:").mid_character


def test_deadline_is_one_end_for_everything() -> None:
    now = [100.0]
    deadline = Deadline(1.0, clock=lambda: now[0])
    assert deadline.remaining() == 1.0
    now[0] = 100.75
    assert deadline.remaining() == pytest.approx(0.25)
    now[0] = 101.0
    with pytest.raises(TimeoutError, match="within 1 s"):
        deadline.remaining()


# -- the log tail -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "overflow", "want"),
    [
        ("Traceback (most recent call last):\n  File \"x\"\nValueError: no\n", False,
         "Traceback (most recent call last):\n  File \"x\"\nValueError: no"),
        ("ack (most recent call last):\nValueError: no\n", True, "ValueError: no"),  # first line cut by the window
        ("one long line without an end", True, "one long line without an end"),
        ("partial\n\n\n", True, "partial"),  # nothing after the fragment: keep it
        ("\u241b[31mERROR\u241b[0m disk full\n", False, "ERROR disk full"),
        ("\n\n  indented first\nlast   \n\n", False, "  indented first\nlast"),
        ("", False, None),
        (" \n\t\n", True, None),
    ],
)
def test_trim_tail(text: str, overflow: bool, want: str | None) -> None:
    assert trim_tail(text, overflow=overflow) == want


def tail(text: str, overflow: bool = False) -> LogTail:
    return LogTail(text, overflow)


@pytest.mark.parametrize(
    ("stderr", "stdout", "info_", "want"),
    [
        (tail("Traceback\nValueError\n"), tail("started\n"), info(), ("Traceback\nValueError", ())),
        (tail(""), tail("started\nboom\n"), info(), ("started\nboom", ())),  # stderr empty
        (tail(""), tail("merged\n"), info(stderr=""), ("merged", ())),  # redirect_stderr=true
        (Fault(20, "NO_FILE: /x"), tail("merged\n"), info(), ("merged", ())),  # older supervisord: NO_FILE
        (tail(""), tail(""), info(), (None, ("no log tail: workers:worker_03 wrote nothing to stderr or stdout",))),
        (tail(""), tail(""), info(stdout="", stderr=""),
         (None, ("log tail unavailable: supervisord keeps no log of workers:worker_03 (stdout_logfile and "
                 "stderr_logfile are NONE or syslog)",))),
        (MID_CHARACTER, tail(""), info(),
         (None, (f"log tail unavailable: supervisord could not read the log ({MID_CHARACTER.text})",))),
        (None, None, info(), (None, ())),  # log_tail_bytes = 0: not asked, nothing to say
    ],
    ids=["stderr", "stderr-empty", "redirected", "no-file", "both-empty", "not-kept", "fault", "not-asked"],
)
def test_choose_tail(stderr: LogTail | Fault | None, stdout: LogTail | Fault | None, info_: ProcessInfo,
                     want: tuple[str | None, tuple[str, ...]]) -> None:
    assert choose_tail(event(), fetched(info_, stderr=stderr, stdout=stdout)) == want


# -- supervisord's log: the exit line ---------------------------------------------------------

CRASH_LOOP = supervisord_log(
    "spawned: 'worker_03' with pid 100",
    "success: worker_03 entered RUNNING state, process has stayed up for > than 1 seconds (startsecs)",
    "spawned: 'worker_0' with pid 1000",
    "exited: worker_0 (exit status 9; not expected)",
    "exited: worker_03 (exit status 3; not expected)",
    "spawned: 'worker_03' with pid 1001",
    "exited: worker_03 (terminated by SIGSEGV (core dumped); not expected)",
    "spawned: 'worker_03' with pid 10",
    "exited: worker_03 (exit status 0; expected)",
)


@pytest.mark.parametrize(
    ("pid", "want"),
    [(100, "exit status 3"), (1001, "terminated by SIGSEGV (core dumped)"), (10, "exit status 0"),
     (1000, None),  # worker_0's pid: another process
     (None, "exit status 0"),  # no pid (BACKOFF, FATAL): the last exit
     (7, None)],
)
def test_exit_cause_follows_the_pid_across_respawns(pid: int | None, want: str | None) -> None:
    assert exit_cause(CRASH_LOOP, "worker_03", pid) == want


def test_exit_cause_ignores_lines_that_are_not_supervisords() -> None:
    log = "exited: worker_03 (exit status 1; not expected)\n" + supervisord_log("spawned: 'worker_03' with pid 5")
    assert exit_cause(log, "worker_03", None) is None
    assert exit_cause(supervisord_log("exited: a (b) (exit status 4; not expected)"), "a (b)", None) == "exit status 4"


@pytest.mark.parametrize(
    ("cause", "want"),
    [
        ("exit status 3", ExitFacts(exit_status=3)),
        ("exit status 0", ExitFacts(exit_status=0)),
        ("terminated by SIGKILL", ExitFacts(signal="SIGKILL")),
        ("terminated by SIGSEGV (core dumped)", ExitFacts(signal="SIGSEGV", notes=("core dumped",))),
        ("terminated by signal 42", ExitFacts(signal="signal 42")),
        ("unknown termination cause 0x137f",
         ExitFacts(notes=("exit status unavailable: supervisord says 'unknown termination cause 0x137f'",))),
    ],
)
def test_parse_cause(cause: str, want: ExitFacts) -> None:
    assert parse_cause(cause) == want


# -- exit status, signal, spawn error ---------------------------------------------------------

KILLED = supervisord_log("spawned: 'worker_03' with pid 4242",
                         "exited: worker_03 (terminated by SIGKILL; not expected)")
EXIT_5 = supervisord_log("spawned: 'worker_03' with pid 4242", "exited: worker_03 (exit status 5; not expected)",
                         "spawned: 'worker_03' with pid 4243")
BAD_NAME = Fault(10, "BAD_NAME: workers:worker_03")
NO_FILE = Fault(20, "NO_FILE: None")
TOO_QUICKLY = "Exited too quickly (process log may have details)"
LOG_WHERE = f"the last {MAIN_LOG_BYTES // 1024} KiB of supervisord's log"


@pytest.mark.parametrize(
    ("ev", "got", "want"),
    [
        # Still EXITED (no autorestart): getProcessInfo is this run's.
        (event(), fetched(info("EXITED", 3, "Bad exit code 3")), ExitFacts(exit_status=3)),
        (event(), fetched(info("EXITED", 0)), ExitFacts(exit_status=0)),
        # -1: killed; the signal is only in supervisord's log.
        (event(), fetched(info("EXITED", -1), KILLED), ExitFacts(signal="SIGKILL")),
        (event(pid=None), fetched(info("EXITED", -1), KILLED), ExitFacts(signal="SIGKILL")),
        (event(), fetched(info("EXITED", -1), ""),
         ExitFacts(notes=(f"killed by a signal, but which one is not in {LOG_WHERE}",))),
        # Respawned already (autorestart): exitstatus was reset, the log has the run by its pid.
        (event(), fetched(info("RUNNING", 0), EXIT_5), ExitFacts(exit_status=5)),
        (event(), fetched(info("STARTING", 0), KILLED), ExitFacts(signal="SIGKILL")),
        (event(), fetched(BAD_NAME, EXIT_5), ExitFacts(exit_status=5)),
        # ... and when the log does not have it, a note rather than the new run's 0.
        (event(), fetched(info("RUNNING", 0), supervisord_log("spawned: 'worker_03' with pid 9")),
         ExitFacts(notes=(f"exit status unavailable: workers:worker_03 was already RUNNING when supervisord was "
                          f"asked, and its exit is not in {LOG_WHERE}",))),
        (event(), fetched(info("BACKOFF", 0, TOO_QUICKLY), NO_FILE),
         ExitFacts(notes=("exit status unavailable: workers:worker_03 was already BACKOFF when supervisord was "
                          "asked, and its exit is not in supervisord's log, which it could not read "
                          "(NO_FILE: None)",))),
        (event(), fetched(BAD_NAME, ""),
         ExitFacts(notes=("exit status unavailable: supervisord could not say (BAD_NAME: workers:worker_03), and "
                          f"its exit is not in {LOG_WHERE}",))),
        # BACKOFF / FATAL after an exit too quick for startsecs: exitstatus is None (0), the log has the code.
        (event("BACKOFF", pid=None), fetched(info("BACKOFF", 0, TOO_QUICKLY), EXIT_5),
         ExitFacts(exit_status=5, spawnerr=TOO_QUICKLY)),
        (event("FATAL", pid=None), fetched(info("FATAL", 0, TOO_QUICKLY), KILLED),
         ExitFacts(signal="SIGKILL", spawnerr=TOO_QUICKLY)),
        (event("FATAL", pid=None), fetched(info("FATAL", 0, TOO_QUICKLY), ""),
         ExitFacts(spawnerr=TOO_QUICKLY, notes=(f"exit status unavailable: not in {LOG_WHERE}",))),
        # It never ran: the spawn error is the whole story.
        (event("FATAL", pid=None), fetched(info("FATAL", 0, "can't find command '/nope'"), EXIT_5),
         ExitFacts(spawnerr="can't find command '/nope'")),
        # Moved on: the spawn error and exit may be a later try's, so none.
        (event("BACKOFF", pid=None), fetched(info("STARTING", 0, ""), EXIT_5),
         ExitFacts(notes=("exit status and spawn error unavailable: workers:worker_03 was already STARTING when "
                          "supervisord was asked",))),
        (event("FATAL", pid=None), fetched(BAD_NAME, EXIT_5),
         ExitFacts(notes=("exit status and spawn error unavailable: supervisord could not say "
                          "(BAD_NAME: workers:worker_03)",))),
    ],
    ids=["exit-3", "exit-0", "signal", "signal-no-pid", "signal-not-in-log", "respawned", "respawned-signal",
         "bad-name-log", "respawned-no-line", "log-fault", "bad-name-no-line", "backoff-code", "fatal-signal",
         "fatal-no-line", "spawn-error", "backoff-moved-on", "fatal-bad-name"],
)
def test_exit_facts(ev: Event, got: Fetched, want: ExitFacts) -> None:
    assert exit_facts(ev, got) == want


def test_enriched_keeps_the_envelopes_fields_and_notes() -> None:
    before = replace(event(), notes=("earlier",))
    after = enriched(before, fetched(info("RUNNING", 0), EXIT_5, stderr=tail(""), stdout=tail("")))
    assert after == replace(before, exit_status=5, log_tail=None,
                            notes=("earlier", "no log tail: workers:worker_03 wrote nothing to stderr or stdout"))
    assert (after.id, after.at, after.pid) == ("e-1", AT, 4242)
    assert decode_event(encode_event(after)) == after


@pytest.mark.parametrize(
    ("state", "logs", "want"),
    [("EXITED", True, ("log tail unavailable: gone", "exit status unavailable: gone")),
     ("FATAL", True, ("log tail unavailable: gone", "exit status and spawn error unavailable: gone")),
     ("EXITED", False, ("exit status unavailable: gone",))],
)
def test_unreachable(state: str, logs: bool, want: tuple[str, ...]) -> None:
    got = unreachable(event(state), "gone", logs=logs)
    assert got.notes == want
    assert (got.exit_status, got.signal, got.spawnerr, got.log_tail) == (None, None, None, None)


# -- the enricher over a stub RPC -------------------------------------------------------------

class StubRpc(SupervisorRpc):
    """Answers each multicall from a list; records the calls."""

    def __init__(self, *answers: list[object] | SupervisorUnreachable) -> None:
        super().__init__("unix:///nowhere")
        self.answers = list(answers)
        self.asked: list[list[Call]] = []

    def multicall(self, calls: Sequence[Call], deadline: Deadline) -> list[object]:
        self.asked.append(list(calls))
        answer = self.answers.pop(0)
        if isinstance(answer, SupervisorUnreachable):
            raise answer
        assert len(answer) == len(calls)
        return answer


INFO = {"statename": "EXITED", "exitstatus": 3, "spawnerr": "Bad exit code 3", "stdout_logfile": "/o",
        "stderr_logfile": "/e"}


def test_enricher_asks_once_and_fills_the_event() -> None:
    rpc = StubRpc([INFO, ["Traceback\nValueError: x\n", 30, False], ["", 0, False], ""])
    got = Enricher(rpc, tail_bytes=4096, timeout=1.0)(event())
    assert (got.exit_status, got.signal, got.log_tail, got.notes) == (3, None, "Traceback\nValueError: x", ())
    assert len(rpc.asked) == 1


def test_enricher_asks_again_shorter_for_a_tail_cut_inside_a_character() -> None:
    rpc = StubRpc([INFO, MID_CHARACTER, ["", 0, False], MID_CHARACTER],
                  [MID_CHARACTER, ["fé\nboom\n", 9, True], ["x", 9, True], MID_CHARACTER, KILLED, MID_CHARACTER])
    got = Enricher(rpc, tail_bytes=10, timeout=1.0)(event())
    assert got.log_tail == "boom"
    assert rpc.asked[1] == [*shorter(plan(event(), 10)[1]), *shorter(plan(event(), 10)[3])]
    # The log came on the second try and names this pid's end (over getProcessInfo's 3).
    assert (got.exit_status, got.signal, got.notes) == (None, "SIGKILL", ())
    assert len(rpc.asked) == 2


def test_enricher_keeps_what_it_has_when_asking_again_fails() -> None:
    rpc = StubRpc([INFO, MID_CHARACTER, ["", 0, False], ""], SupervisorUnreachable("slow"))
    got = Enricher(rpc, tail_bytes=10, timeout=1.0)(event())
    assert got.exit_status == 3
    assert got.notes == (f"log tail unavailable: supervisord could not read the log ({MID_CHARACTER.text})",)


def test_enricher_sends_the_event_when_supervisord_is_away() -> None:
    rpc = StubRpc(SupervisorUnreachable("supervisord did not answer within 1 s"))
    got = Enricher(rpc, tail_bytes=4096, timeout=1.0)(event())
    assert got.notes == ("log tail unavailable: supervisord did not answer within 1 s",
                         "exit status unavailable: supervisord did not answer within 1 s")


def test_enricher_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    rpc = StubRpc([{"statename": "EXITED"}, ["", 0, False], ["", 0, False]])  # one answer short: a bug
    got = Enricher(rpc, tail_bytes=10, timeout=1.0)(event("FATAL", pid=None))
    reason = "the listener failed to ask (AssertionError, see its log)"
    assert got.notes == (f"log tail unavailable: {reason}", f"exit status and spawn error unavailable: {reason}")
    assert "enriching workers:worker_03 FATAL" in caplog.text


def test_enricher_leaves_other_events_alone_without_asking() -> None:
    rpc = StubRpc()
    running = event("RUNNING")
    assert Enricher(rpc, tail_bytes=4096, timeout=1.0)(running) is running
    assert rpc.asked == []


def test_rpc_without_a_server_url() -> None:
    rpc = SupervisorRpc(None)
    with pytest.raises(SupervisorUnreachable, match=r"SUPERVISOR_SERVER_URL is not set"):
        rpc.multicall(plan(event(), 0), Deadline(1.0))
    with pytest.raises(SupervisorUnreachable, match=r"neither unix:// nor http://"):
        SupervisorRpc("https://127.0.0.1:9001").multicall(plan(event(), 0), Deadline(1.0))


# -- make_enricher ----------------------------------------------------------------------------

def test_make_enricher_outside_supervisord_is_none() -> None:
    assert make_enricher(Config(), {"SUPERVISOR_SERVER_URL": "unix:///x"}) is None


def test_make_enricher_takes_the_config_and_supervisords_environment() -> None:
    config = Config.model_validate({"listener": {"log_tail_bytes": "2KiB", "fetch_timeout": "250ms"}})
    enricher = make_enricher(config, {"SUPERVISOR_ENABLED": "1", "SUPERVISOR_SERVER_URL": "http://127.0.0.1:9001",
                                      "SUPERVISOR_USERNAME": "user", "SUPERVISOR_PASSWORD": "sëcret"})
    assert enricher is not None
    assert (enricher.tail_bytes, enricher.timeout, enricher.rpc.url) == (2048, 0.25, "http://127.0.0.1:9001")
    assert enricher.rpc._headers["Authorization"] == "Basic " + base64.b64encode("user:sëcret".encode()).decode()
    assert "sëcret" not in repr(enricher.rpc)


def test_make_enricher_sends_no_credentials_when_none_are_set() -> None:
    enricher = make_enricher(Config(), {"SUPERVISOR_ENABLED": "1", "SUPERVISOR_SERVER_URL": "unix:///x"})
    assert enricher is not None and "Authorization" not in enricher.rpc._headers


# -- the listener loop with an enricher -------------------------------------------------------

def envelope(eventname: str, payload: str, serial: int) -> str:
    return (f"ver:3.0 server:supervisor serial:{serial} pool:opsrelay poolserial:{serial} "
            f"eventname:{eventname} len:{len(payload)}\n{payload}")


class Recording:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)


STREAM = (envelope("SUPERVISOR_STATE_CHANGE_RUNNING", "", 1)
          + envelope("PROCESS_STATE_RUNNING", "processname:a groupname:g from_state:STARTING pid:7", 2)
          + envelope("PROCESS_STATE_EXITED", "processname:a groupname:g from_state:RUNNING expected:0 pid:7", 3))


def serve(enrich: Callable[[Event], Event] | None) -> list[Event]:
    publisher = Recording()
    stdout = io.StringIO()
    assert run(io.StringIO(STREAM), stdout, publisher, host="web1", enrich=enrich) == 0
    assert stdout.getvalue().count("RESULT 2\nOK") == 3
    return publisher.events


def test_the_loop_enriches_crashes_only_and_keeps_event_ids() -> None:
    plain = serve(None)
    rpc = StubRpc([INFO, ["boom\n", 5, False], ["", 0, False], ""])
    rich = serve(Enricher(rpc, tail_bytes=100, timeout=1.0))
    assert len(rpc.asked) == 1 and rpc.asked[0][0].params == ("g:a",)  # once, for the EXITED event
    assert [e.id for e in rich] == [e.id for e in plain]
    assert [(e.state, e.exit_status, e.log_tail) for e in rich] == [
        ("RUNNING", None, None), ("RUNNING", None, None), ("EXITED", 3, "boom")]
    assert rich[:2] == [replace(e, at=r.at) for e, r in zip(plain[:2], rich[:2], strict=True)]


def test_a_failing_enricher_costs_the_enrichment_not_the_event(caplog: pytest.LogCaptureFixture) -> None:
    def broken(ev: Event) -> Event:
        raise KeyError("bug")

    events = serve(broken)
    assert [e.state for e in events] == ["RUNNING", "RUNNING", "EXITED"]
    assert all(e.notes == ("log tail unavailable: the listener failed to fetch it (see its log)",) for e in events)
    assert "enriching" in caplog.text and "KeyError" in caplog.text


def test_after_a_timeout_events_go_out_unasked_for_a_while_then_it_asks_again() -> None:
    now = [100.0]
    rpc = StubRpc(SupervisorTimeout("supervisord did not answer within 1 s (unix:///x)"),
                  [INFO, ["Traceback\n", 10, False], ["", 0, False], ""])
    enricher = Enricher(rpc, tail_bytes=4096, timeout=1.0, clock=lambda: now[0])
    first = enricher(event())
    assert any("did not answer within 1 s" in n for n in first.notes)
    now[0] += QUIET - 1
    quiet = enricher(event())
    assert len(rpc.asked) == 1  # not asked: a crash loop must not wait out the timeout per event
    assert quiet.exit_status is None and any(n.startswith("log tail unavailable: not asked") for n in quiet.notes)
    now[0] += 2
    asked = enricher(event())
    assert len(rpc.asked) == 2 and asked.exit_status == 3 and asked.notes == ()
