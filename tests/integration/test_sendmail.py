"""opsrelay-sendmail as a real process on a tmp SQLite queue, then the relay delivering what it queued.

Each test runs the installed console script as a subprocess with ``$OPSRELAY_CONFIG`` pointing at
its own config (unique prefix, queue file in tmp_path), reads the queue file directly, and for
delivery runs :class:`relay.daemon.Relay` in-process against ``tests.smtp_server.SmtpServer``
(STARTTLS + AUTH, trustme certificate).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from relay.config import fast as fastconfig
from relay.config.models import load_config
from relay.contract.mail import OutboundMail, from_message
from relay.contract.message import Message
from relay.contract.names import document_queues
from relay.daemon.relay import Relay
from relay.delivery.smtp import SmtpPool
from relay.engines import sqlite_rows
from relay.engines.sqlite import SqliteEngine
from tests.brokers import delete_topology
from tests.smtp_server import SmtpServer
from tests.waiting import wait_until

BIN = Path(sysconfig.get_path("scripts"))
SENDMAIL = BIN / "opsrelay-sendmail"

pytestmark = pytest.mark.timeout(60)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


class Host:
    """One host's opsrelay.toml and queue file, and the console script run against them."""

    def __init__(self, root: Path, prefix: str, smtp: Mapping[str, object], *,
                 broker_url: str | None = None, sendmail: Mapping[str, object] | None = None,
                 max_attempts: int = 5) -> None:
        self.root, self.prefix = root, prefix
        self.db = root / "state" / "queue.db"
        self.url = broker_url or f"sqlite:///{self.db}"
        self.config = root / "opsrelay.toml"
        sections: dict[str, Mapping[str, object]] = {
            "broker": {"url": self.url, "prefix": prefix},
            "smtp": {**{k: v for k, v in smtp.items() if v is not None}, "from": "alerts@example.test"},
            "aliases": {"root": "ops@example.test"},
            "retry": {"max_attempts": max_attempts, "backoff": ["100ms"]},
            "sendmail": sendmail or {},
        }
        lines = ['host = "web1"']
        for name, values in sections.items():
            lines += [f"[{name}]", *(f"{json.dumps(k)} = {_toml(v)}" for k, v in values.items())]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def outbound(self) -> str:
        return f"{self.prefix}.outbound"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
        env.update(OPSRELAY_CONFIG=str(self.config), LC_ALL="C.UTF-8", XDG_CACHE_HOME=str(self.root / "cache"),
                   **extra)
        return env

    def submit(self, *args: str, data: bytes, program: Sequence[str] = (str(SENDMAIL),),
               env: Mapping[str, str] | None = None,
               preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*program, *args], input=data, capture_output=True, env=dict(env or self.env()),
                              timeout=30, check=False, preexec_fn=preexec)

    def rows(self, queue: str | None = None) -> list[tuple[object, ...]]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(self.db)
        try:
            sql = "SELECT queue, body, message_id, content_type, headers, routing_key, expires_at FROM messages"
            if queue is None:
                # But for the documents a running relay keeps there on purpose (heartbeat, silences' owner).
                return conn.execute(sql + " WHERE queue NOT IN (?, ?) ORDER BY id",
                                    document_queues(self.prefix)).fetchall()
            return conn.execute(sql + " WHERE queue = ? ORDER BY id", (queue,)).fetchall()
        finally:
            conn.close()

    def mails(self, queue: str | None = None) -> list[OutboundMail]:
        return [from_message(Message(bytes(r[1]), str(r[2]), str(r[3]), json.loads(str(r[4]))))  # type: ignore[arg-type]
                for r in self.rows(queue or self.outbound)]


@pytest.fixture
def host(tmp_path: Path, prefix: str, smtp_server: SmtpServer) -> Host:
    return Host(tmp_path, prefix, smtp_server.client_settings())


def one_line_error(result: subprocess.CompletedProcess[bytes], prog: str = "opsrelay-sendmail") -> str:
    text = result.stderr.decode()
    assert text.count("\n") == 1 and text.startswith(f"{prog}: "), text
    return text


@asynccontextmanager
async def running_relay(host: Host, *, wake_interval: float = 30.0) -> AsyncIterator[Relay]:
    """The relay on the host's queue; its fallback timer is long, so only a poke wakes it quickly."""
    config = load_config(host.config, env={})
    engine = SqliteEngine(config.broker.url, wake_interval=wake_interval)
    await engine.connect()
    mailer = SmtpPool(config.smtp)
    relay = Relay(config, engine, mailer, grace=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    run_dir = Path(await asyncio.to_thread(os.path.realpath, host.db) + ".run")
    # Consuming = its wake socket is bound (a submission before that is found by the first take).
    await wait_until(lambda: run_dir.is_dir() and any(p.suffix == ".sock" for p in run_dir.iterdir()), 10,
                     what="the relay to listen for wake-ups")
    try:
        yield relay
    finally:
        stop.set()
        await task
        await mailer.close()
        await engine.close()


# 998 bytes: the longest line RFC 5321 §4.5.3.1.6 lets a server take (aiosmtpd enforces it).
BODY = ("Grüße aus dem Rechenzentrum\n".encode() + b"\xff\xfe not UTF-8 at all\r\n" + b"L" * 998 + b"\n"
        + b".\n..two dots stay two dots\n")
MESSAGE = (b"From: Build Bot <bot@example.test>\nTo: root, dev@example.test\n"
           b'Cc: "Ops, Night" <night@example.test>\nBcc: audit@example.test\n'
           b"Subject: nightly =?utf-8?q?r=C3=A9sum=C3=A9?=\n\n" + BODY)
RECIPIENTS = ("ops@example.test", "dev@example.test", "night@example.test", "audit@example.test")


def test_a_submission_lands_whole_in_outbound(host: Host) -> None:
    result = host.submit("-t", "-i", "-f", "bot@example.test", data=MESSAGE)
    assert (result.returncode, result.stderr) == (0, b"")

    [mail] = host.mails()
    assert mail.sender == "bot@example.test" and mail.recipients == RECIPIENTS
    assert (mail.origin, mail.attempts) == ("sendmail", 0)
    head, _, body = mail.raw.partition(b"\r\n\r\n")
    assert body == BODY.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # 8-bit and long lines byte for byte
    fields = head.split(b"\r\n")
    assert fields[:4] == [b"From: Build Bot <bot@example.test>", b"To: root, dev@example.test",
                          b'Cc: "Ops, Night" <night@example.test>', b"Subject: nightly =?utf-8?q?r=C3=A9sum=C3=A9?="]
    assert fields[4].startswith(b"Date: ") and fields[5].startswith(b"Message-ID: <")
    assert fields[5].endswith(b"@example.test>") and len(fields) == 6  # and no Bcc


def test_a_new_queue_file_gets_the_engine_s_own_schema(host: Host, tmp_path: Path) -> None:
    assert host.submit("root", data=b"Subject: first\n\nx\n").returncode == 0
    reference = tmp_path / "reference.db"
    sqlite_rows.connect(str(reference), 5.0).close()

    def schema(path: Path) -> tuple[object, ...]:
        conn = sqlite3.connect(path)
        try:
            return (conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall(),
                    conn.execute("PRAGMA user_version").fetchone(), conn.execute("PRAGMA journal_mode").fetchone())
        finally:
            conn.close()

    assert schema(host.db) == schema(reference)
    assert oct(host.db.stat().st_mode & 0o777) == "0o600" and oct(host.db.parent.stat().st_mode & 0o777) == "0o700"
    assert [m.recipients for m in host.mails()] == [("ops@example.test",)]


@pytest.mark.parametrize(("args", "data", "code", "words"), [
    (["root"], b"", 65, "the message is empty"),
    (["root"], b"\n \n", 65, "the message is empty"),
    (["root"], b".\nonly after the dot\n", 65, "the message is empty"),
    ([], b"Subject: x\n\nbody\n", 64, "no recipients: name them on the command line"),
    (["-t"], b"Subject: x\n\nbody\n", 65, "no recipients: the message has no To, Cc or Bcc"),
    (["root"], b"Subject: x\nnot a header\n\nbody\n", 65, "line 2 of the header is not a header field"),
    (["-t"], b"To: two words@example.test\n\nbody\n", 65, "To: 'two words@example.test' is not a mail address"),
    (["root", "bad address@x"], b"Subject: x\n\nb\n", 64, "recipient 'bad address@x' is not a mail address"),
    (["-f", "not an address", "root"], b"Subject: x\n\nb\n", 64, "sender 'not an address' is not a mail address"),
    (["-bs"], b"", 64, "-bs (SMTP on standard input) is not supported"),
    (["-q"], b"", 64, "-q (running the queue) is not supported"),
])
def test_bad_input_is_refused_with_sysexits_and_nothing_is_queued(
        host: Host, args: list[str], data: bytes, code: int, words: str) -> None:
    result = host.submit(*args, data=data)
    assert result.returncode == code
    assert words in one_line_error(result)
    assert host.rows() == []


def test_26_megabytes_are_refused(host: Host) -> None:
    data = b"Subject: big\n\n" + (b"x" * 999 + b"\n") * 26_000
    result = host.submit("-i", "root", data=data)
    assert result.returncode == 65
    assert "larger than sendmail.max_size (25000000 bytes)" in one_line_error(result)
    assert host.rows() == []


def test_a_bad_config_exits_78_naming_the_file_and_key(host: Host) -> None:
    host.config.write_text(host.config.read_text() + '\n[sendmail.extra]\n')
    result = host.submit("root", data=b"Subject: x\n\nb\n")
    assert result.returncode == 78
    assert f"config error: {host.config}, sendmail.extra: unknown key" in one_line_error(result)
    host.config.write_text('[broker]\nurl = "sqlite://relative/queue.db"\n')
    result = host.submit("root", data=b"Subject: x\n\nb\n")
    assert result.returncode == 78
    assert "broker.url: a sqlite URL is sqlite:/// then an absolute path" in one_line_error(result)


def _without_dac_override() -> Sequence[str]:
    """As root, drop the capabilities that ignore file modes, so a read-only folder is read-only to us."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run as root without CAP_DAC_OVERRIDE"
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search", "--")


def test_a_read_only_queue_folder_exits_75_with_nothing_half_queued(host: Host) -> None:
    assert host.submit("root", data=b"Subject: before\n\nx\n").returncode == 0
    folder = host.db.parent
    folder.chmod(0o500)
    try:
        result = host.submit("root", data=b"Subject: refused\n\nx\n", program=(*_without_dac_override(), str(SENDMAIL)))
    finally:
        folder.chmod(0o700)
    assert result.returncode == 75
    assert "cannot queue the mail (" in one_line_error(result) and "nothing was queued" in result.stderr.decode()
    assert [m.raw.split(b"\r\n")[0] for m in host.mails()] == [b"Subject: before"]


def test_a_full_disk_exits_75_and_leaves_the_queue_intact(host: Host) -> None:
    assert host.submit("root", data=b"Subject: before\n\nx\n").returncode == 0
    limit = 64 * 1024

    def small_files() -> None:  # any write past 64 KiB fails with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    big = b"Subject: big\n\n" + b"y" * 2_000_000 + b"\n"
    result = host.submit("-i", "root", data=big, preexec=small_files)
    assert result.returncode == 75
    assert "cannot queue the mail" in one_line_error(result)
    conn = sqlite3.connect(host.db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    assert [m.raw.split(b"\r\n")[0] for m in host.mails()] == [b"Subject: before"]
    # And the queue still takes mail once there is room.
    assert host.submit("root", data=b"Subject: after\n\nx\n").returncode == 0
    assert len(host.mails()) == 2


async def test_the_relay_delivers_it_over_starttls_and_auth(host: Host, smtp_server: SmtpServer) -> None:
    async with running_relay(host):
        started = time.monotonic()
        result = await asyncio.to_thread(host.submit, "-t", "-i", "-f", "bot@example.test", data=MESSAGE)
        assert (result.returncode, result.stderr) == (0, b"")
        [mail] = await wait_until(lambda: smtp_server.received, 10, what="the mail at the SMTP server")
        # The relay's own timer is 30 s: the submission's poke woke it.
        assert time.monotonic() - started < 5
        await wait_until(lambda: host.rows() == [], 5, what="the outbound row to be acked")
    assert mail.tls and mail.auth_user == smtp_server.user
    assert mail.mail_from == "bot@example.test"
    assert sorted(mail.rcpt_tos) == sorted(RECIPIENTS)
    head, _, body = mail.content.partition(b"\r\n\r\n")
    assert body == BODY.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert b"Bcc" not in head and b"audit" not in head
    assert b"\r\nTo: root, dev@example.test\r\n" in head and b"\r\nDate: " in head and b"\r\nMessage-ID: <" in head


async def test_smtp_down_at_submission_the_mail_arrives_once_it_is_back(tmp_path: Path, prefix: str) -> None:
    server = SmtpServer(tmp_path / "smtp")  # not started yet: connections are refused
    host = Host(tmp_path, prefix, server.client_settings(), max_attempts=1000)
    async with running_relay(host):
        result = await asyncio.to_thread(host.submit, "root", data=b"Subject: while down\n\nstill here\n")
        assert (result.returncode, result.stderr) == (0, b"")
        # The relay tried, failed and parked it in its retry queue (backoff 100ms).
        await wait_until(lambda: host.rows(f"{prefix}.retry.100ms") or server.data_attempts, 10,
                         what="a failed attempt")
        await asyncio.sleep(0.5)  # the server stays down a while: more attempts fail meanwhile
        assert server.received == []
        server.start()
        try:
            [mail] = await wait_until(lambda: server.received, 15, what="the mail after the server came back")
        finally:
            server.stop()
    assert mail.rcpt_tos == ("ops@example.test",) and mail.mail_from == "alerts@example.test"
    assert mail.content.endswith(b"\r\n\r\nstill here\r\n")


async def test_direct_mode_delivers_before_exiting(tmp_path: Path, prefix: str, smtp_server: SmtpServer) -> None:
    host = Host(tmp_path, prefix, smtp_server.client_settings(), sendmail={"mode": "direct"})
    result = await asyncio.to_thread(host.submit, "-v", "root", data=b"Subject: direct\n\nnow\n")
    assert result.returncode == 0, result.stderr
    assert "delivered" in result.stderr.decode()
    [mail] = smtp_server.received  # already there when the command returned
    assert mail.tls and mail.rcpt_tos == ("ops@example.test",)
    assert host.rows() == []


async def test_direct_mode_queues_on_a_temporary_failure(tmp_path: Path, prefix: str) -> None:
    server = SmtpServer(tmp_path / "smtp")
    host = Host(tmp_path, prefix, server.client_settings(), sendmail={"mode": "direct"})
    result = await asyncio.to_thread(host.submit, "root", data=b"Subject: direct\n\nlater\n")
    assert result.returncode == 0
    assert "not delivered to ops@example.test yet" in one_line_error(result)
    [queued] = host.mails(f"{prefix}.retry.100ms")
    assert queued.attempts == 1 and queued.recipients == ("ops@example.test",)
    server.start()
    try:
        async with running_relay(host):
            [mail] = await wait_until(lambda: server.received, 15, what="the retried mail")
    finally:
        server.stop()
    assert mail.content.endswith(b"\r\n\r\nlater\r\n")


def test_symlinks_named_sendmail_and_mailq(host: Host, tmp_path: Path) -> None:
    links = tmp_path / "bin"
    links.mkdir()
    (links / "sendmail").symlink_to(SENDMAIL)
    (links / "mailq").symlink_to(SENDMAIL)
    empty = host.submit(data=b"", program=(str(links / "mailq"),))
    assert (empty.returncode, empty.stdout) == (0, b"Mail queue is empty\n")
    sent = host.submit("-oi", "root", data=b"Subject: via symlink\n\nx\n", program=(str(links / "sendmail"),))
    assert sent.returncode == 0
    refused = host.submit("-bd", data=b"", program=(str(links / "sendmail"),))
    assert refused.returncode == 64 and refused.stderr.startswith(b"sendmail: -bd")
    listing = host.submit(data=b"", program=(str(links / "mailq"),)).stdout.decode()
    [mail] = host.mails()
    assert f"{mail.message_id}  {len(mail.raw)} bytes  <alerts@example.test>  waiting\n" in listing
    assert "        -> ops@example.test\n" in listing and "1 mail(s) waiting in" in listing
    assert host.submit("-bp", data=b"").stdout.decode() == listing


def test_the_queue_path_imports_only_what_it_needs(host: Host) -> None:
    # The first submission makes the queue file (through the engine's code) and caches the parsed config.
    assert host.submit("root", data=b"Subject: makes the queue file\n\nb\n").returncode == 0
    probe = ("import sys\nfrom relay.sendmail.main import main\ncode = main(['sendmail', 'root'])\n"
             "print(code, ' '.join(sorted(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-S", "-c", probe], input=b"Subject: x\n\nb\n", capture_output=True,
                            env=host.env(PYTHONPATH=str(Path(__file__).parents[2])), timeout=30, check=True)
    code, modules = result.stdout.decode().split(" ", 1)
    assert code == "0", result.stderr
    loaded = set(modules.split())
    # json (and the re and enum it brings) is the envelope's format; what is heavy and not needed is not loaded.
    heavy = {"pydantic", "typer", "aio_pika", "aiosmtplib", "jinja2", "email", "asyncio", "relay.config.models",
             "relay.engines.base", "relay.engines.sqlite_store", "relay.engines.amqp", "relay.contract.mail",
             "dataclasses", "typing", "uuid", "tomllib", "sqlite3", "socket", "datetime"}
    assert loaded & heavy == set()
    assert len(host.mails()) == 2


def test_the_parsed_config_is_cached_per_user_and_never_stale(host: Host) -> None:
    cache = host.root / "cache" / "opsrelay"
    assert host.submit("root", data=b"Subject: 1\n\nb\n").returncode == 0
    [cached] = cache.iterdir()
    assert oct(cache.stat().st_mode & 0o777) == "0o700" and oct(cached.stat().st_mode & 0o777) == "0o600"
    # A changed file is read again: the alias now points elsewhere.
    host.config.write_text(host.config.read_text().replace("ops@example.test", "night@example.test"))
    assert host.submit("root", data=b"Subject: 2\n\nb\n").returncode == 0
    # A cache someone else could have written is not trusted.
    cache.chmod(0o777)
    cached.write_bytes(b"garbage")
    assert host.submit("root", data=b"Subject: 3\n\nb\n").returncode == 0
    cache.chmod(0o700)
    assert host.submit("root", data=b"Subject: 4\n\nb\n").returncode == 0  # corrupt: parsed again
    assert [m.recipients for m in host.mails()] == [("ops@example.test",)] + [("night@example.test",)] * 3


CONFIGS = [
    "",
    'host = "h1"\n[broker]\nurl = "sqlite:////tmp/x/q.db"\nprefix = "p_1"\nconfirm_timeout = "750ms"\n'
    '[smtp]\nfrom = "f@example.test"\n[aliases]\nroot = "r@example.test"\n"*" = "all@example.test"\n'
    '[sendmail]\nmode = "direct"\nmax_size = "10MiB"\ndomain = "example.test"\nfrom_line_override = false\n'
    '[sendmail.senders]\nroot = "me@example.test"\n',
]
ENVS = [{}, {"OPSRELAY_SENDMAIL__MAX_SIZE": "1KB", "OPSRELAY_SENDMAIL__FROM_LINE_OVERRIDE": "no",
             "OPSRELAY_BROKER__PREFIX": "envp", "OPSRELAY_ALIASES": '{"root": "env@example.test"}'}]


@pytest.mark.parametrize("text", CONFIGS)
@pytest.mark.parametrize("extra_env", ENVS)
def test_the_fast_reader_agrees_with_the_config_models(tmp_path: Path, text: str, extra_env: dict[str, str]) -> None:
    path = tmp_path / "opsrelay.toml"
    path.write_text(text)
    env = {"OPSRELAY_CONFIG": str(path), **extra_env}
    full, fast = load_config(None, env=env), fastconfig.load(env)
    assert (fast.host, fast.url, fast.prefix, fast.busy_timeout, fast.smtp_from, fast.aliases) == (
        full.host, full.broker.url, full.broker.prefix, full.broker.confirm_timeout, full.smtp.from_, full.aliases)
    s = full.sendmail
    assert (fast.mode, fast.max_size, fast.domain, fast.from_line_override, fast.senders) == (
        s.mode.value, s.max_size, s.domain or full.host, s.from_line_override, s.senders)


@pytest.mark.parametrize(("text", "key"), [
    ('[broker]\nprefix = "bad prefix"\n', "broker.prefix"),
    ('[sendmail]\nmode = "later"\n', "sendmail.mode"),
    ('[sendmail]\nmax_size = 0\n', "sendmail.max_size"),
    ('[aliases]\nroot = "not-an-address"\n', "aliases"),
])
def test_both_readers_refuse_the_same_bad_keys(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "opsrelay.toml"
    path.write_text(text)
    env = {"OPSRELAY_CONFIG": str(path)}
    with pytest.raises(ValueError, match=f"{path}, {key}"):
        fastconfig.load(env)
    with pytest.raises(ValueError, match=f"{path}, {key}"):
        load_config(None, env=env)


@pytest.fixture
def amqp_host(tmp_path: Path, prefix: str, amqp_url: str) -> Iterator[Host]:
    host = Host(tmp_path, prefix, {"host": "127.0.0.1"}, broker_url=amqp_url)
    yield host
    from relay.contract.topology import full_topology

    asyncio.run(delete_topology(amqp_url, full_topology(prefix, [], [])))


@pytest.mark.rabbitmq
def test_with_rabbitmq_the_mail_is_published_to_outbound(amqp_host: Host) -> None:
    result = amqp_host.submit("-i", "root", data=b"Subject: fleet\n\nvia rabbit\n")
    assert (result.returncode, result.stderr) == (0, b"")
    from relay.engines import open_engine

    async def take() -> OutboundMail:
        async with open_engine(amqp_host.url) as engine:
            delivery = await engine.get(amqp_host.outbound)
            assert delivery is not None
            await delivery.ack()
            return from_message(delivery.message)

    mail = asyncio.run(take())
    assert mail.recipients == ("ops@example.test",) and mail.raw.endswith(b"\r\n\r\nvia rabbit\r\n")


def test_an_unreachable_broker_exits_75(tmp_path: Path, prefix: str) -> None:
    host = Host(tmp_path, prefix, {"host": "127.0.0.1"}, broker_url="amqp://guest:guest@127.0.0.1:1/")
    result = host.submit("root", data=b"Subject: x\n\nb\n")
    assert result.returncode == 75
    assert "cannot queue the mail" in one_line_error(result) and "guest:guest" not in result.stderr.decode()


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        message = "systemd-analyze is not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    unit = tmp_path / "opsrelay.service"
    text = (Path(__file__).parents[2] / "config" / "opsrelay.service").read_text()
    assert "ExecStart=/usr/local/bin/opsrelay serve --config %d/opsrelay.toml" in text
    unit.write_text(text.replace("/usr/local/bin/opsrelay", str(BIN / "opsrelay")))  # verify wants it to exist
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert (verified.returncode, verified.stderr) == (0, "")
    # Exposure is 0 (locked down) to 10 (unprotected); "OK" is below 2.
    security = subprocess.run([analyze, "security", "--offline=true", "--threshold=19", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert security.returncode == 0, security.stdout + security.stderr
    score = float(security.stdout.rsplit("opsrelay.service: ", 1)[1].split()[0])
    assert score < 2.0, security.stdout


def test_many_submissions_at_once_are_all_queued(host: Host) -> None:
    assert host.submit("root", data=b"Subject: 0\n\nfirst makes the file\n").returncode == 0
    processes = [subprocess.Popen([str(SENDMAIL), "-i", "root"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=host.env()) for _ in range(16)]

    def talk(numbered: tuple[int, subprocess.Popen[bytes]]) -> tuple[int | None, bytes]:
        n, process = numbered
        _, err = process.communicate(f"Subject: {n}\n\nmail {n}\n".encode(), timeout=60)
        return process.returncode, err

    with ThreadPoolExecutor(len(processes)) as pool:  # all 16 write and commit at the same time
        results = list(pool.map(talk, enumerate(processes, 1)))
    assert results == [(0, b"")] * 16
    subjects = sorted(int(m.raw.split(b"\r\n")[0].removeprefix(b"Subject: ")) for m in host.mails())
    assert subjects == list(range(17))
