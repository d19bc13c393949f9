"""The maildrop with real unprivileged users: opsrelay-sendmail run as them, the relay ingesting as root.

The tests run as root and act as the users of scripts/ensure-test-users.sh (opsrelay-t1 ..
opsrelay-t4) through ``runuser -u USER -- env -i ...``: each submission is a real
``python -m relay.sendmail`` process of that user, with nothing of root's environment. The
host they run on is a fresh world-traversable folder ``/tmp/opsrelay-md-XXXX`` (pytest's
tmp_path is under a 0700 folder no other user may enter) holding

* ``etc/opsrelay.toml``: the relay's config, root's and mode 0600 (it holds the smarthost's
  password), so the users cannot read it: sendmail then finds the maildrop through
  ``$OPSRELAY_SENDMAIL__MAILDROP`` (where the default ``/var/spool/opsrelay/maildrop`` would need
  nothing) and leaves the mail there;
* ``spool/maildrop`` (1733), ``spool/rejected`` (0700), made by :func:`ensure_layout`;
* ``state/queue.db``: the embedded queue, root's (the relay makes it).

The users' interpreter: the virtualenv's python links into /root (mode 0700 here), which other
users cannot enter, so :func:`user_python` takes the first of the virtualenv's interpreter and
the system's ``python3.11`` that the user can run, with ``PYTHONPATH`` at this checkout. The
submission path imports the standard library only, so no site-packages are needed.

The relay is the real one: :class:`relay.daemon.relay.Relay` in-process (with ``maildrop=``, as
``opsrelay serve`` runs it), or ``opsrelay serve`` as a process where a kill -9 is the point;
mail goes to a real SMTP server (aiosmtpd, STARTTLS, AUTH). Without the users (or not as
root) the tests fail in CI and skip elsewhere, as the RabbitMQ ones do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message as EmailMessage
from pathlib import Path

import pytest

from relay.config.models import load_config
from relay.contract.names import document_queues, outbound_queue
from relay.daemon.relay import Relay
from relay.delivery.smtp import SmtpPool
from relay.engines import open_engine
from relay.maildrop.ingest import STALE_TMP, ensure_layout, for_relay
from tests.integration.faults import cleanup_broker, steady_port, wait_until
from tests.processes import RelayProcess
from tests.smtp_server import ReceivedMail, SmtpServer

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
OPSRELAY = Path(sys.executable).parent / "opsrelay"
TEST_USERS = ("opsrelay-t1", "opsrelay-t2", "opsrelay-t3", "opsrelay-t4")
TRUSTED = "opsrelay-t3"  # in sendmail.trusted_users
DOMAIN = "example.test"  # sendmail.domain: local users are name@example.test
OPS = "ops@example.test"  # [aliases] root
SMTP_FROM = "alerts@example.test"  # smtp.from
HOST = "web1"
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
DROP_ID = re.compile(r"left ([0-9a-f]{16,64}) \(")


def require(ok: bool, message: str) -> None:
    """Fail in CI (make test sets everything up), skip elsewhere."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# -- the users ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path
    gecos: str

    @property
    def address(self) -> str:
        return f"{self.name}@{DOMAIN}"


def _lookup(name: str) -> User | None:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), entry.pw_gecos.split(",")[0])


def run_as(user: User, argv: Sequence[str], *, env: Mapping[str, str] | None = None, data: bytes = b"",
           timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """``argv`` as ``user`` via runuser, with only ``env`` (and PATH, HOME, USER, LOGNAME, LC_ALL)."""
    base = {"PATH": USER_PATH, "HOME": str(user.home), "USER": user.name, "LOGNAME": user.name,
            "LC_ALL": "C.UTF-8"}
    words = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
    return subprocess.run(["runuser", "-u", user.name, "--", "env", "-i", *words, *argv], input=data,
                          capture_output=True, timeout=timeout, cwd="/", check=False)


@functools.cache
def user_src() -> Path:
    """A copy of ``relay/`` the test users can read: the checkout may sit where they cannot
    (CI's clone, a home of mode 0700); removed at exit."""
    import atexit
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="opsrelay-src-", dir="/tmp"))
    shutil.copytree(REPO / "relay", base / "relay", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return base


@functools.cache
def user_python() -> str | None:
    """An interpreter of this Python version that the test users can run, with this checkout importable."""
    user = _lookup(TEST_USERS[0])
    if user is None:
        return None
    wanted = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, *(shutil.which(f"python{wanted}", path=p) for p in ("/usr/bin", "/usr/local/bin"))]
    for candidate in dict.fromkeys(c for c in candidates if c):
        probe = "import sys, relay.sendmail.main; print('%d.%d' % sys.version_info[:2])"
        done = run_as(user, [candidate, "-c", probe], env={"PYTHONPATH": str(user_src())}, timeout=30)
        if done.returncode == 0 and done.stdout.decode().strip() == wanted:
            return candidate
    return None


@pytest.fixture(scope="session")
def users() -> dict[str, User]:
    require(os.geteuid() == 0, "the maildrop tests run as root: they act as other users and make root's folders")
    require(shutil.which("runuser") is not None, "runuser (util-linux) is not installed")
    found = {name: _lookup(name) for name in TEST_USERS}
    missing = [name for name, user in found.items() if user is None]
    require(not missing, f"test users {', '.join(missing)} do not exist (scripts/ensure-test-users.sh creates them)")
    python = user_python()
    require(python is not None, f"no python{sys.version_info.major}.{sys.version_info.minor} that "
            f"{TEST_USERS[0]} can run with {user_src()} importable")
    return {name: user for name, user in found.items() if user is not None}


@pytest.fixture(autouse=True)
def clean_homes() -> Iterator[None]:
    """Whatever a test leaves in a test user's home is removed afterwards."""
    homes = [u.home for u in filter(None, map(_lookup, TEST_USERS)) if u.home.is_dir()]
    before = {home: set(os.listdir(home)) for home in homes}
    yield
    for home, names in before.items():
        for name in set(os.listdir(home)) - names:
            path = home / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


# -- the host -------------------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


class DropHost:
    """A host's root-only config, queue and maildrop under a folder every user can traverse."""

    def __init__(self, root: Path, prefix: str, smtp: Mapping[str, object], *, broker_url: str | None = None,
                 readable_config: bool = False, sendmail: Mapping[str, object] | None = None,
                 backoff: Sequence[str] = ("200ms",), max_attempts: int = 5) -> None:
        self.root, self.prefix = root, prefix
        self.etc = root / "etc"
        self.etc.mkdir(mode=0o755)
        self.spool = root / "spool"
        self.maildrop = self.spool / "maildrop"
        self.rejected = self.spool / "rejected"
        self.wake = self.maildrop / ".wake"
        self.db = root / "state" / "queue.db"
        self.url = broker_url or f"sqlite:///{self.db}"
        self.config = self.etc / "opsrelay.toml"
        smtp_values = {k: v for k, v in smtp.items() if v is not None}
        if readable_config:
            # Everyone may read the config; the password is in a file of root's alone.
            password = self.etc / "smtp-password"
            password.write_text(str(smtp_values.pop("password")) + "\n")
            password.chmod(0o600)
            smtp_values["password_file"] = str(password)
        sections: dict[str, Mapping[str, object]] = {
            # The listener's spool too, so that nothing here falls back to /var/lib/opsrelay.
            "broker": {"url": self.url, "prefix": prefix, "spool": f"sqlite:///{root / 'state' / 'spool.db'}"},
            "smtp": {**smtp_values, "from": SMTP_FROM},
            "aliases": {"root": OPS},
            "retry": {"max_attempts": max_attempts, "backoff": list(backoff)},
            "sendmail": {"domain": DOMAIN, "maildrop": str(self.maildrop), "trusted_users": [TRUSTED],
                         **(sendmail or {})},
        }
        lines = [f"host = {_toml(HOST)}"]
        for name, values in sections.items():
            lines += [f"[{name}]", *(f"{json.dumps(k)} = {_toml(v)}" for k, v in values.items())]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.config.chmod(0o644 if readable_config else 0o600)
        ensure_layout(str(self.maildrop))

    # -- as a user ----------------------------------------------------------------------------

    def user_env(self, *, maildrop_env: bool = True) -> dict[str, str]:
        env = {"PYTHONPATH": str(user_src()), "OPSRELAY_CONFIG": str(self.config)}
        if maildrop_env:
            env["OPSRELAY_SENDMAIL__MAILDROP"] = str(self.maildrop)
        return env

    def submit(self, user: User, *args: str, data: bytes,
               maildrop_env: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``python -m relay.sendmail ARGS`` as ``user``, the message on stdin."""
        python = user_python()
        assert python is not None
        return run_as(user, [python, "-m", "relay.sendmail", *args], env=self.user_env(maildrop_env=maildrop_env),
                      data=data)

    def python_as(self, user: User, code: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        """A snippet of Python as ``user`` (with this checkout importable): sys.argv[1:] are ``args``."""
        python = user_python()
        assert python is not None
        return run_as(user, [python, "-c", code, *args], env={"PYTHONPATH": str(user_src())})

    # -- as root ------------------------------------------------------------------------------

    def drops(self) -> list[str]:
        """What is in the maildrop (root may list it), the relay's .wake socket aside."""
        return sorted(n for n in os.listdir(self.maildrop) if n != ".wake")

    def rejected_names(self) -> dict[str, Path]:
        """Rejected files by their original name (rejected/ holds ``<unix time>-<name>``)."""
        return {p.name.partition("-")[2]: p for p in self.rejected.iterdir()}

    def rows(self) -> Counter[str]:
        """Messages per queue in the embedded queue file, but for the documents a relay keeps there on
        purpose (its heartbeat, the silences' owner)."""
        if not self.db.exists():
            return Counter()
        kept = document_queues(self.prefix)
        conn = sqlite3.connect(self.db)
        try:
            return Counter({queue: n for queue, n in conn.execute(
                "SELECT queue, COUNT(*) FROM messages GROUP BY queue").fetchall() if queue not in kept})
        finally:
            conn.close()

    def ingested(self) -> set[str]:
        """The drop ids the embedded queue file records as queued."""
        conn = sqlite3.connect(self.db)
        try:
            return {r[0] for r in conn.execute("SELECT id FROM maildrop_ingested")}
        finally:
            conn.close()

    def opsrelay(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The ``opsrelay`` console script as root, on this host's config."""
        return subprocess.run([str(OPSRELAY), *args, "--config", str(self.config)], capture_output=True, text=True,
                              env=root_env(), timeout=timeout, check=False)

    def queue_json(self) -> dict[str, object]:
        done = self.opsrelay("queue", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert isinstance(report, dict)
        return report


def root_env(**extra: str) -> dict[str, str]:
    """Root's environment for opsrelay processes: this checkout first, no OPSRELAY_* overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    env.update(PYTHONPATH=str(user_src()), PYTHONUNBUFFERED="1", **extra)
    return env


@contextlib.contextmanager
def host_root() -> Iterator[Path]:
    """A fresh folder in /tmp that every user may traverse (0755), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="opsrelay-md-", dir="/tmp"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def drop_root(users: dict[str, User]) -> Iterator[Path]:
    with host_root() as root:
        yield root


@pytest.fixture
def host(drop_root: Path, prefix: str, smtp_server: SmtpServer) -> DropHost:
    return DropHost(drop_root, prefix, smtp_server.client_settings())


def drop_id(result: subprocess.CompletedProcess[bytes]) -> str:
    """The mail id a ``-v`` submission reports for the file it left in the maildrop."""
    found = DROP_ID.search(result.stderr.decode())
    assert found, result.stderr
    return found.group(1)


def ok(result: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result


def headers(mail: ReceivedMail) -> EmailMessage:
    return message_from_bytes(mail.content.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")


def body(mail: ReceivedMail) -> bytes:
    return mail.content.partition(b"\r\n\r\n")[2]


# -- the relay --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def relay_in_process(host: DropHost) -> AsyncIterator[Relay]:
    """The relay as ``opsrelay serve`` runs it (maildrop=for_relay(source)), until the block ends."""
    config = load_config(host.config, env={})
    maildrop = for_relay(config.source)
    assert maildrop is not None and maildrop.folder == str(host.maildrop)
    engine = open_engine(config.broker.url, confirm_timeout=config.broker.confirm_timeout)
    await engine.connect()
    mailer = SmtpPool(config.smtp)
    relay = Relay(config, engine, mailer, grace=5.0, maildrop=maildrop)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop), name="relay-with-maildrop")
    try:
        await wait_until(lambda: task.done() or host.wake.is_socket(), 15,
                         what="the relay to bind the maildrop's .wake")
        if task.done():
            task.result()
            raise AssertionError("the relay returned before it was stopped")
        yield relay
        if task.done():
            task.result()
            raise AssertionError("the relay returned before it was stopped")
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 20)
        finally:
            await mailer.close()
            await engine.close()
    assert not host.wake.exists(), "the relay left its .wake socket behind"


class ServeProcess(RelayProcess):
    """``opsrelay serve --config X`` as root, as deployed (this checkout first on the path)."""

    def __init__(self, host: DropHost, log: Path) -> None:
        super().__init__(host.config, log, env=root_env())

    async def terminate(self, within: float = 20.0) -> int:  # type: ignore[override]
        code, _ = await super().terminate(within)
        return code


# -- a user without the config or the queue ---------------------------------------------------------


async def test_a_user_who_cannot_read_the_config_sends_through_the_maildrop(
        host: DropHost, users: dict[str, User], smtp_server: SmtpServer) -> None:
    t1 = users["opsrelay-t1"]
    denied = run_as(t1, ["cat", str(host.config)])
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr  # the premise: not theirs to read
    async with relay_in_process(host):
        submitted = time.monotonic()
        result = ok(await asyncio.to_thread(host.submit, t1, "-v", "-i", "root",
                                            data=b"Subject: disk full on web1\n\n/var is 97% full.\n.\nend\n"))
        # -v: the one line says where the mail went; the relay's .wake was poked.
        assert f"in the maildrop {host.maildrop} for the relay; relay woken" in result.stderr.decode()
        mail_id = drop_id(result)
        [mail] = await wait_until_received(smtp_server, 1)
        # The relay's own pass comes every 5 s: the poke made it look at once.
        assert time.monotonic() - submitted < 4.5
        await wait_until(lambda: host.drops() == [] and host.rows().total() == 0, 10,
                         what="the drop to be removed and the mail acked")
    assert mail.tls and mail.auth_user == smtp_server.user
    assert (mail.mail_from, mail.rcpt_tos) == (t1.address, (OPS,))  # root's alias; the user's own address
    head = headers(mail)
    assert head["Subject"] == "disk full on web1"
    assert head["From"] == f"{t1.gecos} <{t1.address}>"  # the GECOS name of the submitting user
    assert head["Message-ID"].endswith(f".drop.{mail_id}@{DOMAIN}>")
    assert head["X-Authentication-Warning"] is None
    assert body(mail) == b"/var is 97% full.\r\n.\r\nend\r\n"  # -i: the lone dot is data
    assert host.rejected_names() == {}
    assert host.ingested() == {mail_id}


async def test_an_untrusted_user_s_f_is_ignored_and_noted_a_trusted_user_s_is_kept(
        host: DropHost, users: dict[str, User], smtp_server: SmtpServer) -> None:
    t2, t3 = users["opsrelay-t2"], users[TRUSTED]
    async with relay_in_process(host):
        for user in (t2, t3):
            ok(await asyncio.to_thread(host.submit, user, "-f", "boss@example.test", "-F", "The Boss", "root",
                                       data=f"Subject: from {user.name}\n\nhello\n".encode()))
        mails = await wait_until_received(smtp_server, 2)
        await wait_until(lambda: host.drops() == [] and host.rows().total() == 0, 10, what="both acked")
    by_subject = {headers(m)["Subject"]: m for m in mails}
    untrusted, trusted = by_subject[f"from {t2.name}"], by_subject[f"from {t3.name}"]
    # sendmail's rule: an untrusted user's -f is not taken, and the mail says so.
    assert (untrusted.mail_from, untrusted.rcpt_tos) == (t2.address, (OPS,))
    assert untrusted.content.startswith(
        f"X-Authentication-Warning: {HOST}: {t2.name} set sender to boss@example.test using -f\r\n".encode())
    assert headers(untrusted)["From"] == f"The Boss <{t2.address}>"  # -F names the generated From
    # A user in sendmail.trusted_users sends as the -f they gave, with no warning.
    assert (trusted.mail_from, trusted.rcpt_tos) == ("boss@example.test", (OPS,))
    assert headers(trusted)["X-Authentication-Warning"] is None
    assert headers(trusted)["From"] == "The Boss <boss@example.test>"


async def test_a_user_who_reads_the_config_but_cannot_write_the_queue_uses_the_config_s_maildrop(
        drop_root: Path, prefix: str, users: dict[str, User], smtp_server: SmtpServer) -> None:
    host = DropHost(drop_root, prefix, smtp_server.client_settings(), readable_config=True)
    t4 = users["opsrelay-t4"]
    async with relay_in_process(host):
        assert stat.S_IMODE(host.db.parent.stat().st_mode) == 0o700  # the queue: root's alone
        # No OPSRELAY_SENDMAIL__MAILDROP: the maildrop comes from the config the user can read.
        result = ok(await asyncio.to_thread(host.submit, t4, "-v", "root", data=b"Subject: readable config\n\nx\n",
                                            maildrop_env=False))
        assert f"in the maildrop {host.maildrop}" in result.stderr.decode()
        [mail] = await wait_until_received(smtp_server, 1)
    assert (t4.home / ".cache" / "opsrelay").is_dir()  # the config was read (and its parse cached) as t4
    assert (mail.mail_from, mail.rcpt_tos) == (t4.address, (OPS,))
    assert headers(mail)["Message-ID"].endswith(f".drop.{drop_id(result)}@{DOMAIN}>")


async def test_with_the_relay_stopped_sendmail_exits_at_once_and_the_mail_waits_for_it(
        host: DropHost, users: dict[str, User], smtp_server: SmtpServer) -> None:
    t1 = users["opsrelay-t1"]
    started = time.monotonic()
    result = ok(await asyncio.to_thread(host.submit, t1, "-v", "root", data=b"Subject: while stopped\n\nlater\n"))
    took = time.monotonic() - started
    assert took < 2.0, f"the submission took {took:.2f}s (runuser and the interpreter included)"
    assert result.stderr.decode().endswith("; no relay is listening right now\n")
    mail_id = drop_id(result)
    assert host.drops() == [mail_id]
    assert (host.maildrop / mail_id).stat().st_uid == t1.uid
    report = host.queue_json()
    maildrop = report["maildrop"]
    assert isinstance(maildrop, dict)
    assert (maildrop["folder"], maildrop["waiting"]) == (str(host.maildrop), 1)
    assert isinstance(maildrop["oldest_seconds"], float) and 0 <= maildrop["oldest_seconds"] < 60
    listing = host.opsrelay("queue")
    assert listing.returncode == 0, listing.stderr
    assert f"{host.maildrop}: 1 mail(s) from local users waiting to be ingested" in listing.stdout
    assert smtp_server.received == []
    async with relay_in_process(host):
        [mail] = await wait_until_received(smtp_server, 1)
        await wait_until(lambda: host.drops() == [] and host.rows().total() == 0, 10, what="the mail acked")
    assert (mail.mail_from, mail.rcpt_tos) == (t1.address, (OPS,))
    assert body(mail) == b"later\r\n"
    after = host.queue_json()["maildrop"]
    assert isinstance(after, dict) and (after["waiting"], after["oldest_seconds"]) == (0, None)


async def test_opsrelay_serve_ingests_one_drop_after_another_and_keeps_running(
        host: DropHost, users: dict[str, User], smtp_server: SmtpServer, tmp_path: Path) -> None:
    # As a host sees it: a user's mail now and then, each ingested, queued and delivered before the next.
    t1 = users["opsrelay-t1"]
    with ServeProcess(host, tmp_path / "relay.log") as relay:
        def ready() -> bool:
            relay.alive()
            return "relay: consuming" in relay.text() and host.wake.is_socket()

        await wait_until(ready, 20, what="the relay to ingest", diagnostics=relay.log)
        for n in range(1, 4):
            ok(await asyncio.to_thread(host.submit, t1, "root", data=f"Subject: mail {n}\n\nx\n".encode()))

            def arrived(count: int = n) -> bool:
                relay.alive()
                return len(smtp_server.received) >= count and host.rows().total() == 0

            await wait_until(arrived, 15, what=f"mail {n} delivered and acked",
                             diagnostics=lambda: f"queue rows {dict(host.rows())}\n{relay.log()}")
        assert await relay.terminate() == 0, relay.log()
    assert [headers(m)["Subject"] for m in smtp_server.received] == ["mail 1", "mail 2", "mail 3"]
    assert "Traceback" not in relay.text(), relay.log()


async def wait_until_received(server: SmtpServer, count: int, within: float = 20.0) -> list[ReceivedMail]:
    await wait_until(lambda: len(server.received) >= count, within, what=f"{count} mail(s) at the SMTP server",
                     diagnostics=lambda: f"received {len(server.received)}")
    received = server.received
    assert len(received) == count, f"{len(received)} mails arrived, expected {count}"
    return received


# -- kill -9 while ingesting --------------------------------------------------------------------------


async def test_kill_9_during_the_ingest_of_200_drops_from_4_users_then_each_is_delivered_once(
        drop_root: Path, prefix: str, users: dict[str, User], tmp_path: Path) -> None:
    # While the first relay runs, the smarthost's port takes connections and never greets (60 s
    # timeout): each delivery is in flight, unacked, when the kill comes; none ends (a retry is
    # queued before its original is acked, a window of the relay's own, tested in
    # test_relay_process). So a mail delivered twice could only be the ingest's doing.
    port = steady_port()
    server = SmtpServer(tmp_path / "smtp", port=port)
    host = DropHost(drop_root, prefix, server.client_settings(timeout=60.0))
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", port))
    silent.listen(64)
    senders = [users[name] for name in TEST_USERS]
    total = 200

    def submit(n: int) -> tuple[str, str]:
        user = senders[n % len(senders)]
        text = f"Subject: drop {n}\nX-Bench-Id: {n:04d}\n\nmail {n} from {user.name}\n".encode()
        return user.name, drop_id(ok(host.submit(user, "-v", "root", data=text)))

    with ThreadPoolExecutor(8) as pool:
        submitted = list(pool.map(submit, range(total)))
    ids = {mail_id: name for name, mail_id in submitted}
    assert len(ids) == total and set(host.drops()) == set(ids)
    owners = Counter(users[name].uid for name in ids.values())
    assert sorted(owners.values()) == [50] * 4
    assert all((host.maildrop / i).stat().st_uid == users[n].uid for i, n in ids.items())

    try:
        with ServeProcess(host, tmp_path / "relay1.log") as first:
            def midway() -> bool:
                first.alive()
                return len(host.drops()) <= total - 40

            await wait_until(midway, 30, what="the relay to ingest 40 drops", diagnostics=first.log,
                             interval=0.002)
            first.process.kill()
            await asyncio.to_thread(first.process.wait, 10)
            assert first.process.returncode == -signal.SIGKILL
    finally:
        silent.close()
    # The premise: no delivery attempt of the first relay came to an end.
    assert " delivered: " not in first.text() and " failed for now " not in first.text(), first.log()
    left = set(host.drops())
    print(f"\nkill -9 with {len(left)} of {total} drops not yet ingested")
    assert 0 < len(left) < total, "the kill came after the ingest: it tested nothing"
    # Nothing lost: each drop is still in the maildrop or recorded in the queue file (or both:
    # killed between its commit and its unlink).
    queued = host.ingested()
    assert left | queued == set(ids) and queued <= set(ids)
    server.start()
    try:
        with ServeProcess(host, tmp_path / "relay2.log") as second:
            def settled() -> bool:
                second.alive()
                return len(server.received) >= total and host.drops() == [] and host.rows().total() == 0

            await wait_until(settled, 60, what=f"{total} mails delivered, the maildrop and the queue empty",
                             diagnostics=lambda: f"received {len(server.received)}, drops {len(host.drops())}, "
                                                 f"rows {dict(host.rows())}\n{second.log()}", interval=0.05)
            assert await second.terminate() == 0, second.log()
        received = server.received
    finally:
        server.stop()
    # The queue is empty and nobody ingests any more: these are all the mails there will be.
    copies = Counter(str(headers(m)["Message-ID"]) for m in received)
    bench_ids = Counter(str(headers(m)["X-Bench-Id"]) for m in received)
    assert len(received) == total, f"{len(received) - total} duplicate(s): {[k for k, v in copies.items() if v > 1]}"
    assert set(bench_ids) == {f"{n:04d}" for n in range(total)} and set(bench_ids.values()) == {1}
    assert {m.split(".drop.")[1].split("@")[0] for m in copies} == set(ids)
    for mail in received:
        mail_id = str(headers(mail)["Message-ID"]).split(".drop.")[1].split("@")[0]
        sender = users[ids[mail_id]]
        # A trusted user without -f sends as smtp.from, as root does; the others as themselves.
        assert (mail.mail_from, mail.rcpt_tos) == (SMTP_FROM if sender.name == TRUSTED else sender.address, (OPS,))
    assert host.rejected_names() == {}
    assert not (host.rows().get(f"{prefix}.dead") or 0)


# -- another user's attacks ---------------------------------------------------------------------------

ATTACK = r"""
import errno, json, os, sys
from relay.contract.maildrop import Drop, encode_drop
md, victim_drop, victim_draft, victim_uid, names = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
out = {}
def attempt(what, action):
    try:
        action()
        out[what] = "done"
    except OSError as exc:
        out[what] = errno.errorcode.get(exc.errno, str(exc.errno))
def drop(uid, subject, size=0):
    pad = b"x" * size
    return encode_drop(Drop(uid=uid, recipients=["root"], from_headers=False, sender=None, full_name=None,
                            submitted=0.0, message=b"Subject: " + subject.encode() + b"\n\n" + pad + b"\n"))
def write(name, data):
    fd = os.open(os.path.join(md, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
shadow, draft, hardlink, as_root, as_victim, fifo, folder, big, badname = names
attempt("symlink to /etc/shadow", lambda: os.symlink("/etc/shadow", os.path.join(md, shadow)))
attempt("symlink to the victim's draft", lambda: os.symlink(victim_draft, os.path.join(md, draft)))
attempt("hard link to the victim's drop", lambda: os.link(os.path.join(md, victim_drop), os.path.join(md, hardlink)))
attempt("a drop saying uid 0", lambda: write(as_root, drop(0, "as root")))
attempt("a drop saying the victim's uid", lambda: write(as_victim, drop(victim_uid, "as the victim")))
attempt("a FIFO", lambda: os.mkfifo(os.path.join(md, fifo), 0o600))
attempt("a folder", lambda: os.mkdir(os.path.join(md, folder), 0o700))
attempt("a drop over max_size", lambda: write(big, drop(os.getuid(), "too big", 300_000)))
attempt("a file not named as a drop", lambda: write(badname, drop(os.getuid(), "bad name")))
attempt("list the maildrop", lambda: os.listdir(md))
attempt("read the victim's drop", lambda: open(os.path.join(md, victim_drop), "rb").close())
attempt("remove the victim's drop", lambda: os.unlink(os.path.join(md, victim_drop)))
attempt("rename over the victim's drop", lambda: os.rename(os.path.join(md, as_root), os.path.join(md, victim_drop)))
print(json.dumps(out))
"""

DRAFT = r"""
import os, sys
from relay.contract.maildrop import Drop, encode_drop
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, encode_drop(Drop(uid=os.getuid(), recipients=["root"], from_headers=False, sender=None, full_name=None,
                              submitted=0.0, message=b"Subject: the victim's private draft\n\nsecret\n")))
os.close(fd)
"""


def shadow_state() -> tuple[str, os.stat_result]:
    path = Path("/etc/shadow")
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.lstat()


def protected_hardlinks() -> bool:
    return Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"


async def test_another_user_s_attacks_are_refused_logged_and_nothing_of_theirs_or_root_s_is_mailed(
        drop_root: Path, prefix: str, users: dict[str, User], smtp_server: SmtpServer,
        caplog: pytest.LogCaptureFixture) -> None:
    host = DropHost(drop_root, prefix, smtp_server.client_settings(), sendmail={"max_size": 100_000})
    victim, attacker = users["opsrelay-t1"], users["opsrelay-t2"]
    shadow_before = shadow_state()
    # The relay is stopped: the victim's honest mail waits, the attacker's files are placed beside it.
    victim_drop = drop_id(ok(host.submit(victim, "-v", "root", data=b"Subject: the victim's honest mail\n\nhi\n")))
    draft = victim.home / "draft.drop"
    ok(host.python_as(victim, DRAFT, str(draft)))
    draft_before = draft.read_bytes()
    honest = drop_id(ok(host.submit(attacker, "-v", "root", data=b"Subject: the attacker's own mail\n\nok\n")))
    names = [f"{n:x}" * 32 for n in range(1, 9)] + ["not-a-drop-name.txt"]
    shadow, draft_link, hardlink, as_root, as_victim, fifo, folder, big, badname = names
    result = ok(host.python_as(attacker, ATTACK, str(host.maildrop), victim_drop, str(draft), str(victim.uid),
                               *names))
    attempts = json.loads(result.stdout)
    protected = protected_hardlinks()
    assert attempts == {
        "symlink to /etc/shadow": "done",  # anyone may create a name in a 1733 folder...
        "symlink to the victim's draft": "done",
        # ...but fs.protected_hardlinks=1 stops a link to a file one may neither read nor write.
        "hard link to the victim's drop": "EPERM" if protected else "done",
        "a drop saying uid 0": "done",
        "a drop saying the victim's uid": "done",
        "a FIFO": "done",
        "a folder": "done",
        "a drop over max_size": "done",
        "a file not named as a drop": "done",
        "list the maildrop": "EACCES",  # 1733: no read permission for others
        "read the victim's drop": "EACCES",  # 0600
        "remove the victim's drop": "EPERM",  # the sticky bit
        "rename over the victim's drop": "EPERM",
    }
    if protected:
        # The kernel refused the attacker, so the ingest's nlink check is tested with a link root makes
        # (what a user could do on a host with fs.protected_hardlinks=0).
        os.link(host.maildrop / victim_drop, host.maildrop / hardlink)
    assert (host.maildrop / victim_drop).stat().st_nlink == 2
    attacks = {shadow, draft_link, hardlink, as_root, as_victim, fifo, folder, big, badname}
    assert set(host.drops()) == attacks | {victim_drop, honest}

    caplog.set_level(logging.INFO, logger="opsrelay.maildrop")
    async with relay_in_process(host):
        [mail] = await wait_until_received(smtp_server, 1)
        await wait_until(lambda: host.drops() == [] and host.rows().total() == 0, 10,
                         what="every file to be ingested or refused, and the queue empty",
                         diagnostics=lambda: f"left: {host.drops()}, rows {dict(host.rows())}")
    # Only the attacker's own mail, as themselves; nothing of the victim's, of root's or of /etc/shadow.
    assert (mail.mail_from, mail.rcpt_tos) == (attacker.address, (OPS,))
    assert headers(mail)["Subject"] == "the attacker's own mail"
    assert host.ingested() == {honest}
    assert smtp_server.received == [mail]

    rejected = host.rejected_names()
    # The victim's drop goes too: with two names for one file there is no telling which is the original.
    assert set(rejected) == attacks | {victim_drop}
    assert os.readlink(rejected[shadow]) == "/etc/shadow" and os.readlink(rejected[draft_link]) == str(draft)
    assert stat.S_ISFIFO(os.lstat(rejected[fifo]).st_mode) and rejected[folder].is_dir()
    assert rejected[victim_drop].stat().st_ino == rejected[hardlink].stat().st_ino
    assert shadow_state() == shadow_before
    assert draft.read_bytes() == draft_before and not draft.is_symlink()

    refusals = {r.getMessage() for r in caplog.records if r.name == "opsrelay.maildrop" and r.levelno == logging.ERROR}
    why = {
        shadow: "a symlink?", draft_link: "a symlink?", hardlink: "has 2 links: a hard link to someone's file",
        victim_drop: "has 2 links", as_root: f"says uid 0 but belongs to uid {attacker.uid}",
        as_victim: f"says uid {victim.uid} but belongs to uid {attacker.uid}", fifo: "not a regular file",
        folder: "not a regular file", big: "bytes, over sendmail.max_size", badname: "not a drop's name",
    }
    for name, reason in why.items():
        lines = [line for line in refusals if f"maildrop: {name!r} refused, moved to {host.rejected}: " in line]
        assert len(lines) == 1 and reason in lines[0], (name, reason, sorted(refusals))


# -- a full disk, stale temporary files -----------------------------------------------------------------


@pytest.fixture
def tiny_maildrop(host: DropHost) -> Iterator[DropHost]:
    """The maildrop on a 64 KiB tmpfs (root's, 1733), unmounted afterwards."""
    mount = shutil.which("mount")
    done = subprocess.run([mount or "mount", "-t", "tmpfs", "-o", "size=64k,mode=1733", "tmpfs", str(host.maildrop)],
                          capture_output=True, text=True, check=False) if mount else None
    require(done is not None and done.returncode == 0,
            f"cannot mount a tmpfs as root here ({done.stderr.strip() if done else 'no mount command'})")
    try:
        yield host
    finally:
        umount = subprocess.run(["umount", str(host.maildrop)], capture_output=True, text=True, check=False)
        if umount.returncode != 0:
            subprocess.run(["umount", "-l", str(host.maildrop)], check=True)


def test_a_full_disk_exits_75_and_leaves_no_partial_file(tiny_maildrop: DropHost, users: dict[str, User]) -> None:
    host, t1 = tiny_maildrop, users["opsrelay-t1"]
    assert os.statvfs(host.maildrop).f_blocks * os.statvfs(host.maildrop).f_frsize == 64 * 1024
    big = b"Subject: big report\n\n" + (b"y" * 99 + b"\n") * 2000  # 200 KB on a 64 KiB filesystem
    result = host.submit(t1, "-i", "root", data=big)
    assert result.returncode == 75, result.stderr
    text = result.stderr.decode()
    assert text.count("\n") == 1 and "cannot leave the mail in the maildrop" in text, text
    assert "No space left on device" in text and "nothing was queued" in text
    assert os.listdir(host.maildrop) == []  # no .tmp, no partial drop
    # The maildrop itself works: a small mail fits.
    small = drop_id(ok(host.submit(t1, "-v", "root", data=b"Subject: small\n\nfits\n")))
    assert os.listdir(host.maildrop) == [small]


STALE = r"""
import os, sys
for path in sys.argv[1:]:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
"""


def test_a_stale_tmp_is_removed_by_the_next_ingest_and_a_fresh_one_left_alone(
        host: DropHost, users: dict[str, User]) -> None:
    t1 = users["opsrelay-t1"]
    stale, young, fresh = (f"{c * 32}.tmp" for c in "abc")
    ok(host.python_as(t1, STALE, *(str(host.maildrop / n) for n in (stale, young, fresh))))  # writers that died
    now = time.time()
    os.utime(host.maildrop / stale, (now - STALE_TMP - 3600, now - STALE_TMP - 3600))  # 25 hours old
    os.utime(host.maildrop / young, (now - STALE_TMP + 3600, now - STALE_TMP + 3600))  # 23 hours old
    done = host.opsrelay("maildrop")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"queued 0 mail(s) from {host.maildrop}\n"
    assert f"maildrop: removed {stale}, abandoned mid-write over a day ago" in done.stderr
    assert host.drops() == sorted([young, fresh])
    assert all((host.maildrop / n).stat().st_uid == t1.uid for n in (young, fresh))
    assert host.rejected_names() == {}


# -- RabbitMQ -----------------------------------------------------------------------------------------------


@pytest.fixture
async def amqp_host(drop_root: Path, prefix: str, amqp_url: str, smtp_server: SmtpServer) -> AsyncIterator[DropHost]:
    host = DropHost(drop_root, prefix, smtp_server.client_settings(), broker_url=amqp_url)
    yield host
    await cleanup_broker(load_config(host.config, env={}))


async def outbound_depth(host: DropHost) -> int:
    async with open_engine(host.url) as engine:
        return await engine.depth(outbound_queue(host.prefix))


async def outbound_empty(host: DropHost) -> bool:
    return await outbound_depth(host) == 0


@pytest.mark.rabbitmq
async def test_opsrelay_maildrop_queues_on_a_broker_no_relay_has_declared_yet(
        amqp_host: DropHost, users: dict[str, User]) -> None:
    host = amqp_host
    mail_id = drop_id(ok(host.submit(users["opsrelay-t1"], "-v", "root", data=b"Subject: first\n\nx\n")))
    # A host that runs no relay (the opsrelay-maildrop.path unit), before any relay declared outbound:
    # sendmail on RabbitMQ declares the outbound layout itself (relay.ops.submit); the ingest must too.
    done = host.opsrelay("maildrop")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"queued 1 mail(s) from {host.maildrop}\n"
    assert host.drops() == [] and await outbound_depth(host) == 1
    assert mail_id in done.stderr


@pytest.mark.rabbitmq
async def test_on_rabbitmq_a_drop_ingested_twice_is_queued_once(
        amqp_host: DropHost, users: dict[str, User], smtp_server: SmtpServer) -> None:
    host, t1 = amqp_host, users["opsrelay-t1"]
    async with relay_in_process(host):  # a relay ran here before: the broker has its queues
        pass
    mail_id = drop_id(ok(host.submit(t1, "-v", "-i", "root", data=b"Subject: once only\n\non rabbit\n")))
    path = host.maildrop / mail_id
    data, before = path.read_bytes(), path.stat()
    first = host.opsrelay("maildrop")
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"queued 1 mail(s) from {host.maildrop}\n"
    assert f"maildrop: {mail_id} from uid {t1.uid} queued as mail to 1 recipient(s)" in first.stderr
    assert host.drops() == [] and (host.spool / "ingested.db").is_file()
    assert await outbound_depth(host) == 1
    # A crash after the broker's confirm and before the unlink leaves the same file behind.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    os.chown(path, before.st_uid, before.st_gid)
    second = host.opsrelay("maildrop")
    assert second.returncode == 0, second.stderr
    assert f"maildrop: {mail_id} was queued before; its file is removed now" in second.stderr
    assert host.drops() == [] and await outbound_depth(host) == 1  # nothing was published again
    async with relay_in_process(host):
        [mail] = await wait_until_received(smtp_server, 1)
        await wait_until(lambda: outbound_empty(host), 10, what="the mail to be acked", interval=0.2)
    assert (mail.mail_from, mail.rcpt_tos) == (t1.address, (OPS,)) and body(mail) == b"on rabbit\r\n"
    assert headers(mail)["Message-ID"].endswith(f".drop.{mail_id}@{DOMAIN}>")
    assert smtp_server.received == [mail]
