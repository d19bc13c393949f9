"""Real mail clients through opsrelay-sendmail, delivered by a real ``opsrelay serve`` over STARTTLS + AUTH.

Debian's bsd-mailx (``mail -s``), the exact command Debian's cron runs, superlance's crashmail
under a real supervisord, and ``git send-email --sendmail-cmd``. scripts/ensure-mail-clients.sh
installs the clients (``make test`` runs it); a client that is missing fails the test in CI and
skips it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import BIN
from tests.e2e.mail import parsed
from tests.integration.test_sendmail import SENDMAIL, Host
from tests.smtp_server import ReceivedMail, SmtpServer
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

OPS = "ops@example.test"  # where the host's [aliases] send root
SENDER = "alerts@example.test"  # the host's smtp.from


def require(found: bool, what: str) -> None:
    if found:
        return
    message = f"{what} is not installed (scripts/ensure-mail-clients.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def body_bytes(mail: ReceivedMail) -> bytes:
    return mail.content.partition(b"\r\n\r\n")[2]


def assert_secure(mail: ReceivedMail, server: SmtpServer) -> None:
    assert mail.tls is True and mail.auth_user == server.user


@pytest.fixture
def host(tmp_path: Path, prefix: str, smtp_server: SmtpServer) -> Host:
    return Host(tmp_path, prefix, smtp_server.client_settings())


@pytest.fixture
def relay(host: Host) -> Iterator[subprocess.Popen[bytes]]:
    """``opsrelay serve`` as deployed; it must stop cleanly (exit 0) on SIGTERM."""
    log_path = host.root / "relay.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(BIN / "opsrelay"), "serve", "--config", str(host.config)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=host.env())
    try:
        wait_for(lambda: "relay: consuming" in log_path.read_text(errors="replace"), 20,
                 what="the relay to consume", diagnostics=lambda: log_path.read_text(errors="replace"))
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise
    assert code == 0, log_path.read_text(errors="replace")


def test_bsd_mailx(host: Host, relay: object, smtp_server: SmtpServer, tmp_path: Path) -> None:
    mailx = shutil.which("bsd-mailx")
    require(mailx is not None, "bsd-mailx")
    assert mailx is not None
    # bsd-mailx runs the program its `sendmail` variable names (default /usr/sbin/sendmail) as
    # `sendmail -i -t`; a mailrc is how a host without opsrelay as /usr/sbin/sendmail points it at us.
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={SENDMAIL}\n")
    text = "Disk /var is 91% full.\nÜberwachung: ok\n.\nthe line above is a lone dot\n"
    result = subprocess.run([mailx, "-s", "disk space on web1 – ü", "-c", "dba@example.test", "root",
                             "dev@example.test"], input=text.encode(), capture_output=True, timeout=30,
                            env=host.env(MAILRC=str(mailrc), HOME=str(tmp_path)), check=False)
    assert result.returncode == 0, result.stderr
    [mail] = wait_for(lambda: smtp_server.received, 15, what="the mail from bsd-mailx")
    assert_secure(mail, smtp_server)
    assert mail.mail_from == SENDER
    assert sorted(mail.rcpt_tos) == sorted([OPS, "dev@example.test", "dba@example.test"])
    message = parsed(mail)
    assert message["Subject"] == "disk space on web1 – ü"  # raw UTF-8 from mailx, kept as it came
    assert message["To"] == "dev@example.test, root" and message["Cc"] == "dba@example.test"
    assert message["From"].addresses[0].addr_spec == SENDER
    assert message["Date"] and message["Message-ID"]
    assert body_bytes(mail) == text.replace("\n", "\r\n").encode()


def test_the_exact_debian_cron_invocation(host: Host, relay: object, smtp_server: SmtpServer) -> None:
    # cron 3.0pl1 (Debian): MAILARGS "%s -FCronDaemon -i -B8BITMIME -oem %s", and the message
    # do_command.c writes (From, To, Subject, MIME, X-Cron-Env), then the job's output.
    output = "backup of /srv started\nGrüße: 3 files\n.\nbackup done\n"
    message = ("From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@web1> /usr/local/bin/backup\n"
               "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
               "X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\nX-Cron-Env: <PATH=/usr/bin:/bin>\n"
               "X-Cron-Env: <LOGNAME=root>\n\n" + output)
    result = subprocess.run([str(SENDMAIL), "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
                            input=message.encode(), capture_output=True, env=host.env(), timeout=30, check=False)
    assert (result.returncode, result.stderr) == (0, b"")
    [mail] = wait_for(lambda: smtp_server.received, 15, what="the cron mail")
    assert_secure(mail, smtp_server)
    assert (mail.mail_from, mail.rcpt_tos) == (SENDER, (OPS,))
    parsed_message = parsed(mail)
    assert mail.content.startswith(b"From: root (Cron Daemon)\r\nTo: root\r\n")  # cron's own header, kept
    assert parsed_message["Subject"] == "Cron <root@web1> /usr/local/bin/backup"
    assert parsed_message.get_all("X-Cron-Env") == ["<SHELL=/bin/sh>", "<HOME=/root>", "<PATH=/usr/bin:/bin>",
                                                    "<LOGNAME=root>"]
    # -i: the lone "." in the job's output is data, not the end of the message.
    assert body_bytes(mail) == output.replace("\n", "\r\n").encode()


def test_git_send_email(host: Host, relay: object, smtp_server: SmtpServer, tmp_path: Path) -> None:
    git = shutil.which("git")
    require(git is not None, "git")
    assert git is not None
    exec_path = subprocess.run([git, "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()
    has_mail_address = shutil.which("perl") is not None and subprocess.run(
        ["perl", "-MMail::Address", "-e", "1"], capture_output=True, check=False).returncode == 0
    require(Path(exec_path, "git-send-email").exists() and has_mail_address,
            "git send-email (git-email with libmailtools-perl)")
    repo = tmp_path / "repo"
    env = host.env(HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1", PATH=f"{BIN}:{os.environ['PATH']}",
                   GIT_AUTHOR_NAME="Jörg Dev", GIT_AUTHOR_EMAIL="joerg@example.test",
                   GIT_COMMITTER_NAME="Jörg Dev", GIT_COMMITTER_EMAIL="joerg@example.test")

    def run(*args: str) -> str:
        done = subprocess.run([git, *args], cwd=repo, env=env, capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode()

    repo.mkdir()
    run("init", "-q")
    run("commit", "-q", "--allow-empty", "-m", "start")
    (repo / "motd").write_text("Willkommen auf web1 – grüß dich\n")
    run("add", "motd")
    run("commit", "-q", "-m", "Add a motd")
    run("send-email", "--sendmail-cmd=opsrelay-sendmail", "--envelope-sender=joerg@example.test",
        "--to=devel@lists.example.test", "--confirm=never", "--suppress-cc=all", "--quiet", "-1")
    [mail] = wait_for(lambda: smtp_server.received, 15, what="the patch mail")
    assert_secure(mail, smtp_server)
    # git passes "-i -f joerg@example.test devel@lists.example.test" (--envelope-sender is -f).
    assert (mail.mail_from, mail.rcpt_tos) == ("joerg@example.test", ("devel@lists.example.test",))
    message = parsed(mail)
    assert message["Subject"] == "[PATCH] Add a motd"
    assert message["From"] == "Jörg Dev <joerg@example.test>"
    assert mail.content.count(b"\r\nMessage-Id: ") + mail.content.count(b"\r\nMessage-ID: ") == 1  # git's, kept
    assert "+Willkommen auf web1 – grüß dich\r\n".encode() in body_bytes(mail)


@pytest.mark.supervisord
def test_crashmail_under_supervisord(host: Host, smtp_server: SmtpServer, tmp_path: Path) -> None:
    require(Path(BIN, "crashmail").exists(), "superlance's crashmail")
    logs = tmp_path / "logs"
    logs.mkdir()
    socket_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    conf = tmp_path / "supervisord.conf"
    conf.write_text("\n".join([
        "[unix_http_server]", f"file={socket_dir / f'sv-{host.prefix}.sock'}", "chmod=0700", "",
        "[supervisord]", f"logfile={logs / 'supervisord.log'}", f"pidfile={tmp_path / 'supervisord.pid'}",
        f"childlogdir={logs}", "nodaemon=true", "silent=true", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface", "",
        # The relay, as a host without opsrelay's own listener runs it.
        "[program:relay]", f"command={BIN / 'opsrelay'} serve --config {host.config}", "startsecs=1",
        "stopwaitsecs=5", "redirect_stderr=true", f"stdout_logfile={logs / 'relay.log'}", "",
        # superlance's crashmail exactly as its docs say, with opsrelay-sendmail found on PATH.
        "[eventlistener:crashmail]",
        "command=crashmail -p crash -m oncall@example.test -s \"opsrelay-sendmail -t -i\"",
        "events=PROCESS_STATE_EXITED", f"stderr_logfile={logs / 'crashmail.log'}",
        f'environment=PATH="{BIN}:/usr/bin:/bin",OPSRELAY_CONFIG="{host.config}"', "",
        "[program:crash]", 'command=sh -c "sleep 1.2; exit 1"', "startsecs=1", "startretries=0",
        "autorestart=false", "",
    ]))
    env = {k: v for k, v in host.env().items() if k != "OPSRELAY_CONFIG"}
    env.update(PYTHONUTF8="1")
    supervisord = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                   start_new_session=True)

    def diagnostics() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(logs.glob("*.log")))

    try:
        [mail] = wait_for(lambda: smtp_server.received, 30, what="crashmail's mail", diagnostics=diagnostics)
    finally:
        supervisord.send_signal(signal.SIGTERM)
        try:
            supervisord.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(supervisord.pid, signal.SIGKILL)
            supervisord.wait(5)
            raise
    assert supervisord.returncode == 0, diagnostics()
    assert_secure(mail, smtp_server)
    assert (mail.mail_from, mail.rcpt_tos) == (SENDER, ("oncall@example.test",))
    message = parsed(mail)
    assert message["To"] == "oncall@example.test"
    assert message["Subject"].startswith("crash crashed at ")
    assert message["From"].addresses[0].addr_spec == SENDER and message["Date"] and message["Message-ID"]
    assert body_bytes(mail).startswith(b"Process crash in group crash exited unexpectedly (pid ")
    assert b"from state RUNNING" in body_bytes(mail)
    assert "stopped: relay (exit status 0)" in (logs / "supervisord.log").read_text()
