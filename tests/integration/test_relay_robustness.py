"""The relay keeps its promises when our own code fails: nothing lost, nothing wedged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from relay.config.models import Config
from relay.contract.mail import OutboundMail, to_message
from relay.contract.message import Message
from relay.contract.names import dead_queue, outbound_queue, unrouted_queue
from relay.contract.topology import event_topology
from relay.daemon.relay import Relay
from relay.delivery.outcome import SendResult
from relay.engines import open_engine
from relay.engines.amqp import AmqpEngine
from relay.render.mime import build_message
from tests.brokers import declared, delete_topology
from tests.doubles import RecordingMailer
from tests.waiting import wait_until


class BuggyMailer(RecordingMailer):
    """Raises a non-RelayError (a bug) for mail to bug@example.test, delivers the rest."""

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> SendResult:
        if "bug@example.test" in recipients:
            raise RuntimeError("a bug in our own code")
        return await super().send(sender, recipients, raw)


def _mail(rcpt: str) -> OutboundMail:
    raw = build_message(sender="a@example.test", to=[rcpt], subject="robustness", body="x\n")
    return OutboundMail("a@example.test", (rcpt,), raw)


async def test_unexpected_errors_dead_letter_the_mail_and_do_not_wedge_the_consumer(tmp_path: Path) -> None:
    config = Config.model_validate({
        "host": "h", "broker": {"url": f"sqlite:///{tmp_path / 'q.db'}", "prefix": "rb"},
        "smtp": {"pool_size": 1}, "retry": {"backoff": ["100ms"]},
    })
    mailer = BuggyMailer()
    async with open_engine(config.broker.url) as engine:
        relay = Relay(config, engine, mailer)
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))

        async def handled() -> bool:
            return bool(mailer.sent) and await engine.depth(dead_queue("rb")) == 6

        try:
            await wait_until(lambda: declared(engine, outbound_queue("rb")), 5, what="the relay to declare")
            # More failing mails than the outbound prefetch window (2 x pool_size), then a good one.
            for _ in range(6):
                await engine.send(outbound_queue("rb"), to_message(_mail("bug@example.test")))
            good = _mail("ok@example.test")
            await engine.send(outbound_queue("rb"), to_message(good))
            await wait_until(handled, 5, what="six dead letters and the good mail sent",
                             diagnostics=lambda: f"sent to {[m.recipients for m in mailer.sent]}")
        finally:
            stop.set()
            await task
        assert [m.recipients for m in mailer.sent] == [("ok@example.test",)]
        assert await engine.depth(dead_queue("rb")) == 6
        assert await engine.depth(outbound_queue("rb")) == 0
        dead = await engine.get(dead_queue("rb"))
        assert dead is not None
        assert dead.message.headers["x-dead-kind"] == "invalid"
        assert "a bug in our own code" in str(dead.message.headers["x-dead-reason"])
        await dead.reject(requeue=True)


@pytest.mark.rabbitmq
async def test_a_connect_that_fails_after_the_connection_leaves_no_half_open_engine(
        amqp_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import aio_pika

    real_connect = aio_pika.connect_robust
    failures = 0

    async def connect_then_fail_opening_the_channel(*args: object, **kwargs: object) -> object:
        nonlocal failures
        connection = await real_connect(*args, **kwargs)  # type: ignore[call-overload]
        if failures == 0:
            failures += 1

            async def no_channel(*_: object, **__: object) -> object:
                raise asyncio.CancelledError  # as when a caller's time bound runs out here

            monkeypatch.setattr(connection, "channel", no_channel)
        return connection

    monkeypatch.setattr(aio_pika, "connect_robust", connect_then_fail_opening_the_channel)
    engine = AmqpEngine(amqp_url)
    try:
        with pytest.raises(asyncio.CancelledError):
            await engine.connect()
        # The next call connects afresh instead of finding a connection without a channel.
        await engine.declare(event_topology(prefix))
        await engine.publish(f"{prefix}.events", "proc.a.b.c.EXITED", Message(b"{}", "m1"))
        assert await engine.depth(unrouted_queue(prefix)) == 1
        assert failures == 1
    finally:
        with contextlib.suppress(Exception):
            await _delete(engine, prefix)
        await engine.close()


async def _delete(engine: AmqpEngine, prefix: str) -> None:
    await delete_topology(engine.url, event_topology(prefix))
