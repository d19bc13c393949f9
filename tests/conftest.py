"""Fixtures shared by every suite: a real RabbitMQ, a real SMTP server, unique names.

A test that needs RabbitMQ and cannot reach it fails when ``$CI`` is set (CI
starts the broker through ``make test``) and skips elsewhere.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.smtp_server import SmtpServer

AMQP_URL = os.environ.get("OPSRELAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def rabbitmq_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_url() -> str:
    if not rabbitmq_reachable():
        message = f"RabbitMQ is not reachable at {AMQP_URL} (make test starts it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return AMQP_URL


@pytest.fixture
def prefix() -> str:
    """A unique broker.prefix per test, so no two tests share a queue."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[SmtpServer]:
    with SmtpServer(tmp_path / "smtp") as server:
        yield server
