"""A real supervisord whose program prints a Python traceback to stderr and exits: the mail shows it.

``opsrelay listen`` runs as supervisord's eventlistener and ``opsrelay serve`` as a
program (tests/e2e/harness.py), both on the embedded queue in the test's directory; the
listener asks supervisord's XML-RPC for the exit status and the stderr tail at event
time, and the relay delivers the mail to the real STARTTLS + AUTH test server.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Program, Supervisor
from tests.e2e.mail import body, parsed
from tests.smtp_server import SmtpServer

pytestmark = [pytest.mark.supervisord, pytest.mark.timeout(45)]

HOST = "e2ehost"
ONCALL = "oncall@example.test"
JOB = textwrap.dedent("""\
    import sys, time, traceback
    time.sleep(1.2)  # past startsecs: RUNNING, then an EXITED event
    print("charging invoice 42", flush=True)
    def charge(invoice):
        raise ValueError(f"invoice {invoice} has no customer")
    try:
        charge(42)
    except ValueError:
        traceback.print_exc()
        sys.exit(3)
""")


@pytest.fixture
def sv(tmp_path: Path, prefix: str, smtp_server: SmtpServer) -> Iterator[Supervisor]:
    script = tmp_path / "charge_job.py"
    script.write_text(JOB, encoding="utf-8")
    supervisor = Supervisor(
        tmp_path / "sv", broker_url=f"sqlite:///{tmp_path / 'queue.db'}", prefix=prefix,
        smtp=smtp_server.client_settings(), host=HOST,
        subscriptions=[{"name": "crashes", "to": [ONCALL], "states": ["EXITED", "FATAL"]}],
        programs=[Program("billing", f"{sys.executable} {script}",
                          {"startsecs": 1, "startretries": 0, "autorestart": False})])
    with supervisor:
        yield supervisor
    assert supervisor.leftovers() == []
    assert supervisor.returncode == 0 and supervisor.killed == [], supervisor.supervisord_log()


def test_the_crash_mail_carries_the_traceback(sv: Supervisor, smtp_server: SmtpServer) -> None:
    assert "started" in sv.start_program("billing").stdout
    received = sv.wait_for(lambda: smtp_server.received, 20, what="the crash mail")
    assert sv.state("billing") == "EXITED"
    mail = received[0]
    assert mail.rcpt_tos == (ONCALL,) and mail.tls is True and mail.auth_user == smtp_server.user

    text = body(parsed(mail))
    # The traceback, whole and in order, as the job wrote it to stderr (not stdout's line).
    lines = [line.strip() for line in text.splitlines()]
    expected = ["Traceback (most recent call last):", "charge(42)",
                'raise ValueError(f"invoice {invoice} has no customer")', "ValueError: invoice 42 has no customer"]
    assert all(line in lines for line in expected), text
    positions = [lines.index(line) for line in expected]
    assert positions == sorted(positions), text
    assert "charging invoice 42" not in text
    assert "exited with status 3" in text, text
    assert "log tail unavailable" not in text and "listener failed" not in sv.listener_log()
