"""The broker a test runs on, RabbitMQ or the embedded SQLite queue, and what it declared there.

The fixtures are in the conftests and built on this module: ``amqp_url`` (tests/conftest.py)
and ``broker``/``engine`` (tests/integration/conftest.py, each test once per engine). Test
modules import this module for :class:`Broker` and the helpers, never a conftest.

A test that needs RabbitMQ and cannot reach it fails when ``$CI`` is set (CI starts the
broker through ``make test``) and skips elsewhere: :func:`require_rabbitmq`. What a test
declared on RabbitMQ is deleted afterwards; a SQLite queue file goes with the test's tmp_path.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.contract.topology import Topology
from relay.engines import open_engine
from relay.engines.base import Engine
from relay.errors import ConfigurationError
from tests.waiting import settle

if TYPE_CHECKING:
    from aio_pika.abc import AbstractConnection

__all__ = [
    "AMQP_URL",
    "Broker",
    "RabbitControl",
    "declared",
    "delete_topology",
    "engine_params",
    "rabbitmq_reachable",
    "rabbitmqctl",
    "require_rabbitmq",
    "settled_depth",
    "sqlite_url",
    "sweep_prefixes",
    "unique_prefix",
]

AMQP_URL = os.environ.get("OPSRELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rabbitmq_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_rabbitmq() -> str:
    """:data:`AMQP_URL`; without a reachable RabbitMQ the test fails when ``$CI`` is set and skips elsewhere."""
    import pytest  # here, not at the top: the e2e harness imports this module and uses no pytest

    if not rabbitmq_reachable():
        message = f"RabbitMQ is not reachable at {AMQP_URL} (make test starts it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return AMQP_URL


_PREFIXES: set[str] = set()
"""Every prefix this test session handed out: what its relays and listeners declared is swept at its end."""


def unique_prefix() -> str:
    """A broker.prefix no other test uses, remembered for :func:`sweep_prefixes`."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    _PREFIXES.add(prefix)
    return prefix


def _listed(kind: str, node: str | None) -> list[str]:
    import subprocess

    command = ["rabbitmqctl", "-q", *(["-n", node] if node else []), f"list_{kind}", "name", "--no-table-headers"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return done.stdout.split() if done.returncode == 0 else []


async def sweep_prefixes(url: str = AMQP_URL, node: str | None = None) -> int:
    """Delete every queue and exchange named under a prefix of this session; how many went.

    A test's own cleanup deletes what it declared itself, but not what the relays, listeners and
    CLI processes it started declared. Left behind, those add up to the thousands of durable queues
    a restarted node must recover before it answers (a CI run hung on 1,054 of them).
    """
    if not _PREFIXES:
        return 0
    import aio_pika

    def ours(name: str) -> bool:
        return name.split(".", 1)[0] in _PREFIXES

    queues = [q for q in _listed("queues", node) if ours(q)]
    exchanges = [e for e in _listed("exchanges", node) if ours(e)]
    if not queues and not exchanges:
        return 0
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)
    return len(queues) + len(exchanges)


def engine_params() -> list[Any]:
    """``sqlite`` and ``amqp`` (marked rabbitmq), for ``params=`` or ``pytest.mark.parametrize``."""
    import pytest

    return [pytest.param("sqlite", id="sqlite"), pytest.param("amqp", id="amqp", marks=pytest.mark.rabbitmq)]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path.absolute()}"  # four slashes: an absolute path


class Broker:
    """One test's broker (``kind`` is ``sqlite`` or ``amqp``), its ``url`` and the test's ``prefix``.

    :meth:`open` connects engines and :meth:`declare` declares through them; :meth:`cleanup`
    closes those engines (newest first) and deletes what was declared on RabbitMQ (last
    declared first). A Broker only made to name a URL and a prefix needs no cleanup.
    """

    def __init__(self, kind: str, url: str, prefix: str) -> None:
        self.kind, self.url, self.prefix = kind, url, prefix
        self._engines: list[Engine] = []
        self._declared: list[Topology] = []
        self._admin: AbstractConnection | None = None

    def __repr__(self) -> str:
        return f"Broker({self.kind}, {self.url}, prefix={self.prefix})"

    @classmethod
    def for_test(cls, kind: str, tmp_path: Path, prefix: str) -> Broker:
        """RabbitMQ (see :func:`require_rabbitmq`) or a queue file in ``tmp_path``."""
        if kind == "amqp":
            return cls(kind, require_rabbitmq(), prefix)
        if kind == "sqlite":
            return cls(kind, sqlite_url(tmp_path / "queue.db"), prefix)
        raise ValueError(f"no such engine kind: {kind!r}")

    async def open(self, **options: float) -> Engine:
        """A connected engine (``options`` as :func:`relay.engines.open_engine` takes them), closed by cleanup."""
        engine = open_engine(self.url, **options)
        await engine.connect()
        self._engines.append(engine)
        return engine

    async def declare(self, engine: Engine, topology: Topology) -> None:
        """Declare ``topology`` through ``engine``; deleted on RabbitMQ by cleanup."""
        self._declared.append(topology)
        await engine.declare(topology)

    async def delete(self, topology: Topology) -> None:
        """Delete ``topology`` from RabbitMQ now (nothing to do on SQLite)."""
        if self.kind != "amqp":
            return
        if self._admin is None:
            import aio_pika

            self._admin = await aio_pika.connect(self.url, timeout=10)
        await _delete_on(self._admin, topology)

    async def cleanup(self) -> None:
        engines, self._engines = self._engines, []
        declared, self._declared = self._declared, []
        try:
            for engine in reversed(engines):
                await engine.close()
        finally:
            try:
                for topology in reversed(declared):
                    await self.delete(topology)
            finally:
                admin, self._admin = self._admin, None
                if admin is not None:
                    await admin.close()


async def _delete_on(connection: AbstractConnection, topology: Topology) -> None:
    for queue in reversed(topology.queues):
        async with connection.channel() as channel:  # a failed delete closes its channel
            await channel.queue_delete(queue.name)
    for exchange in reversed(topology.exchanges):
        async with connection.channel() as channel:
            await channel.exchange_delete(exchange.name)


async def delete_topology(url: str, *topologies: Topology) -> None:
    """Delete ``topologies`` (the last first) from the RabbitMQ at ``url``; nothing for a SQLite URL."""
    if not url.startswith("amqp"):
        return
    import aio_pika

    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        for topology in reversed(topologies):
            await _delete_on(connection, topology)


async def settled_depth(engine: Engine, queue: str, expected: int, within: float = 5.0) -> int:
    """``depth`` once it equals ``expected`` or ``within`` passed: RabbitMQ applies ack/reject asynchronously."""
    return await settle(lambda: engine.depth(queue), expected, within)


async def declared(engine: Engine, queue: str) -> bool:
    """Whether ``queue`` exists (someone declared it), for a wait on a relay that declares at start."""
    try:
        await engine.depth(queue)
    except ConfigurationError:
        return False
    return True


def rabbitmqctl(*args: str, within: float = 60.0) -> None:
    import subprocess

    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=within)


class RabbitControl:
    """Stops the RabbitMQ application (the Erlang node stays up) and starts it again."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        rabbitmqctl("stop_app")

    def start(self) -> None:
        if self.stopped:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
            self.stopped = False
