"""Fixtures shared by every suite: a real RabbitMQ, a real SMTP server, unique names.

A test that needs RabbitMQ and cannot reach it fails when ``$CI`` is set (CI
starts the broker through ``make test``) and skips elsewhere (tests/brokers.py).
Helpers live in modules (tests/brokers.py, tests/waiting.py): import those, not a conftest.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import RabbitControl, require_rabbitmq
from tests.smtp_server import SmtpServer


@pytest.fixture
def amqp_url() -> str:
    return require_rabbitmq()


@pytest.fixture
def prefix() -> str:
    """A unique broker.prefix per test, so no two tests share a queue."""
    return f"t{uuid.uuid4().hex[:10]}"


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
