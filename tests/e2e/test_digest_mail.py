"""Mail a person reads, end to end: digests of a crash loop, flap damping, recovery notices.

A real supervisord runs ``opsrelay listen`` and ``opsrelay serve`` (tests/e2e/harness.py) over
RabbitMQ, and the mail goes to the real STARTTLS+AUTH test server.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.e2e.harness import Program, Supervisor, TomlValue, stop_all
from tests.e2e.mail import body, mails_to, parsed
from tests.smtp_server import SmtpServer

pytestmark = [pytest.mark.supervisord, pytest.mark.rabbitmq]

HOST = "e2ehost"
ONCALL = "oncall@example.test"
Start = Callable[..., Supervisor]


@pytest.fixture
def start(tmp_path: Path, amqp_url: str, prefix: str, smtp_server: SmtpServer) -> Iterator[Start]:
    started: list[Supervisor] = []

    def go(subscriptions: Sequence[Mapping[str, TomlValue]], programs: Sequence[Program],
           events: str = "PROCESS_STATE,TICK_5", declared_before: bool = False) -> Supervisor:
        sv = Supervisor(tmp_path / f"sv{len(started)}", broker_url=amqp_url, prefix=prefix,
                        smtp=smtp_server.client_settings(), subscriptions=subscriptions,
                        programs=programs, host=HOST, listener_events=events)
        started.append(sv)
        if declared_before:
            sv.declare_relay_queues()
        return sv.start()

    yield go
    stop_all(started, "relay")


def exits(sv: Supervisor, name: str) -> int:
    """Unexpected exits of ``name`` (or of ``name_N``, its numprocs instances) in supervisord's log."""
    pattern = rf"exited: {re.escape(name)}(_\d+)? \(exit status 1; not expected\)"
    return len(re.findall(pattern, sv.supervisord_log()))


def listed_exits(text: str) -> int:
    """Lines of a digest's event list that report an exit."""
    return sum(1 for line in text.splitlines() if "EXITED" in line and re.search(r"\d\d:\d\d:\d\d", line))


@pytest.mark.timeout(120)
def test_a_crash_loop_of_30_exits_in_20s_is_one_or_two_digests_listing_every_exit(
        start: Start, smtp_server: SmtpServer) -> None:
    # supervisord respawns an exited program on its next 1 s poll, so one process crashes
    # about every 1.5 s: three instances of the program (one group) make the 30 exits.
    sv = start([{"name": "loops", "to": [ONCALL], "group_by": ["group"], "group_wait": "5s",
                 "group_interval": "30s"}],
               [Program("loop", 'sh -c "sleep 1; exit 1"',
                        {"startsecs": 0, "autorestart": True, "startretries": 1000, "numprocs": 3,
                         "process_name": "%(program_name)s_%(process_num)d"})])
    began = time.monotonic()
    sv.start_program("loop:*")
    sv.wait_for(lambda: exits(sv, "loop") >= 30, 30, what="30 exits")
    sv.ctl("stop", "loop:*", check=True)
    looped = time.monotonic() - began
    total = exits(sv, "loop")
    assert total >= 30 and looped <= 25, (total, looped)
    # The first digest 5 s after the first exit, the rest at most 30 s after that.
    sv.wait_for(lambda: sum(listed_exits(body(parsed(m))) for m in mails_to(smtp_server, ONCALL)) >= total,
                45, what=f"digests listing all {total} exits")
    time.sleep(2.0)  # a negative check: no third digest may follow
    mails = mails_to(smtp_server, ONCALL)
    assert 1 <= len(mails) <= 2, [parsed(m)["Subject"] for m in mails]
    print(f"{total} exits in {looped:.1f}s -> {len(mails)} digest(s)")
    assert sum(listed_exits(body(parsed(m))) for m in mails) == total
    assert "relay: loops: digest of" in sv.relay_log()


@pytest.mark.timeout(90)
def test_a_relay_restarted_during_group_wait_still_sends_the_digest_once_complete(
        start: Start, smtp_server: SmtpServer) -> None:
    sv = start([{"name": "grouped", "to": [ONCALL], "group_wait": "8s"}],
               [Program(f"crash{n}", 'sh -c "sleep 1.2; exit 1"',
                        {"startsecs": 1, "startretries": 0, "autorestart": False}) for n in range(3)])
    for n in range(3):
        sv.start_program(f"crash{n}")
    sv.wait_for(lambda: sv.relay_log().count("kept for a digest") >= 3, 15, what="three events in the digest")
    sv.ctl("restart", "relay", check=True)
    assert mails_to(smtp_server, ONCALL) == []
    sv.wait_for(lambda: mails_to(smtp_server, ONCALL), 20, what="the digest")
    time.sleep(3.0)  # a negative check: the restarted relay must not send it twice
    [mail] = mails_to(smtp_server, ONCALL)
    text = body(parsed(mail))
    assert listed_exits(text) == 3
    assert all(f"crash{n}" in text for n in range(3))
    assert "state loaded" in sv.relay_log() and "1 digest(s) pending" in sv.relay_log()


@pytest.mark.timeout(90)
def test_flap_damping_mails_the_limit_then_one_summary_at_the_end_of_the_window(
        start: Start, smtp_server: SmtpServer) -> None:
    sv = start([{"name": "damped", "to": [ONCALL], "max_mails_per_hour": 2, "damping_window": "12s"}],
               [Program("flap", 'sh -c "sleep 0.55; exit 1"',
                        {"startsecs": 0, "autorestart": True, "startretries": 1000})])
    sv.start_program("flap")
    sv.wait_for(lambda: exits(sv, "flap") >= 6, 15, what="six exits")
    sv.ctl("stop", "flap", check=True)
    total = exits(sv, "flap")
    sv.wait_for(lambda: len(mails_to(smtp_server, ONCALL)) >= 3, 25, what="two mails and a summary")
    time.sleep(2.0)  # a negative check: nothing beyond the limit and the summary may follow
    subjects = [str(parsed(m)["Subject"]) for m in mails_to(smtp_server, ONCALL)]
    assert len(subjects) == 3, subjects
    summary = parsed(mails_to(smtp_server, ONCALL)[-1])
    assert f"{total - 2} more" in str(summary["Subject"]) + body(summary), (subjects, body(summary))


@pytest.mark.timeout(60)
def test_a_recovered_process_gets_a_notice_threaded_under_its_crash_mail(
        start: Start, smtp_server: SmtpServer, tmp_path: Path) -> None:
    flag = tmp_path / "crashed-once"
    # The first run outlives startsecs (RUNNING), then crashes; the restart stays up.
    command = f'sh -c "if [ -e {flag} ]; then exec sleep 60; fi; touch {flag}; sleep 2.5; exit 1"'
    sv = start([{"name": "resolved", "to": [ONCALL], "send_resolved": True}],
               [Program("comeback", command, {"startsecs": 1, "autorestart": True, "startretries": 3})])
    sv.start_program("comeback")
    sv.wait_for(lambda: len(mails_to(smtp_server, ONCALL)) >= 2, 20, what="a crash mail and a recovery notice")
    time.sleep(1.5)  # a negative check: no third mail may follow
    crash, recovered = (parsed(m) for m in mails_to(smtp_server, ONCALL))
    assert "recovered" not in str(crash["Subject"]) and "recovered" in str(recovered["Subject"])
    assert recovered["In-Reply-To"] == crash["Message-ID"]
    assert crash["Message-ID"] in str(recovered["References"])
    assert re.search(r"\d+(\.\d+)?\s*s", body(recovered)), body(recovered)
    assert len(mails_to(smtp_server, ONCALL)) == 2


@pytest.mark.timeout(60)
def test_supervisord_running_is_published_as_a_sup_event_and_mailed(start: Start, smtp_server: SmtpServer) -> None:
    # The relay's queues exist from an earlier run: the listener publishes supervisord's RUNNING as
    # soon as it is READY, which may be before a relay starting at the same time has bound them.
    sv = start([{"name": "supervisord", "to": [ONCALL], "patterns": ["sup.*.RUNNING"]}], [],
               events="PROCESS_STATE,TICK_5,SUPERVISOR_STATE_CHANGE", declared_before=True)
    # supervisord buffers its RUNNING event until the listener is READY; the relay mails it.
    sv.wait_for(lambda: mails_to(smtp_server, ONCALL), 20, what="the mail about supervisord itself")
    [mail] = mails_to(smtp_server, ONCALL)
    message = parsed(mail)
    assert message["Subject"] == f"[opsrelay] {HOST}: supervisord is running"
    assert f"supervisord on {HOST} is running" in body(message)
    assert "event     SUPERVISOR_STATE_CHANGE_RUNNING" in body(message)
