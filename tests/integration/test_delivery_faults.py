"""Delivery under faults: the relay (``serve_forever``) on the test's loop, a real SmtpPool,
a real SMTP server that misbehaves on cue, and both engines.

Every test ends with :func:`tests.integration.faults.reconcile`: each published
(mail, recipient) is delivered once or dead-lettered once, nothing waits in
outbound or a retry queue, and invalid messages are dead-lettered, not looped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import Mapping
from datetime import datetime

import pytest
import trustme

from relay.contract.mail import to_message
from relay.contract.message import HeaderValue, Message
from relay.contract.names import outbound_queue
from relay.engines.base import Delivery, Engine
from tests.integration.faults import (
    Ledger,
    Rig,
    Servers,
    Watch,
    fill_outbound,
    history,
    new_mail,
    reconcile,
    relay_settings,
    retry_queues,
    running_relay,
    steady_port,
)
from tests.smtp_server import DEFAULT_PASSWORD, SmtpServer, TlsMode
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

BACKOFF = ("100ms", "200ms")
STEPS = (0.1, 0.2)  # seconds; the last step repeats


def step(attempt: int) -> float:
    return STEPS[min(attempt, len(STEPS)) - 1]


async def sample_data_attempts(server: SmtpServer, times: list[float]) -> None:
    """Record when each DATA attempt reached the server (poll every 2 ms; never early)."""
    seen = 0
    while True:
        now = server.data_attempts
        times.extend([time.monotonic()] * (now - seen))
        seen = now
        await asyncio.sleep(0.002)  # the sampling period: the server has no event to wait on


async def test_451_on_data_three_times_then_delivered_once_after_backoff(rig: Rig, servers: Servers) -> None:
    server = servers.make()
    server.reply_to_data("451 4.3.0 try again later", times=3)
    config, engine = await rig.open(relay_settings(rig.broker, server, backoff=BACKOFF, max_attempts=10))
    ledger = Ledger()
    mail = new_mail(["oncall@example.test"])
    watch = Watch(engine, config, ledger, servers.received)
    times: list[float] = []
    sampler = asyncio.create_task(sample_data_attempts(server, times))
    try:
        await fill_outbound(engine, rig.broker.prefix, ledger, [mail])
        async with running_relay(config) as relay:
            watch.alive = relay.check
            await watch.until_settled(15)
            await wait_until(lambda: len(times) >= server.data_attempts, 5,
                             what="the sampler to see the last DATA")
    finally:
        sampler.cancel()
    result = await reconcile(watch)

    assert result.delivered[(mail.message_id, "oncall@example.test")] == 1
    assert not result.dead
    assert server.data_attempts == 4, "three 451s, then the accepted attempt"
    assert len(times) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for attempt, gap in enumerate(gaps, start=1):
        # Never sooner than the backoff step (10 ms of sampling slack), and not much later either.
        assert step(attempt) - 0.01 <= gap <= step(attempt) + 2.0, (attempt, gaps)


async def test_550_for_a_recipient_dead_letters_at_once_with_the_reply(rig: Rig, servers: Servers) -> None:
    server = servers.make()
    server.reply_to_rcpt("nobody@example.test", "550 5.1.1 no such user here")
    config, engine = await rig.open(relay_settings(rig.broker, server, backoff=BACKOFF, max_attempts=5))
    ledger = Ledger()
    refused = new_mail(["nobody@example.test"])
    fine = new_mail(["oncall@example.test"])
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, [refused, fine])
    async with running_relay(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(15)
    result = await reconcile(watch)

    dead = result.dead_letter(refused.message_id)
    reason = str(dead.headers["x-dead-reason"])
    assert "550" in reason and "no such user here" in reason
    assert dead.headers["x-dead-kind"] == "mail"
    assert dead.headers["x-attempts"] == 1
    assert [(reply, rcpts) for _, reply, rcpts, *_ in history(dead)] == [(reason, ["nobody@example.test"])]
    assert dead.body == refused.raw, "a dead letter keeps the mail as it was"
    rcpts = sum(c.commands.count("RCPT") for c in server.connections)
    assert rcpts == 2, "one RCPT each: the refused recipient was not tried again"
    assert server.data_attempts == 1
    assert result.delivered[(fine.message_id, "oncall@example.test")] == 1


async def test_mixed_recipients_each_end_right_and_nobody_gets_two(rig: Rig, servers: Servers) -> None:
    server = servers.make()
    server.reply_to_rcpt("gone@example.test", "550 5.1.1 mailbox gone")
    server.reply_to_rcpt("busy@example.test", "451 4.2.1 mailbox busy, later", times=1)
    config, engine = await rig.open(relay_settings(rig.broker, server, backoff=BACKOFF, max_attempts=5))
    ledger = Ledger()
    mail = new_mail(["ok@example.test", "gone@example.test", "busy@example.test"])
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, [mail])
    async with running_relay(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(15)
    result = await reconcile(watch)

    assert result.delivered[(mail.message_id, "ok@example.test")] == 1
    assert result.delivered[(mail.message_id, "busy@example.test")] == 1
    assert result.delivered[(mail.message_id, "gone@example.test")] == 0
    assert [m.rcpt_tos for m in server.received] == [("ok@example.test",), ("busy@example.test",)]
    dead = result.dead_letter(mail.message_id)
    assert json.loads(str(dead.headers["x-recipients"])) == ["gone@example.test"]
    assert "550 5.1.1 mailbox gone" in str(dead.headers["x-dead-reason"])


async def test_server_down_during_a_burst_then_back_delivers_all_once(rig: Rig, servers: Servers) -> None:
    first = servers.make(port=steady_port())
    first.stop()
    config, engine = await rig.open(relay_settings(rig.broker, first, backoff=BACKOFF, max_attempts=40))
    ledger = Ledger()
    mails = [new_mail([f"ops{i % 7}@example.test"], subject=f"burst {i}") for i in range(200)]
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, mails)
    retrying = 0
    async with running_relay(config) as relay:
        watch.alive = relay.check
        outage_ends = time.monotonic() + 1.0
        while time.monotonic() < outage_ends:
            relay.check()
            retrying = max(retrying, sum([await engine.depth(q) for q in retry_queues(config)]))
            await asyncio.sleep(0.05)  # pacing: the server stays down for the whole second, sampled
        # The smarthost comes back on the same port, with the same certificate authority.
        second = servers.make(port=first.port, ca=first.ca)
        await watch.until_settled(30)
    result = await reconcile(watch)

    assert retrying > 0, "the relay retried while the server was down"
    assert not result.dead
    assert len(second.received) == 200
    assert sum(result.delivered.values()) == 200


async def peek_held(engine: Engine, queues: list[str]) -> dict[str, Mapping[str, HeaderValue]]:
    """The headers of what waits in ``queues`` now; each message goes back where it was."""
    taken: list[Delivery] = []
    try:
        for queue in queues:
            while (delivery := await engine.get(queue)) is not None:
                taken.append(delivery)
        return {d.message.message_id: d.message.headers for d in taken}
    finally:
        for delivery in taken:
            await delivery.reject(requeue=True)


@pytest.mark.parametrize("fault", ["starttls-not-offered", "wrong-password"])
async def test_smarthost_fault_holds_mail_without_using_attempts_until_fixed(
        rig: Rig, servers: Servers, fault: str) -> None:
    ca = trustme.CA()
    port = steady_port()
    if fault == "starttls-not-offered":
        bad = servers.make(tls=TlsMode.NONE, port=port, ca=ca)
        expected = "starttls"
    else:
        bad = servers.make(password="rotated-on-the-server", port=port, ca=ca)
        expected = "auth rejected"
    max_attempts = 3
    settings = relay_settings(rig.broker, bad, backoff=BACKOFF, max_attempts=max_attempts,
                              security="starttls", password=DEFAULT_PASSWORD)
    config, engine = await rig.open(settings)
    ledger = Ledger()
    mails = [new_mail([f"ops{i}@example.test"]) for i in range(4)]
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, mails)
    async with running_relay(config) as relay:
        watch.alive = relay.check
        # Watch the retry queues until every mail was seen held more often than it may be attempted.
        seen: dict[str, Mapping[str, HeaderValue]] = {}

        async def held_often() -> bool:
            relay.check()
            for mail_id, headers in (await peek_held(engine, retry_queues(config))).items():
                assert expected in str(headers.get("x-held", "")).lower(), headers
                assert headers["x-attempts"] == 0, headers
                seen[mail_id] = headers
            return len(seen) == len(mails) and all(
                isinstance(h["x-holds"], int) and h["x-holds"] > max_attempts for h in seen.values())

        await wait_until(held_often, 20, what=f"every mail held more than {max_attempts} times",
                         diagnostics=lambda: f"seen: {seen}")
        await watch.collect()
        assert not watch.dead, [m.headers.get("x-dead-reason") for m in watch.dead]
        assert not bad.received, "the faulty server got mail"
        if fault == "starttls-not-offered":
            assert not bad.auth_attempts, "credentials were offered in clear text"

        # The fix: the smarthost is replaced by a good one on the same port, the relay keeps running.
        bad.stop()
        good = servers.make(port=port, ca=ca)
        await watch.until_settled(20)
    result = await reconcile(watch)
    assert not result.dead
    assert len(good.received) == len(mails)
    assert all(m.tls and m.auth_user == good.user for m in good.received)


def with_headers(message: Message, headers: dict[str, HeaderValue]) -> Message:
    """The message with some of its headers replaced (a mail another writer got wrong)."""
    return dataclasses.replace(message, headers={**message.headers, **headers})


async def test_malformed_messages_are_dead_lettered_as_invalid_and_mail_keeps_flowing(
        rig: Rig, servers: Servers) -> None:
    server = servers.make()
    config, engine = await rig.open(relay_settings(rig.broker, server, backoff=BACKOFF, max_attempts=5))
    prefix = rig.broker.prefix
    ledger = Ledger()
    good = [new_mail([f"ops{i}@example.test"]) for i in range(3)]
    not_mail = ledger.invalid(Message(b'{"v": 1, "hello": "world"}', message_id=f"json-{uuid.uuid4()}",
                                      content_type="application/json"))
    bad_recipients = ledger.invalid(with_headers(to_message(new_mail(["x@example.test"])),
                                                 {"x-recipients": "not json ["}))
    bad_attempts = ledger.invalid(with_headers(to_message(new_mail(["y@example.test"])), {"x-attempts": "three"}))
    reasons = {not_mail.message_id: "not an opsrelay mail", bad_recipients.message_id: "headers are malformed",
               bad_attempts.message_id: "wrong types"}
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, prefix, ledger, good[:1])
    await engine.send(outbound_queue(prefix), not_mail)
    await fill_outbound(engine, prefix, ledger, good[1:2])
    await engine.send(outbound_queue(prefix), bad_recipients)
    await engine.send(outbound_queue(prefix), bad_attempts)
    await fill_outbound(engine, prefix, ledger, good[2:])
    async with running_relay(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(15)
    result = await reconcile(watch)

    assert server.data_attempts == 3, "only the three real mails reached the server"
    for message in (not_mail, bad_recipients, bad_attempts):
        dead = result.dead_letter(message.message_id)
        assert dead.headers["x-dead-kind"] == "invalid"
        assert reasons[message.message_id] in str(dead.headers["x-dead-reason"]), dead.headers
        assert dead.headers["x-dead-from"] == outbound_queue(prefix)
        assert dead.body == message.body
    assert all(result.delivered[(m.message_id, m.recipients[0])] == 1 for m in good)


async def test_max_attempts_used_up_by_451s_dead_letters_with_every_attempt(rig: Rig, servers: Servers) -> None:
    server = servers.make()
    server.reply_to_data("451 4.3.0 try again later", times=3)  # a fourth attempt would succeed
    config, engine = await rig.open(relay_settings(rig.broker, server, backoff=BACKOFF, max_attempts=3))
    ledger = Ledger()
    mail = new_mail(["oncall@example.test"])
    watch = Watch(engine, config, ledger, servers.received)
    await fill_outbound(engine, rig.broker.prefix, ledger, [mail])
    async with running_relay(config) as relay:
        watch.alive = relay.check
        await watch.until_settled(15)
        await asyncio.sleep(0.3)  # longer than a backoff step: a stray retry would show
    result = await reconcile(watch)

    dead = result.dead_letter(mail.message_id)
    reason = str(dead.headers["x-dead-reason"])
    assert reason.startswith("gave up after 3 attempts") and "451 4.3.0 try again later" in reason
    assert dead.headers["x-attempts"] == 3
    attempts = history(dead)
    assert len(attempts) == 3
    assert all("451 4.3.0 try again later" in reply and rcpts == ["oncall@example.test"]
               for _, reply, rcpts, *_ in attempts)
    at = [datetime.strptime(a, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() for a, _, _ in attempts]
    for attempt, (earlier, later) in enumerate(itertools.pairwise(at), start=1):
        assert step(attempt) <= later - earlier <= step(attempt) + 2.0, at
    assert server.data_attempts == 3
    assert not server.received
