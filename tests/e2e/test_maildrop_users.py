"""Unprivileged users' mail through the maildrop, end to end, with the processes as deployed.

* Debian's bsd-mailx (``mail -s x root``) run by opsrelay-t1, its ``sendmail`` variable set in
  the user's own ``~/.mailrc`` to an ``opsrelay-sendmail`` every user can run; ``opsrelay serve``
  (root) ingests the maildrop and delivers over STARTTLS + AUTH.
* ``opsrelay listen`` as root under a real supervisord (as its PROCESS_STATE eventlistener)
  ingests the maildrop into RabbitMQ while no relay runs; a relay started afterwards delivers.

The host layout, the users and the relay process are those of
:mod:`tests.integration.test_maildrop` (a world-traversable ``/tmp/opsrelay-md-XXXX``, the
config root's 0600, the users of scripts/ensure-test-users.sh). The ``opsrelay-sendmail`` the
users run is a two-line script in that folder's ``bin/``, as ``/usr/local/bin/opsrelay-sendmail``
would be: the virtualenv's interpreter is under /root, which other users cannot enter.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.config.models import load_config
from tests.e2e.harness import BIN
from tests.integration.faults import cleanup_broker, wait_until
from tests.integration.test_maildrop import (
    DOMAIN,
    OPS,
    DropHost,
    ServeProcess,
    User,
    clean_homes,
    drop_id,
    drop_root,
    headers,
    ok,
    outbound_depth,
    require,
    run_as,
    user_python,
    user_src,
    users,
    wait_until_received,
)
from tests.smtp_server import SmtpServer

__all__ = ["clean_homes", "drop_root", "users"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(90)

MAILRC = r"""
import os, sys
with open(os.path.expanduser("~/.mailrc"), "x") as handle:
    handle.write("set sendmail=%s\n" % sys.argv[1])
"""


def installed_sendmail(host: DropHost) -> Path:
    """``bin/opsrelay-sendmail`` for every user: this checkout on an interpreter they can run."""
    python = user_python()
    assert python is not None
    folder = host.root / "bin"
    folder.mkdir(mode=0o755)
    script = folder / "opsrelay-sendmail"
    # argv[0] as the console script has it, so that its messages say "opsrelay-sendmail: ...".
    script.write_text(f"#!/bin/sh\nPYTHONPATH={user_src()} exec {python} -c 'import sys; from relay.sendmail.main "
                      "import main; sys.exit(main([\"opsrelay-sendmail\", *sys.argv[1:]]))' \"$@\"\n")
    script.chmod(0o755)
    return script


async def started(relay: ServeProcess, host: DropHost) -> ServeProcess:
    def ready() -> bool:
        relay.alive()
        return "relay: consuming" in relay.text() and host.wake.is_socket()

    await wait_until(ready, 20, what="the relay to consume and bind the maildrop's .wake", diagnostics=relay.log)
    return relay


async def test_bsd_mailx_as_a_user_through_the_maildrop(drop_root: Path, prefix: str, users: dict[str, User],
                                                        smtp_server: SmtpServer, tmp_path: Path) -> None:
    mailx = shutil.which("bsd-mailx")
    require(mailx is not None, "bsd-mailx is not installed (scripts/ensure-mail-clients.sh installs it)")
    assert mailx is not None
    host = DropHost(drop_root, prefix, smtp_server.client_settings())
    t1 = users["opsrelay-t1"]
    sendmail = installed_sendmail(host)
    ok(host.python_as(t1, MAILRC, str(sendmail)))  # the user's own ~/.mailrc
    text = "The nightly job of opsrelay-t1 failed.\nÜberwachung: see /var/log/job.log\n"
    with ServeProcess(host, tmp_path / "relay.log") as relay:
        await started(relay, host)
        result = await asyncio.to_thread(
            run_as, t1, [mailx, "-s", "job failed on web1", "root"], data=text.encode(),
            env={"OPSRELAY_CONFIG": str(host.config), "OPSRELAY_SENDMAIL__MAILDROP": str(host.maildrop)})
        assert (result.returncode, result.stderr) == (0, b"")
        [mail] = await wait_until_received(smtp_server, 1)
        await wait_until(lambda: host.drops() == [] and host.rows().total() == 0, 10, what="the mail acked",
                         diagnostics=relay.log)
        assert await relay.terminate() == 0, relay.log()
    # The mail went through the maildrop, not the queue: the relay logged its ingest.
    assert f"from uid {t1.uid} queued as mail to 1 recipient(s)" in relay.text()
    assert mail.tls and mail.auth_user == smtp_server.user
    assert (mail.mail_from, mail.rcpt_tos) == (t1.address, (OPS,))
    head = headers(mail)
    assert head["Subject"] == "job failed on web1" and head["To"] == "root"
    assert head["From"] == f"{t1.gecos} <{t1.address}>" and head["Date"]
    assert head["Message-ID"].endswith(f"@{DOMAIN}>") and ".drop." in head["Message-ID"]
    assert mail.content.partition(b"\r\n\r\n")[2] == text.replace("\n", "\r\n").encode()
    assert not (t1.home / "dead.letter").exists()
    assert host.rejected_names() == {}


@pytest.fixture
async def amqp_host(drop_root: Path, prefix: str, amqp_url: str, smtp_server: SmtpServer) -> AsyncIterator[DropHost]:
    host = DropHost(drop_root, prefix, smtp_server.client_settings(), broker_url=amqp_url)
    yield host
    await cleanup_broker(load_config(host.config, env={}))


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short folder for supervisord's socket (sun_path is 108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="mdsv-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start_supervisord(conf: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    env.update(PYTHONUTF8="1")
    return subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=conf.parent,
                            start_new_session=True)


@pytest.mark.rabbitmq
@pytest.mark.supervisord
async def test_opsrelay_listen_under_supervisord_ingests_into_rabbitmq_while_no_relay_runs(
        amqp_host: DropHost, users: dict[str, User], smtp_server: SmtpServer, tmp_path: Path,
        socket_dir: Path) -> None:
    require((BIN / "supervisord").exists(), "supervisord is not installed in the virtualenv")
    host, t2 = amqp_host, users["opsrelay-t2"]
    # A relay ran on this host before (its queues are on the broker); now none runs.
    with ServeProcess(host, tmp_path / "relay0.log") as before:
        await started(before, host)
        assert await before.terminate() == 0, before.log()
    assert not host.wake.exists()
    logs = tmp_path / "logs"
    logs.mkdir()
    conf = tmp_path / "supervisord.conf"
    conf.write_text("\n".join([
        "[unix_http_server]", f"file={socket_dir / 'sv.sock'}", "chmod=0700", "",
        "[supervisord]", f"logfile={logs / 'supervisord.log'}", f"pidfile={tmp_path / 'supervisord.pid'}",
        f"childlogdir={logs}", "nodaemon=true", "silent=true", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface", "",
        "[eventlistener:opsrelay]", f"command={BIN / 'opsrelay'} listen --config {host.config}",
        "events=PROCESS_STATE", f"stderr_logfile={logs / 'listener.log'}",
        f'environment=PYTHONPATH="{user_src()}",PYTHONUNBUFFERED="1"', "",
    ]) + "\n")
    supervisord = start_supervisord(conf)
    listener_log = logs / "listener.log"

    def diagnostics() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(logs.glob("*.log")))

    try:
        # The listener's ingest binds the maildrop's .wake once it runs.
        await wait_until(lambda: supervisord.poll() is None and host.wake.is_socket(), 20,
                         what="opsrelay listen to ingest the maildrop", diagnostics=diagnostics)
        result = ok(await asyncio.to_thread(host.submit, t2, "-v", "-i", "root",
                                            data=b"Subject: from a listener-only host\n\nvia rabbit\n"))
        assert result.stderr.decode().endswith("; relay woken\n")  # the listener's socket took the poke
        mail_id = drop_id(result)

        async def in_rabbitmq() -> bool:
            return host.drops() == [] and await outbound_depth(host) == 1

        await wait_until(in_rabbitmq, 15, what="the drop to be published to outbound", diagnostics=diagnostics,
                         interval=0.2)
        assert f"maildrop: {mail_id} from uid {t2.uid} queued as mail to 1 recipient(s)" in listener_log.read_text()
        assert smtp_server.received == []
        with ServeProcess(host, tmp_path / "relay1.log") as relay:
            [mail] = await wait_until_received(smtp_server, 1)

            async def acked() -> bool:
                relay.alive()
                return await outbound_depth(host) == 0

            await wait_until(acked, 10, what="the mail to be acked", diagnostics=relay.log, interval=0.2)
            assert await relay.terminate() == 0, relay.log()
    finally:
        supervisord.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(supervisord.wait, 20)
        except subprocess.TimeoutExpired:
            os.killpg(supervisord.pid, signal.SIGKILL)
            supervisord.wait(5)
            raise
    assert supervisord.returncode == 0, diagnostics()
    assert (mail.mail_from, mail.rcpt_tos) == (t2.address, (OPS,))
    assert headers(mail)["Message-ID"].endswith(f".drop.{mail_id}@{DOMAIN}>")
    assert mail.content.partition(b"\r\n\r\n")[2] == b"via rabbit\r\n"
    assert smtp_server.received == [mail]
