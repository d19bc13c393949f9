"""Fallback smarthosts (``[[smtp.fallback]]``) with real SMTP servers, on both engines.

The relay (``serve_forever``) runs on the test's loop with the relay's own Mailer,
:class:`relay.delivery.smarthosts.Smarthosts` (wrapped to record what each ``send`` returned or
raised). A fault of the primary's session (nothing listening, an untrusted certificate, a quota
reply) moves the mail to the fallback within the same attempt; a verdict on a recipient does not.
Every test ends with :func:`tests.integration.faults.reconcile`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config.models import Config
from relay.contract.mail import from_message
from relay.contract.message import Message
from relay.delivery.outcome import Budget, SendResult
from relay.delivery.smarthosts import Smarthosts
from relay.engines.base import Delivery, Engine
from tests.integration.faults import (
    Broker,
    Ledger,
    Rig,
    RunningRelay,
    Servers,
    Watch,
    fill_outbound,
    new_mail,
    reconcile,
    relay_settings,
    retry_queues,
    running_relay,
    steady_port,
)
from tests.smtp_server import SmtpServer, _Handler
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

BACKOFF = ("100ms", "200ms")
GMAIL_DAILY = "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits"
M365_QUOTA = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message"


# The broker (both engines), servers and rig fixtures are tests/integration/conftest.py's.


# -- the relay with its real Mailer ----------------------------------------------------------------


class RecordingSmarthosts(Smarthosts):
    """The relay's Mailer, unchanged, keeping what each ``send`` returned or raised."""

    def __init__(self, config: Config) -> None:
        super().__init__(config.smtp)
        self.outcomes: list[SendResult | BaseException] = []

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes, *,
                   budget: Budget | None = None) -> SendResult:
        try:
            result = await super().send(sender, recipients, raw, budget=budget)
        except BaseException as exc:
            self.outcomes.append(exc)
            raise
        self.outcomes.append(result)
        return result

    @property
    def results(self) -> list[SendResult]:
        return [o for o in self.outcomes if isinstance(o, SendResult)]


def running_smarthosts(config: Config, *, stop_timeout: float = 20.0) -> AbstractAsyncContextManager[RunningRelay]:
    """The relay of :func:`tests.integration.faults.running_relay`, with Smarthosts that record outcomes."""
    return running_relay(config, stop_timeout=stop_timeout, mailer=RecordingSmarthosts(config))


def with_fallbacks(broker: Broker, primary: SmtpServer, fallbacks: Sequence[SmtpServer], *,
                   primary_overrides: Mapping[str, object] | None = None, **options: Any) -> dict[str, Any]:
    settings = relay_settings(broker, primary, **options)
    settings["smtp"].update(primary_overrides or {})
    settings["smtp"]["fallback"] = [
        {k: (str(v) if isinstance(v, Path) else v) for k, v in f.client_settings().items()} for f in fallbacks]
    return settings


def name(server: SmtpServer) -> str:
    return f"{server.host}:{server.port}"


# -- a server that refuses MAIL FROM (tests.smtp_server scripts only RCPT and DATA replies) ----------


class _RefuseMail(_Handler):
    def __init__(self, owner: SmtpServer, reply: str) -> None:
        super().__init__(owner)
        self.mail_reply = reply

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> Any:
        self.owner._note(server, "MAIL")
        return self.mail_reply


def refusing_mail_from(servers: Servers, reply: str) -> SmtpServer:
    """An SmtpServer that answers every MAIL FROM with ``reply`` (after EHLO, STARTTLS and AUTH)."""
    server = SmtpServer(servers.root / f"smtp{len(servers.started)}")
    server._controller.handler = _RefuseMail(server, reply)
    server.start()
    servers.started.append(server)
    return server


async def peek(engine: Engine, queues: list[str]) -> dict[str, Message]:
    """What waits in ``queues`` now, by message id; each message goes back where it was."""
    taken: list[Delivery] = []
    try:
        for queue in queues:
            while (delivery := await engine.get(queue)) is not None:
                taken.append(delivery)
        return {d.message.message_id: d.message for d in taken}
    finally:
        for delivery in taken:
            await delivery.reject(requeue=True)


def faults_logged(caplog: pytest.LogCaptureFixture, server: SmtpServer) -> int:
    return sum(1 for r in caplog.records
               if r.name == "opsrelay.relay" and f"smarthost {name(server)} cannot take mail" in r.getMessage())


# -- tests ----------------------------------------------------------------------------------------


async def test_primary_down_every_mail_goes_through_the_fallback_without_a_backoff_step(
        rig: Rig, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="opsrelay.relay")
    primary = servers.make(port=steady_port())
    primary.stop()  # nothing listens on its port: connection refused
    fallback = servers.make()
    fallback.reply_to_rcpt("nobody@example.test", "550 5.1.1 no such user here")
    config, engine = await rig.open(with_fallbacks(rig.broker, primary, [fallback], backoff=["30s"],
                                                   max_attempts=3, pool_size=2))
    ledger = Ledger()
    mails = [new_mail([f"ops{i}@example.test"]) for i in range(6)]
    refused = new_mail(["nobody@example.test"])
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, [*mails, refused])
    started = time.monotonic()
    async with running_smarthosts(config) as relay:
        watch.alive = relay.check
        await wait_until(watch.poll, 10, what="every mail delivered or dead-lettered", diagnostics=watch.summary)
        took = time.monotonic() - started
        await asyncio.sleep(0.25)  # let the last ack land before stopping (as Watch.until_settled)
    result = await reconcile(watch)

    assert took < 5.0, f"{took:.1f}s: the mail waited (the first backoff step is 30s)"
    assert len(fallback.received) == len(mails)
    assert all(result.delivered[(m.message_id, m.recipients[0])] == 1 for m in mails)
    assert not primary.received
    assert [r.smarthost for r in relay.mailer.results] == [name(fallback)] * (len(mails) + 1)
    # The primary was found down by the first deliveries (pool_size run at once), then passed over.
    assert 1 <= faults_logged(caplog, primary) <= 2, [r.getMessage() for r in caplog.records]
    # The fallback's verdict on a recipient is final, and the history names who gave it.
    dead = result.dead_letter(refused.message_id)
    assert "550 5.1.1 no such user here" in str(dead.headers["x-dead-reason"])
    assert dead.headers["x-attempts"] == 1
    [attempt] = from_message(dead).history
    assert attempt.smarthost == name(fallback)
    assert attempt.recipients == ("nobody@example.test",)


async def test_primary_with_an_untrusted_certificate_is_passed_over_without_sending_credentials(
        rig: Rig, servers: Servers) -> None:
    fallback = servers.make()
    primary = servers.make(ca=trustme.CA())  # signed by a CA the relay does not trust
    config, engine = await rig.open(with_fallbacks(
        rig.broker, primary, [fallback], backoff=["30s"],
        primary_overrides={"ca_file": str(fallback.ca_pem_path)}))  # trusts the fallback's CA only
    ledger = Ledger()
    mails = [new_mail([f"ops{i}@example.test"]) for i in range(3)]
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, mails)
    async with running_smarthosts(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(10)
    result = await reconcile(watch)

    assert not result.dead
    assert len(fallback.received) == 3 and all(m.tls and m.auth_user == fallback.user for m in fallback.received)
    assert not primary.received
    assert primary.connections, "the primary was tried"
    # EHLO, then the TLS handshake failed on our side: no AUTH, no MAIL (aiosmtpd notes STARTTLS
    # only once its handshake succeeded).
    assert all(c.commands == ["EHLO"] for c in primary.connections), primary.connections
    assert not primary.auth_attempts, "credentials went to a server whose certificate was refused"
    assert {r.smarthost for r in relay.mailer.results} == {name(fallback)}


async def test_after_failback_the_primary_is_used_again(rig: Rig, servers: Servers) -> None:
    failback = 2.0
    port = steady_port()
    primary = servers.make(port=port)
    primary.stop()
    fallback = servers.make()
    config, engine = await rig.open(with_fallbacks(rig.broker, primary, [fallback], backoff=["30s"],
                                                   pool_size=1, primary_overrides={"failback": "2s"}))
    assert config.smtp.failback == failback
    ledger = Ledger()
    first, second, third = (new_mail([f"ops{i}@example.test"]) for i in range(3))
    watch = Watch(engine, config, ledger, servers.received)
    async with running_smarthosts(config) as relay:
        watch.alive = relay.check
        published = time.monotonic()
        await fill_outbound(engine, rig.broker.prefix, ledger, [first])
        await wait_until(watch.poll, 10, what="the first mail delivered", diagnostics=watch.summary)
        delivered_first = time.monotonic()  # the primary's fault came before this
        assert len(fallback.received) == 1

        # The primary is back, but it failed less than `failback` ago: the fallback is still first.
        back = servers.make(port=port, ca=primary.ca)
        await fill_outbound(engine, rig.broker.prefix, ledger, [second])
        await wait_until(watch.poll, 10, what="the second mail delivered", diagnostics=watch.summary)
        assert time.monotonic() - published < failback, "too slow to tell: the failback window had passed"
        assert len(fallback.received) == 2 and not back.received
        assert not back.connections, "the primary was not even tried within the failback window"

        # Once `failback` has passed since the fault, the primary is first again.
        await wait_until(lambda: time.monotonic() >= delivered_first + failback, failback + 1,
                         what="the failback window to pass")
        await fill_outbound(engine, rig.broker.prefix, ledger, [third])
        await watch.until_settled(10)
    result = await reconcile(watch)

    assert not result.dead
    assert [m.rcpt_tos for m in back.received] == [third.recipients]
    assert len(fallback.received) == 2
    assert [r.smarthost for r in relay.mailer.results] == [name(fallback), name(fallback), name(back)]


async def test_a_recipients_refusal_on_the_primary_is_final_and_never_sent_through_the_fallback(
        rig: Rig, servers: Servers) -> None:
    primary = servers.make()
    primary.reply_to_rcpt("gone@example.test", "550 5.1.1 mailbox gone")
    primary.reply_to_rcpt("busy@example.test", "451 4.2.1 mailbox busy, later", times=1)
    fallback = servers.make()
    config, engine = await rig.open(with_fallbacks(rig.broker, primary, [fallback], backoff=BACKOFF,
                                                   max_attempts=5))
    ledger = Ledger()
    mixed = new_mail(["ok@example.test", "gone@example.test"])
    only_gone = new_mail(["gone@example.test"])
    busy = new_mail(["busy@example.test"])
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, [mixed, only_gone, busy])
    async with running_smarthosts(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(15)
    result = await reconcile(watch)

    assert not fallback.received
    assert not fallback.connections, "the fallback was never asked"
    assert result.delivered[(mixed.message_id, "ok@example.test")] == 1
    assert result.delivered[(busy.message_id, "busy@example.test")] == 1, "retried on the primary"
    assert sorted(m.rcpt_tos for m in primary.received) == [("busy@example.test",), ("ok@example.test",)]
    for mail in (mixed, only_gone):
        dead = result.dead_letter(mail.message_id)
        assert "550 5.1.1 mailbox gone" in str(dead.headers["x-dead-reason"])
        [attempt] = from_message(dead).history
        assert (attempt.recipients, attempt.smarthost) == (("gone@example.test",), name(primary))
    assert {r.smarthost for r in relay.mailer.results} == {name(primary)}


@pytest.mark.parametrize("where", ["mail-from", "rcpt", "data"])
async def test_a_quota_reply_on_the_primary_sends_the_mail_through_the_fallback(
        rig: Rig, servers: Servers, where: str) -> None:
    if where == "mail-from":
        primary = refusing_mail_from(servers, GMAIL_DAILY)
    else:
        primary = servers.make()
        if where == "rcpt":
            for i in range(3):
                primary.reply_to_rcpt(f"ops{i}@example.test", GMAIL_DAILY)
        else:
            primary.reply_to_data(M365_QUOTA, times=100)
    fallback = servers.make()
    # max_attempts 1: were a 5xx quota reply taken for the mail's verdict, it would be dead at once.
    config, engine = await rig.open(with_fallbacks(rig.broker, primary, [fallback], backoff=["30s"],
                                                   max_attempts=1))
    ledger = Ledger()
    mails = [new_mail([f"ops{i}@example.test"]) for i in range(3)]
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, mails)
    started = time.monotonic()
    async with running_smarthosts(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(10)
        assert time.monotonic() - started < 5.0, "no backoff step was waited for"
    result = await reconcile(watch)

    assert not result.dead
    assert not primary.received
    assert len(fallback.received) == 3
    assert {r.smarthost for r in relay.mailer.results} == {name(fallback)}
    asked = sum(c.commands.count("MAIL") for c in primary.connections)
    assert 1 <= asked <= 2, f"the primary was asked {asked} times: after its quota reply it is passed over"


async def test_a_quota_reply_to_one_recipient_does_not_mail_the_accepted_ones_twice(
        rig: Rig, servers: Servers) -> None:
    primary = servers.make()
    primary.reply_to_rcpt("limited@example.test", GMAIL_DAILY)  # the limit was reached mid-way
    fallback = servers.make()
    config, engine = await rig.open(with_fallbacks(rig.broker, primary, [fallback], backoff=BACKOFF))
    ledger = Ledger()
    mail = new_mail(["ok@example.test", "limited@example.test"])
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, [mail])
    async with running_smarthosts(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(10)
    result = await reconcile(watch)  # fails on a duplicate delivery

    assert result.delivered[(mail.message_id, "ok@example.test")] == 1
    assert result.delivered[(mail.message_id, "limited@example.test")] == 1
    assert [m.rcpt_tos for m in fallback.received] == [("limited@example.test",)]


async def test_a_quota_reply_on_every_smarthost_holds_the_mail_and_never_dead_letters_it(
        rig: Rig, servers: Servers) -> None:
    rcpt = "oncall@example.test"
    primary = servers.make()
    primary.reply_to_rcpt(rcpt, GMAIL_DAILY)
    fallback = servers.make()
    fallback.reply_to_rcpt(rcpt, "454 Throttling failure: Daily message quota exceeded.", times=1)
    config, engine = await rig.open(with_fallbacks(rig.broker, primary, [fallback], backoff=["500ms"],
                                                   max_attempts=1))
    ledger = Ledger()
    mail = new_mail([rcpt])
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, [mail])
    async with running_smarthosts(config) as relay:
        watch.alive = relay.check
        seen: dict[str, Message] = {}

        async def held() -> bool:
            relay.check()
            seen.update(await peek(engine, retry_queues(config)))
            return mail.message_id in seen

        await wait_until(held, 10, what="the mail held in a retry queue", diagnostics=lambda: str(seen))
        headers = seen[mail.message_id].headers
        assert "sending quota or rate exceeded" in str(headers["x-held"])
        assert "454 Throttling failure" in str(headers["x-held"]), "the last smarthost's reply"
        assert headers["x-attempts"] == 0, "a quota reply spends no attempt"
        assert headers["x-holds"] == 1
        [attempt] = from_message(seen[mail.message_id]).history
        assert attempt.reply.startswith("held: sending quota or rate exceeded")
        assert attempt.smarthost == name(fallback)
        await watch.collect()
        assert not watch.dead

        # The fallback's daily quota is reset: the held mail goes out on its next turn.
        await watch.until_settled(10)
    result = await reconcile(watch)

    assert not result.dead
    assert not primary.received
    assert [m.rcpt_tos for m in fallback.received] == [(rcpt,)]
    quota_errors = [o for o in relay.mailer.outcomes if not isinstance(o, SendResult)]
    assert len(quota_errors) == 1 and getattr(quota_errors[0], "smarthost", "") == name(fallback)

