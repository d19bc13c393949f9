"""``opsrelay listen`` as a drop-in for superlance's crashmail, under a real supervisord.

supervisord.conf has only crashmail's stanza with the program name changed::

    [eventlistener:crashmail]
    command=.../opsrelay listen -a -m ops@example.com -o ACME
    events=PROCESS_STATE

No ``opsrelay serve`` runs: the listener hosts the relay for the implicit subscription
(relay/daemon/hosted.py). The config (found through ``$OPSRELAY_CONFIG``, set in the
stanza's environment) names the test SMTP server (STARTTLS + AUTH, trustme CA) and an
embedded queue in the test's directory. The last test runs the listener on its own,
as supervisord would leave it when it dies: stdin closed.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from relay.config.crashmail import CrashmailFlags, config_with_crashmail
from relay.config.models import load_config
from relay.contract.event import decode_event
from relay.contract.message import Message
from relay.contract.names import document_queues, unrouted_queue
from relay.daemon.hosted import hosted_config
from relay.daemon.relay import relay_topology
from relay.engines import open_engine
from relay.ops.browse import browse
from tests.e2e.harness import BIN, Program, Supervisor, stop_all
from tests.e2e.mail import parsed
from tests.smtp_server import ReceivedMail, SmtpServer
from tests.waiting import wait_for

pytestmark = [pytest.mark.supervisord, pytest.mark.timeout(60)]

HOST = "e2ehost"
OPS = "ops@example.com"
QUIET = 1.5  # long enough for a second (wrong) mail: one crash becomes mail in well under a second here
CRASH = 'sh -c "sleep 1.2; exit 1"'  # RUNNING first (startsecs=1), then an unexpected EXITED
DONE = 'sh -c "sleep 1.2; exit 0"'
ONE_SHOT = {"startsecs": 1, "startretries": 0, "autorestart": False}


class CrashmailSupervisor(Supervisor):
    """The harness's supervisord with crashmail's stanza instead of opsrelay's listener and relay programs."""

    def __init__(self, root: Path, listen_args: str, *, smtp: Mapping[str, object], prefix: str,
                 programs: Sequence[Program]) -> None:
        self.listen_args = listen_args
        super().__init__(root, broker_url=f"sqlite:///{root / 'queue.db'}", prefix=prefix, smtp=smtp,
                         subscriptions=[], programs=programs, host=HOST)
        # The hosted relay logs to the listener's stderr: the harness waits there for "relay: consuming".
        self.relay_log_path = self.listener_log_path

    def _opsrelay_sections(self) -> list[str]:
        # crashmail's stanza, the command's name changed; the config comes from the environment.
        return [
            "[eventlistener:crashmail]",
            f"command={BIN / 'opsrelay'} listen {self.listen_args}",
            "events=PROCESS_STATE",
            f'environment=OPSRELAY_CONFIG="{self.config_path}"',
            f"stderr_logfile={self.listener_log_path}", "",
        ]

    def queued(self, flags: CrashmailFlags) -> dict[str, list[Message]]:
        """What waits in each queue the listener's relay declares (unrouted included), left in place."""
        cfg = hosted_config(config_with_crashmail(load_config(self.config_path, env={}), flags))
        names = [q.name for q in relay_topology(cfg).queues]

        async def read() -> dict[str, list[Message]]:
            async with open_engine(cfg.broker.url) as engine:
                return {name: await browse(engine, name) for name in names}

        return asyncio.run(read())


Run = Callable[[str, Sequence[Program]], CrashmailSupervisor]


@pytest.fixture
def run(tmp_path: Path, prefix: str, smtp_server: SmtpServer) -> Iterator[Run]:
    started: list[CrashmailSupervisor] = []

    def start(listen_args: str, programs: Sequence[Program]) -> CrashmailSupervisor:
        sv = CrashmailSupervisor(tmp_path / f"sv{len(started)}", listen_args, prefix=prefix,
                                 smtp=smtp_server.client_settings(), programs=programs)
        started.append(sv)
        sv.start()
        return sv

    yield start
    # supervisord's SIGTERM: the listener drains its relay and exits 0.
    stop_all(started, "crashmail")


def subjects(server: SmtpServer) -> list[str]:
    return [str(parsed(m)["Subject"]) for m in server.received]


def assert_crash_mail(mail: ReceivedMail, server: SmtpServer, process: str) -> None:
    assert mail.rcpt_tos == (OPS,)
    assert mail.tls is True and mail.auth_user == server.user
    message = parsed(mail)
    assert re.fullmatch(rf"ACME: {process} crashed at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC",
                        str(message["Subject"])), message["Subject"]
    assert message["To"] == OPS
    assert message["X-Opsrelay-Subscription"] == "crashmail"


def test_a_crash_sends_one_mail_and_an_expected_exit_none(run: Run, smtp_server: SmtpServer) -> None:
    sv = run(f"-a -m {OPS} -o ACME", [Program("done", DONE, {**ONE_SHOT, "exitcodes": "0"}),
                                      Program("crash", CRASH, ONE_SHOT)])

    # The expected exit first: its event reaches the listener (and its relay) before the crash's.
    assert "started" in sv.start_program("done").stdout
    sv.wait_for(lambda: sv.state("done") == "EXITED", 10, what="done to exit")
    assert "started" in sv.start_program("crash").stdout
    received = sv.wait_for(lambda: smtp_server.received, 15, what="the crash mail")
    assert sv.state("crash") == "EXITED"
    assert_crash_mail(received[0], smtp_server, "crash")

    time.sleep(QUIET)  # a negative check: no further mail may arrive meanwhile
    assert len(smtp_server.received) == 1, subjects(smtp_server)
    # stdout is supervisord's: a stray byte there would have turned the listener UNKNOWN.
    assert "UNKNOWN" not in sv.supervisord_log() and sv.state("crashmail") == "RUNNING"


def test_p_mails_only_the_named_programs(run: Run, smtp_server: SmtpServer) -> None:
    flags = CrashmailFlags.parse(programs=["crash", "other:bystander"], email=OPS, optional_header="ACME")
    sv = run(f"-p crash -p other:bystander -m {OPS} -o ACME",
             [Program("bystander", CRASH, ONE_SHOT), Program("crash", CRASH, ONE_SHOT)])

    assert "started" in sv.start_program("bystander").stdout
    sv.wait_for(lambda: sv.state("bystander") == "EXITED", 10, what="bystander to crash")
    assert "started" in sv.start_program("crash").stdout
    received = sv.wait_for(lambda: smtp_server.received, 15, what="the crash mail")
    assert_crash_mail(received[0], smtp_server, "crash")

    time.sleep(QUIET)  # a negative check: no further mail may arrive meanwhile
    assert len(smtp_server.received) == 1, subjects(smtp_server)
    # The bystander's crash was published (it matched no binding, so it waits in unrouted), not lost.
    unrouted = [decode_event(m.body) for m in sv.queued(flags)[unrouted_queue(sv.prefix)]]
    assert [(e.process, e.expected) for e in unrouted if e.state == "EXITED"] == [("bystander", False)]


def test_sigterm_finishes_the_mail_in_flight_and_leaves_nothing_queued(run: Run, smtp_server: SmtpServer) -> None:
    flags = CrashmailFlags.parse(any_program=True, email=OPS, optional_header="ACME")
    sv = run(f"-a -m {OPS} -o ACME", [Program("crash", CRASH, ONE_SHOT)])
    # The server holds the end of DATA 2 s: the mail is in flight when supervisord stops the listener.
    smtp_server.reply_to_data("250 2.0.0 OK queued", times=1, delay=2.0)

    assert "started" in sv.start_program("crash").stdout
    sv.wait_for(lambda: smtp_server.data_attempts >= 1, 15, what="the crash mail to reach DATA")
    assert smtp_server.received == []
    began = time.monotonic()
    stopped = sv.ctl("stop", "crashmail")  # SIGTERM, and waits until the listener is gone
    took = time.monotonic() - began

    assert "crashmail: stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "stopped: crashmail (exit status 0)" in sv.supervisord_log(), sv.supervisord_log()
    assert "finishing 1 delivery(ies) in flight" in sv.listener_log(), sv.listener_log()
    assert len(smtp_server.received) == 1, subjects(smtp_server)
    assert_crash_mail(smtp_server.received[0], smtp_server, "crash")
    assert took < 5, f"stopping took {took:.1f}s"
    # Acked where it was taken: nothing waits to be sent again, in any queue the relay consumes.
    # (The relay's heartbeat and the silences' owner document are kept there on purpose.)
    kept = {unrouted_queue(sv.prefix), *document_queues(sv.prefix)}
    waiting = {name: len(messages) for name, messages in sv.queued(flags).items() if name not in kept}
    assert f"{sv.prefix}.sub.crashmail" in waiting and f"{sv.prefix}.outbound" in waiting
    assert waiting == dict.fromkeys(waiting, 0)

    # And started again, the listener finds nothing to resend.
    assert "started" in sv.ctl("start", "crashmail").stdout
    sv.wait_for(lambda: sv.listener_log().count("relay: consuming") == 2, 15, what="the listener to start again")
    time.sleep(QUIET)  # a negative check: no further mail may arrive meanwhile
    assert len(smtp_server.received) == 1, subjects(smtp_server)


def test_stdin_closed_finishes_the_mail_in_flight(tmp_path: Path, prefix: str, smtp_server: SmtpServer) -> None:
    """supervisord gone (its end of the pipe closed): the listener still delivers what it took, then exits 0."""
    # The harness only writes the config here; no supervisord runs.
    config = CrashmailSupervisor(tmp_path / "sv", "", prefix=prefix, smtp=smtp_server.client_settings(),
                                 programs=()).config_path
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    payload = "processname:crash groupname:crash from_state:RUNNING expected:0 pid:4242"
    envelope = (f"ver:3.0 server:supervisor serial:1 pool:crashmail poolserial:1 "
                f"eventname:PROCESS_STATE_EXITED len:{len(payload)}\n{payload}")
    smtp_server.reply_to_data("250 2.0.0 OK queued", times=1, delay=1.5)
    out_path, err_path = tmp_path / "listener.out", tmp_path / "listener.err"
    with out_path.open("wb") as out_file, err_path.open("wb") as err_file, subprocess.Popen(
            [str(BIN / "opsrelay"), "listen", "-a", "-m", OPS, "-o", "ACME", "--config", str(config)],
            stdin=subprocess.PIPE, stdout=out_file, stderr=err_file, env=env) as listener:
        assert listener.stdin is not None
        listener.stdin.write(envelope.encode("utf-8"))
        listener.stdin.flush()
        try:
            wait_for(lambda: smtp_server.data_attempts >= 1, 15, what="the crash mail to reach DATA")
        finally:
            listener.stdin.close()
            listener.wait(15)
    out, err = out_path.read_bytes(), err_path.read_bytes()
    assert listener.returncode == 0, err.decode()
    # stdout carried the protocol and nothing else (the relay's logs went to stderr).
    assert out == b"READY\nRESULT 2\nOKREADY\n"
    assert b"finishing 1 delivery(ies) in flight" in err, err.decode()
    assert len(smtp_server.received) == 1
    assert_crash_mail(smtp_server.received[0], smtp_server, "crash")
