"""Fixtures shared by every suite: a real RabbitMQ, a real SMTP server, unique names.

A test that needs RabbitMQ and cannot reach it fails when ``$CI`` is set (CI
starts the broker through ``make test``) and skips elsewhere (tests/brokers.py).
Helpers live in modules (tests/brokers.py, tests/waiting.py): import those, not a conftest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import RabbitControl, rabbitmq_reachable, require_rabbitmq, sweep_prefixes, unique_prefix
from tests.smtp_server import SmtpServer


@pytest.fixture
def amqp_url() -> str:
    return require_rabbitmq()


@pytest.fixture
def prefix() -> str:
    """A unique broker.prefix per test, so no two tests share a queue."""
    return unique_prefix()


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[SmtpServer]:
    with SmtpServer(tmp_path / "smtp") as server:
        yield server


@pytest.fixture
def rabbit(amqp_url: str) -> Iterator[RabbitControl]:
    """Stops and starts the RabbitMQ application; started again after the test whatever happened."""
    control = RabbitControl()
    try:
        yield control
    finally:
        control.start()  # when a test failed before it could


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Delete what this session's processes declared on the default node (see tests/brokers.sweep_prefixes)."""
    if rabbitmq_reachable():
        swept = asyncio.run(sweep_prefixes())
        session.config.stash[_SWEPT] = swept


_SWEPT = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if config.stash.get(_SWEPT, 0):
        terminalreporter.write_line(f"swept {config.stash[_SWEPT]} queues and exchanges left on RabbitMQ by the tests")
