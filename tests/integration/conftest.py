"""Fixtures of the integration suites: the broker a test runs on, once per engine, and its engine.

``broker`` is parametrised over the embedded SQLite queue and RabbitMQ (marked ``rabbitmq``;
without one reachable, fails in CI and skips elsewhere); ``@pytest.mark.parametrize("broker",
[...], indirect=True)`` narrows a test to some of them. Whatever the test opened through it
is closed and whatever it declared is deleted afterwards (tests/brokers.py). ``servers`` and
``rig`` are the fault suites' (tests/integration/faults.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from relay.engines.base import Engine
from tests.brokers import Broker, engine_params
from tests.integration.faults import Rig, Servers


@pytest.fixture(params=engine_params())
async def broker(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> AsyncIterator[Broker]:
    made = Broker.for_test(request.param, tmp_path, prefix)
    try:
        yield made
    finally:
        await made.cleanup()


@pytest.fixture
async def engine(broker: Broker) -> Engine:
    """A connected engine on the test's broker (closed with the broker)."""
    return await broker.open()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """SMTP servers the test starts; stopped, newest first, after the test."""
    made = Servers(tmp_path)
    yield made
    made.stop_all()


@pytest.fixture
async def rig(broker: Broker, servers: Servers) -> AsyncIterator[Rig]:
    # Depends on servers so that engines close (and queues go) before the servers stop.
    made = Rig(broker)
    yield made
    await broker.cleanup()


@pytest.fixture
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No OPSRELAY_* from the caller's shell, and no config found by the search path."""
    for name in list(os.environ):
        if name.startswith("OPSRELAY_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
