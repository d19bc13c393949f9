"""Least privilege on a real RabbitMQ: logins made with exactly the permissions of a role (relay.ops.roles).

Each role works with its permissions: a relay login declares and serves, a sendmail login queues a
mail through the submit exchange, a listener login publishes an event; the relay mails both. Each with
less fails with one line that names the missing permission and the object, and loses nothing: the
listener spools the event, sendmail queues nothing and says so, ``opsrelay check --connect --role``
exits 69.
"""

from __future__ import annotations

import asyncio
import email
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from listeners.factory import make_publisher
from listeners.publish import EnginePublisher
from relay.config.models import Config
from relay.contract.event import Event
from relay.contract.mail import OutboundMail
from relay.contract.names import events_exchange, outbound_queue, submit_exchange
from relay.contract.topology import event_topology
from relay.contract.urls import url_user
from relay.engines import open_engine
from relay.errors import PermissionRefused, RelayError
from relay.ops.roles import Permissions, permissions
from relay.ops.submit import submit
from tests.brokers import require_rabbitmq
from tests.integration.faults import write_toml
from tests.processes import OPSRELAY, RelayProcess
from tests.smtp_server import SmtpServer
from tests.waiting import wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(120)]

NOTHING = "^$"
Login = Callable[[Permissions], str]


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def login() -> Iterator[Login]:
    """Makes a RabbitMQ user with the given permissions on / and returns its URL; deleted afterwards."""
    require_rabbitmq()
    made: list[str] = []

    def make(granted: Permissions) -> str:
        user, password = f"opsrelay-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        _ctl("add_user", user, password)
        made.append(user)
        _ctl("set_permissions", "-p", "/", user, granted.configure, granted.write, granted.read)
        return f"amqp://{user}:{password}@127.0.0.1:5672/"

    yield make
    for user in made:
        _ctl("delete_user", user)


def settings(url: str, prefix: str, tmp_path: Path, smtp: SmtpServer | None = None) -> dict[str, Any]:
    value: dict[str, Any] = {
        "host": "roles", "broker": {"url": url, "prefix": prefix, "confirm_timeout": 2.0,
                                    "spool": f"sqlite:///{tmp_path / 'spool.db'}"},
        "subscriptions": [{"name": "ops", "to": ["ops@example.test"]}],
        "sendmail": {"maildrop": str(tmp_path / "maildrop")},
    }
    if smtp is not None:
        value["smtp"] = {k: str(v) if isinstance(v, Path) else v for k, v in smtp.client_settings().items()}
        value["smtp"]["from"] = "relay@roles.test"
    return value


def check(config: Path, role: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    return subprocess.run([str(OPSRELAY), "check", "--connect", "--role", role, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def crash(n: int = 1) -> Event:
    return Event(host="roles", group="web", process="web", event="PROCESS_STATE_EXITED", state="EXITED",
                 from_state="RUNNING", expected=False, pid=n, id=str(uuid.uuid4()))


def mail() -> OutboundMail:
    raw = (b"From: cron@roles.test\r\nTo: ops@example.test\r\nSubject: from sendmail\r\n"
           b"Message-ID: <" + uuid.uuid4().hex.encode() + b"@roles.test>\r\n\r\nbody\r\n")
    return OutboundMail(sender="cron@roles.test", recipients=("ops@example.test",), raw=raw, origin="sendmail")


async def test_each_role_works_with_exactly_its_permissions(
        login: Login, prefix: str, tmp_path: Path, smtp_server: SmtpServer) -> None:
    relay_url = login(permissions("relay", prefix))
    relay_toml = write_toml(settings(relay_url, prefix, tmp_path, smtp_server), tmp_path / "relay.toml")
    done = check(relay_toml, "relay")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"broker role relay: ok: may configure, write and read the {prefix}.* objects" in done.stdout

    made = {role: settings(login(permissions(role, prefix)), prefix, tmp_path) for role in ("listener", "sendmail")}
    listener_cfg, sendmail_cfg = (Config.model_validate(made[role]) for role in ("listener", "sendmail"))
    for role, values in made.items():
        done = check(write_toml(values, tmp_path / f"{role}.toml"), role)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"broker role {role}: ok" in done.stdout
        assert "smtp" not in done.stdout.split("broker role")[-1], "a listener/sendmail host has no smarthost check"

    with RelayProcess(relay_toml, tmp_path / "relay.log") as relay:
        await wait_until(lambda: "relay: consuming" in relay.text() or relay.process.poll() is not None, 30,
                         what="the relay consuming", diagnostics=relay.log)
        relay.alive()
        publisher = EnginePublisher(listener_cfg.broker.url, prefix, options=listener_cfg.broker.engine_options)
        try:
            await asyncio.to_thread(publisher.publish, crash())
        finally:
            await asyncio.to_thread(publisher.close)
        await submit(sendmail_cfg.broker.url, prefix, mail(), options=sendmail_cfg.broker.engine_options)
        await wait_until(lambda: len(smtp_server.received) >= 2, 30, what="the crash notice and the sendmail mail",
                         diagnostics=relay.log)
        relay.alive()
    subjects = sorted(str(email.message_from_bytes(m.content)["Subject"]) for m in smtp_server.received)
    assert len(subjects) == 2 and "from sendmail" in subjects, subjects
    assert "[opsrelay] roles: web exited unexpectedly" in subjects, subjects  # the listener's event, rendered


async def _declared_by_a_relay(login: Login, prefix: str, tmp_path: Path) -> None:
    relay_cfg = Config.model_validate(settings(login(permissions("relay", prefix)), prefix, tmp_path))
    from relay.daemon.relay import relay_topology

    async with open_engine(relay_cfg.broker.url, **relay_cfg.broker.engine_options) as engine:
        await engine.declare(relay_topology(relay_cfg))


async def test_a_listener_without_write_spools_the_event_and_says_which_permission(
        login: Login, prefix: str, tmp_path: Path) -> None:
    await _declared_by_a_relay(login, prefix, tmp_path)
    least = permissions("listener", prefix)
    values = settings(login(Permissions(least.configure, NOTHING, least.read)), prefix, tmp_path)
    cfg = Config.model_validate(values)
    upstream = EnginePublisher(cfg.broker.url, prefix, options=cfg.broker.engine_options)
    try:
        with pytest.raises(PermissionRefused) as refused:
            await asyncio.to_thread(upstream.publish, crash())
    finally:
        await asyncio.to_thread(upstream.close)
    line = str(refused.value)
    assert "\n" not in line
    assert f"no write permission on exchange '{events_exchange(prefix)}'" in line, line

    publisher = make_publisher(cfg)
    try:
        await asyncio.to_thread(publisher.publish, crash(2))  # returns: the event is in the spool
        from listeners.spool import Spool

        assert Spool(cfg.broker.spool, prefix).depth() == 1
    finally:
        await asyncio.to_thread(publisher.close)

    done = check(write_toml(values, tmp_path / "listener.toml"), "listener")
    assert done.returncode == 69, done.stdout + done.stderr
    assert f"no write permission on exchange '{events_exchange(prefix)}'" in done.stdout
    assert least.rabbitmqctl(url_user(cfg.broker.url)) in done.stdout  # how to mend it


async def test_a_listener_login_before_any_relay_says_what_is_missing(
        login: Login, prefix: str, tmp_path: Path) -> None:
    cfg = Config.model_validate(settings(login(permissions("listener", prefix)), prefix, tmp_path))
    upstream = EnginePublisher(cfg.broker.url, prefix, options=cfg.broker.engine_options)
    try:
        with pytest.raises(PermissionRefused, match=f"exchange '{prefix}.unrouted' does not exist and this login "
                                                    "may not configure it: start a relay first"):
            await asyncio.to_thread(upstream.publish, crash())
    finally:
        await asyncio.to_thread(upstream.close)


async def test_sendmail_without_write_queues_nothing_and_says_which_permission(
        login: Login, prefix: str, tmp_path: Path) -> None:
    await _declared_by_a_relay(login, prefix, tmp_path)
    url = login(Permissions(NOTHING, f"^{prefix}\\.outbound$", NOTHING))  # the queue, not the exchange
    with pytest.raises(PermissionRefused) as refused:
        await submit(url, prefix, mail(), options={"confirm_timeout": 2.0})
    assert f"no write permission on exchange '{submit_exchange(prefix)}'" in str(refused.value)
    admin = open_engine(require_rabbitmq())
    async with admin:
        assert await admin.depth(outbound_queue(prefix)) == 0


@pytest.mark.parametrize(("missing", "object_kind"), [("configure", "exchange"), ("read", "exchange")])
async def test_a_relay_with_less_fails_at_start_naming_the_permission(
        login: Login, prefix: str, tmp_path: Path, smtp_server: SmtpServer, missing: str, object_kind: str) -> None:
    await _declared_by_a_relay(login, prefix, tmp_path)  # so that read is what is left to refuse
    full = permissions("relay", prefix)
    less = Permissions(**{**full.__dict__, missing: NOTHING})
    path = write_toml(settings(login(less), prefix, tmp_path, smtp_server), tmp_path / "relay.toml")
    done = check(path, "relay")
    assert done.returncode == 69, done.stdout + done.stderr
    assert f"no {missing} permission on {object_kind} '{prefix}." in done.stdout, done.stdout
    with RelayProcess(path, tmp_path / "relay.log") as relay:
        code = await asyncio.to_thread(relay.process.wait, 30)
    assert code == 78, relay.log()
    refusals = [line for line in relay.text().splitlines() if f"no {missing} permission on {object_kind}" in line]
    assert refusals, relay.log()


def test_the_role_table_is_what_the_readme_documents() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    for role in ("listener", "sendmail", "relay"):
        cells = [p.replace("|", "\\|") for p in permissions(role, "opsrelay").__dict__.values()]  # a table's \|
        assert f"| {role} | `{cells[0]}` | `{cells[1]}` | `{cells[2]}` |" in readme, role


def test_an_unknown_role_is_a_usage_error(tmp_path: Path) -> None:
    path = write_toml({"host": "roles", "broker": {"url": f"sqlite:///{tmp_path / 'q.db'}"}}, tmp_path / "c.toml")
    done = check(path, "admin")
    assert done.returncode == 64
    assert "--role 'admin': one of listener, relay, sendmail" in done.stderr
    with pytest.raises(ValueError, match="no such role"):
        permissions("admin", "p")
    assert isinstance(PermissionRefused("x"), RelayError)


def test_events_topology_is_what_the_listener_role_may_publish_to() -> None:
    """The listener's write pattern covers the exchange it publishes to and nothing else of its topology."""
    import re

    write = re.compile(permissions("listener", "opsrelay").write)
    names = [e.name for e in event_topology("opsrelay").exchanges] + [q.name for q in event_topology("opsrelay").queues]
    assert [n for n in names if write.match(n)] == [events_exchange("opsrelay")]
