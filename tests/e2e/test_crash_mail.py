"""A real supervisord, RabbitMQ and SMTP server: a program's crash becomes one mail.

Each test runs ``opsrelay listen`` as supervisord's eventlistener and ``opsrelay
serve`` as a program (see tests/e2e/harness.py), crashes a program of its own
and reads what reached the SMTP server (STARTTLS + AUTH, trustme certificate).
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

pytestmark = [pytest.mark.supervisord, pytest.mark.rabbitmq, pytest.mark.timeout(45)]

HOST = "e2ehost"
ONCALL = "oncall@example.test"
SECOND = "lead@example.test"
# Long enough for a second (wrong) mail to show up: the relay turns an event into
# mail in well under a second here, and the retry backoff is 200ms.
QUIET = 1.5
# `sleep` outlives startsecs, so the program is RUNNING first and its exit is an EXITED event.
CRASH = 'sh -c "sleep 1.2; exit 1"'
ONE_SHOT = {"startsecs": 1, "startretries": 0, "autorestart": False}

Run = Callable[[Sequence[Mapping[str, TomlValue]], Sequence[Program]], Supervisor]


@pytest.fixture
def run(tmp_path: Path, amqp_url: str, prefix: str, smtp_server: SmtpServer) -> Iterator[Run]:
    """Start a supervisord with these subscriptions and programs; always stopped afterwards."""
    started: list[Supervisor] = []

    def start(subscriptions: Sequence[Mapping[str, TomlValue]], programs: Sequence[Program]) -> Supervisor:
        sv = Supervisor(tmp_path / f"sv{len(started)}", broker_url=amqp_url, prefix=prefix,
                        smtp=smtp_server.client_settings(), subscriptions=subscriptions,
                        programs=programs, host=HOST)
        started.append(sv)
        return sv.start()

    yield start
    stop_all(started, "relay")


def test_an_unexpected_exit_sends_exactly_one_mail_over_tls(run: Run, smtp_server: SmtpServer) -> None:
    sv = run([{"name": "crashes", "to": [ONCALL, SECOND], "states": ["EXITED", "FATAL"]}],
             [Program("crash", CRASH, ONE_SHOT)])

    assert "started" in sv.start_program("crash").stdout
    received = sv.wait_for(lambda: smtp_server.received, 15, what="the crash mail")
    assert sv.state("crash") == "EXITED"

    mail = received[0]
    assert sorted(mail.rcpt_tos) == sorted([ONCALL, SECOND])
    assert mail.tls is True
    assert mail.auth_user == smtp_server.user
    message = parsed(mail)
    assert message["Subject"] == f"[opsrelay] {HOST}: crash exited unexpectedly"
    assert message["X-Opsrelay-Subscription"] == "crashes"
    text = body(message)
    assert re.search(r"^\s*state\s+EXITED \(was RUNNING\)$", text, re.M), text
    assert re.search(r"^\s*expected\s+no$", text, re.M), text
    assert re.search(rf"^\s*host\s+{HOST}$", text, re.M), text
    assert re.search(r"^\s*process\s+crash$", text, re.M), text

    time.sleep(QUIET)  # a negative check: no further mail may arrive meanwhile
    assert len(smtp_server.received) == 1, [parsed(m)["Subject"] for m in smtp_server.received]


def test_an_expected_exit_sends_no_mail_when_unexpected_only(run: Run, smtp_server: SmtpServer) -> None:
    audit = "audit@example.test"
    sv = run([{"name": "crashes", "to": [ONCALL], "states": ["EXITED"], "unexpected_only": True},
              # The control: the same events without the filter, so the expected exit provably went through.
              {"name": "audit", "to": [audit], "states": ["EXITED"], "unexpected_only": False}],
             [Program("done", 'sh -c "sleep 1.2; exit 0"', {**ONE_SHOT, "exitcodes": "0"}),
              Program("crash", CRASH, ONE_SHOT)])

    # The expected exit first: its event sits ahead of the crash in the crashes queue.
    sv.start_program("done")
    audited = sv.wait_for(lambda: mails_to(smtp_server, audit), 15, what="the audit mail for done")
    assert parsed(audited[0])["Subject"] == f"[opsrelay] {HOST}: done exited as expected"
    assert sv.state("done") == "EXITED"

    sv.start_program("crash")
    crashes = sv.wait_for(lambda: mails_to(smtp_server, ONCALL), 15, what="the crash mail")
    assert parsed(crashes[0])["Subject"] == f"[opsrelay] {HOST}: crash exited unexpectedly"
    sv.wait_for(lambda: len(mails_to(smtp_server, audit)) >= 2, 15, what="the audit mail for crash")

    time.sleep(QUIET)  # a negative check: no further mail may arrive meanwhile
    oncall = [parsed(m)["Subject"] for m in mails_to(smtp_server, ONCALL)]
    assert oncall == [f"[opsrelay] {HOST}: crash exited unexpectedly"]
    assert len(smtp_server.received) == 3


def test_a_program_that_cannot_start_sends_one_fatal_mail(run: Run, smtp_server: SmtpServer) -> None:
    # startsecs=3, not 1: supervisord reaps a child only after a loop turn, and when the exit is
    # missed by the turn that saw the pipe close, the next comes after its 1 s poll timeout and
    # counts /bin/false as RUNNING, then EXITED (transition() runs before reap() in runforever).
    sv = run([{"name": "crashes", "to": [ONCALL], "states": ["EXITED", "FATAL"]}],
             [Program("broken", "/bin/false", {"startsecs": 3, "startretries": 1, "autorestart": False})])

    # supervisorctl waits for the outcome: BACKOFF twice, then FATAL ("spawn error").
    assert sv.start_program("broken").returncode != 0
    received = sv.wait_for(lambda: smtp_server.received, 15, what="the FATAL mail")
    assert sv.state("broken") == "FATAL"

    mail = received[0]
    assert mail.rcpt_tos == (ONCALL,)
    assert mail.tls is True and mail.auth_user == smtp_server.user
    message = parsed(mail)
    assert message["Subject"] == f"[opsrelay] {HOST}: broken could not be started (FATAL)"
    text = body(message)
    assert re.search(r"^\s*state\s+FATAL \(was BACKOFF\)$", text, re.M), text
    assert "PROCESS_STATE_FATAL" in text

    # It never ran long enough to exit (BACKOFF is not EXITED): FATAL is the only mail.
    time.sleep(QUIET)  # a negative check: no further mail may arrive meanwhile
    assert len(smtp_server.received) == 1, [parsed(m)["Subject"] for m in smtp_server.received]


def test_a_dotted_non_ascii_program_name_is_routed_and_named(run: Run, smtp_server: SmtpServer) -> None:
    name = "wörker.v2"
    dotted, decoy = "dotted@example.test", "decoy@example.test"
    sv = run([{"name": "dotted", "to": [dotted], "programs": [name], "states": ["EXITED"]},
              # Would match if the dot split the name into two routing-key words.
              {"name": "decoy", "to": [decoy], "programs": ["wörker", "v2", "w*ker"], "states": ["EXITED"]}],
             [Program(name, CRASH, ONE_SHOT)])

    assert "started" in sv.start_program(name).stdout
    received = sv.wait_for(lambda: smtp_server.received, 15, what=f"the mail for {name}")
    assert sv.state(name) == "EXITED"

    mail = received[0]
    assert mail.rcpt_tos == (dotted,)
    message = parsed(mail)
    assert message["Subject"] == f"[opsrelay] {HOST}: {name} exited unexpectedly"
    text = body(message)
    assert re.search(rf"^\s*process\s+{re.escape(name)}$", text, re.M), text
    assert re.search(rf"^\s*group\s+{re.escape(name)}$", text, re.M), text

    time.sleep(QUIET)  # a negative check: no further mail may arrive meanwhile
    assert [m.rcpt_tos for m in smtp_server.received] == [(dotted,)]
    # supervisord's len: counts characters; a listener counting bytes would lose the framing here.
    assert "malformed" not in sv.listener_log(), sv.listener_log()
