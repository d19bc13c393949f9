"""amqps to a real RabbitMQ node with TLS (scripts/ensure-rabbitmq-tls.sh: t1 on 127.0.0.1:5691).

The certificate and host name are verified: with a CA that did not sign the node's certificate
the engine refuses to talk (no AMQP byte, so no credential, goes out) and the listener spools;
with the right ca_file the same spool is forwarded. With a client certificate and
``auth = "external"`` the broker logs us in as the certificate's CN, no password.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from listeners.factory import make_publisher
from relay.config.models import Config
from relay.contract.event import Event
from relay.contract.message import Message
from relay.contract.names import unrouted_queue
from relay.contract.topology import QueueSpec, Topology, event_topology
from relay.engines import open_engine
from relay.errors import BrokerUnavailable
from tests.brokers import delete_topology
from tests.waiting import wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(90)]

CERTS = Path("/var/lib/opsrelay-test-tls/certs")
TLS_URL = "amqps://guest:guest@127.0.0.1:5691/"
SETUP_URL = "amqp://guest:guest@127.0.0.1:5690/"  # plain AMQP on the same node, for the test's own checks
NODE = f"t1@{socket.gethostname().split('.')[0]}"


@pytest.fixture(autouse=True)
def tls_node() -> None:
    try:
        socket.create_connection(("127.0.0.1", 5691), timeout=1.0).close()
    except OSError:
        message = "the RabbitMQ TLS test node is not running (make test starts it: scripts/ensure-rabbitmq-tls.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
async def cleanup(prefix: str) -> AsyncIterator[None]:
    yield
    await delete_topology(SETUP_URL, event_topology(prefix), Topology(queues=(QueueSpec(f"{prefix}.q"),)))


def broker(prefix: str, tmp_path: Path, **tls: Any) -> dict[str, Any]:
    return {"url": TLS_URL, "prefix": prefix, "confirm_timeout": 2.0, "spool": f"sqlite:///{tmp_path / 'spool.db'}",
            **tls}


def authenticated(port: int) -> int:
    """How many logins the TLS node has logged so far on ``port`` (5691: TLS, 5690: plain set-up)."""
    log = Path("/var/lib/opsrelay-test-tls/log") / f"{NODE}.log"
    return sum(f"-> 127.0.0.1:{port})" in line and "authenticated and granted access" in line
               for line in log.read_text(errors="replace").splitlines())


def connections() -> list[dict[str, Any]]:
    done = subprocess.run(["rabbitmqctl", "-q", "-n", NODE, "list_connections", "user", "auth_mechanism", "ssl",
                           "--formatter", "json"], capture_output=True, text=True, check=True, timeout=30)
    return list(json.loads(done.stdout))


async def settled_logins() -> tuple[int, int]:
    """The TLS and plain login counts once every earlier login is in the log (a plain login of ours
    is seen there: the node writes its log in order, a moment late)."""
    setup = authenticated(5690)
    async with open_engine(SETUP_URL):
        await wait_until(lambda: authenticated(5690) > setup, 10, what="a marker login in the node's log")
    return authenticated(5691), authenticated(5690)


async def test_verified_tls_round_trip(prefix: str, cleanup: None) -> None:
    engine = open_engine(TLS_URL, ca_file=str(CERTS / "ca.pem"))
    async with engine:
        queue = f"{prefix}.q"
        await engine.declare(Topology(queues=(QueueSpec(queue),)))
        await engine.send(queue, Message(b"over tls", "m1"))
        got = await engine.get(queue)
        assert got is not None and got.message.body == b"over tls"
        await got.ack()


async def test_an_untrusted_certificate_is_refused_the_listener_spools_then_forwards_with_the_right_ca(
        prefix: str, tmp_path: Path, cleanup: None) -> None:
    before, setup = await settled_logins()
    other_ca = str(CERTS / "other-ca.pem")
    wrong = Config.model_validate({"host": "h1", "broker": broker(prefix, tmp_path, ca_file=other_ca)})
    engine = open_engine(wrong.broker.url, **wrong.broker.engine_options)
    with pytest.raises(BrokerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await engine.connect()
    await engine.close()
    publisher = make_publisher(wrong)
    events = [Event(host="h1", group="web", process="web", event="PROCESS_STATE_EXITED", state="EXITED",
                    from_state="RUNNING", expected=False, pid=n, id=str(uuid.uuid4())) for n in range(3)]
    for event in events:
        await asyncio.to_thread(publisher.publish, event)  # returns: spooled, fsynced
    await asyncio.to_thread(publisher.close)

    right = Config.model_validate({"host": "h1", "broker": broker(prefix, tmp_path, ca_file=str(CERTS / "ca.pem"))})
    checker = open_engine(SETUP_URL)
    async with checker:
        # The node logs each login a moment late: once the checker's (later) login is in the log, none
        # came through the unverified TLS connections before it.
        await wait_until(lambda: authenticated(5690) > setup, 10, what="the checker's login in the node's log")
        assert authenticated(5691) == before, "a login reached the broker through an unverified connection"
        await checker.declare(event_topology(prefix))
        forwarder = make_publisher(right)  # finds the spool of the first and forwards it
        try:
            async def forwarded() -> bool:
                return await checker.depth(unrouted_queue(prefix)) == len(events)
            await wait_until(forwarded, 20, what="the spooled events forwarded over verified TLS")
        finally:
            await asyncio.to_thread(forwarder.close)
        ids = []
        while (got := await checker.get(unrouted_queue(prefix))) is not None:
            ids.append(got.message.message_id)
            await got.ack()
    assert sorted(ids) == sorted(e.id for e in events)
    await wait_until(lambda: authenticated(5691) > before, 10, what="the forwarder's login, over verified TLS")


async def test_x509_external_login_with_the_client_certificate(prefix: str, cleanup: None) -> None:
    config = Config.model_validate({"host": "h1", "broker": {
        "url": "amqps://127.0.0.1:5691/", "prefix": prefix, "ca_file": str(CERTS / "ca.pem"),
        "cert_file": str(CERTS / "client.pem"), "key_file": str(CERTS / "client.key"), "auth": "external"}})
    engine = open_engine(config.broker.url, **config.broker.engine_options)
    async with engine:
        await engine.declare(event_topology(prefix))
        mine = [c for c in connections() if c["user"] == "opsrelay-x509"]
        assert mine and all(c["auth_mechanism"] == "EXTERNAL" and c["ssl"] for c in mine), connections()


def test_tls_settings_are_checked_together(tmp_path: Path) -> None:
    for bad, says in [({"cert_file": "/c.pem"}, "go together"),
                      ({"url": "amqp://guest:guest@127.0.0.1/", "ca_file": "/ca.pem"}, "for amqps://"),
                      ({"auth": "external"}, "needs amqps:// and cert_file"),
                      ({"auth": "kerberos"}, "must be one of plain, external")]:
        with pytest.raises(ValidationError, match=says):
            Config.model_validate({"broker": {**broker("p", tmp_path), **bad}})
