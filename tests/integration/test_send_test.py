"""``opsrelay send-test ADDR``: one mail through the whole path, to a real STARTTLS+AUTH server."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from relay.cli.app import app
from tests.brokers import Broker
from tests.integration.faults import relay_settings, running_relay, to_config, write_toml
from tests.smtp_server import DEFAULT_PASSWORD, SmtpServer
from tests.waiting import wait_until


def test_send_test_mail_goes_through_the_relay(tmp_path: Path, smtp_server: SmtpServer,
                                               caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker.for_test("sqlite", tmp_path, "sendtest")
    settings = relay_settings(broker, smtp_server)
    config_path = write_toml(settings, tmp_path / "opsrelay.toml")

    result = CliRunner().invoke(app, ["send-test", "oncall@example.test", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    assert "queued test mail" in result.output

    caplog.set_level(logging.DEBUG)

    async def relay_until_delivered() -> None:
        async with running_relay(to_config(settings)):
            await wait_until(lambda: len(smtp_server.received) == 1, within=10.0, what="the test mail")

    # The CLI runs its own event loop, so this test is synchronous and runs the relay in one too.
    asyncio.run(relay_until_delivered())

    [mail] = smtp_server.received
    assert mail.rcpt_tos == ("oncall@example.test",)
    assert mail.tls and mail.auth_user == smtp_server.user
    parsed = email.message_from_bytes(mail.content, policy=email.policy.default)
    assert parsed["Subject"] == "[opsrelay] test mail from faulthost"
    assert "the whole path works" in parsed.get_content()
    # The relay logged the delivery, and never the password.
    assert "delivered" in caplog.text
    assert DEFAULT_PASSWORD not in caplog.text
