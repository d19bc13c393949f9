"""relay.ops on both engines: queue counts and held mail, browsing in place, dead letters
(list, show, replay, purge) made by the real relay from a 550 refusal, and unrouted replay.

Dead letters come from :class:`relay.daemon.Relay` handling real outbound messages with a
:class:`relay.delivery.smtp.RecordingMailer` that refuses or fails as scripted; the amqp case needs a
RabbitMQ (see tests/brokers.py) and deletes what it declared afterwards.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from relay.config.models import Config
from relay.contract.event import CONTENT_TYPE, Event, encode_event
from relay.contract.keys import event_key
from relay.contract.mail import OutboundMail, dead_letter, from_message, to_message
from relay.contract.message import Message
from relay.contract.names import (
    dead_queue,
    events_exchange,
    outbound_queue,
    retry_queue,
    subscription_queue,
    unrouted_queue,
)
from relay.daemon.relay import Relay, relay_topology
from relay.engines.base import Engine
from relay.errors import SMTPSecurityError, SMTPTemporaryError
from relay.ops.browse import browse
from relay.ops.dlq import DeadEntry, list_dead, purge, replay, show_dead
from relay.ops.stats import queue_stats
from relay.ops.unrouted import replay_unrouted
from relay.render.mime import build_message
from tests.brokers import Broker, settled_depth
from tests.doubles import RecordingMailer
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0
REFUSED = "nobody@example.com"
SUBJECT = "disk full on wëb1"  # non-ASCII: encoded in the mail (RFC 2047), decoded in the listing
CRASHES = {"name": "crashes", "to": ["oncall@example.com"], "states": ["FATAL"], "unexpected_only": False}
LATE = {"name": "late", "to": ["late@example.com"], "states": ["RUNNING"], "unexpected_only": False}


def make_config(url: str, prefix: str, *subscriptions: dict[str, Any]) -> Config:
    return Config.model_validate({
        "host": "relay", "broker": {"url": url, "prefix": prefix},
        "smtp": {"host": "127.0.0.1", "security": "none", "from": "alerts@example.com"},
        # One long step: whatever goes to retry stays there for the whole test.
        "retry": {"max_attempts": 2, "backoff": ["60s"]},
        "subscriptions": list(subscriptions or [CRASHES]),
    })


@dataclass
class Env:
    """The test's broker (the conftest's, on both engines), an engine on it and a relay config."""

    broker: Broker
    engine: Engine
    config: Config
    mailer: RecordingMailer = field(default_factory=RecordingMailer)

    @property
    def kind(self) -> str:
        return self.broker.kind

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def prefix(self) -> str:
        return self.broker.prefix

    @property
    def relay(self) -> Relay:
        return Relay(self.config, self.engine, self.mailer)

    async def declare(self, config: Config) -> None:
        await self.broker.declare(self.engine, relay_topology(config))


@pytest.fixture
async def env(broker: Broker) -> Env:
    made = Env(broker, await broker.open(), make_config(broker.url, broker.prefix))
    await made.declare(made.config)
    return made


# -- making realistic messages ----------------------------------------------------------------


def mail(to: str = REFUSED, subject: str = SUBJECT) -> OutboundMail:
    raw = build_message(sender="alerts@example.com", to=[to], subject=subject, body="the disk is full\n")
    return OutboundMail(sender="alerts@example.com", recipients=(to,), raw=raw, origin="sendmail")


async def handle_next_mail(env: Env, queue: str | None = None) -> None:
    """The relay takes the next mail from ``queue`` (outbound) and applies its delivery plan."""
    delivery = await env.engine.get(queue or outbound_queue(env.prefix))
    assert delivery is not None
    await env.relay.handle_mail(delivery)


async def dead_mail(env: Env, to: str = REFUSED, subject: str = SUBJECT) -> OutboundMail:
    """A mail the smarthost refuses with 550: the relay dead-letters it after one attempt."""
    env.mailer.refuse(to, 550, "5.1.1 no such user")
    queued = mail(to, subject)
    await env.engine.send(outbound_queue(env.prefix), to_message(queued))
    await handle_next_mail(env)
    return queued


def event(process: str = "worker", state: str = "FATAL", host: str = "web1") -> Event:
    return Event(host=host, group=process, process=process, event=f"PROCESS_STATE_{state}", state=state,
                 from_state="RUNNING", expected=False, pid=42)


async def publish_event(env: Env, ev: Event) -> None:
    # As listeners/publish.py does it.
    await env.engine.publish(events_exchange(env.prefix), event_key(ev.host, ev.group, ev.process, ev.state),
                             Message(encode_event(ev), message_id=ev.id, content_type=CONTENT_TYPE))


async def dead_event(env: Env, ev: Event) -> None:
    """An event the relay could not turn into mail, dead-lettered as the daemon does (kind event)."""
    await publish_event(env, ev)
    queue = subscription_queue(env.prefix, "crashes")
    delivery = await env.engine.get(queue)
    assert delivery is not None
    await env.engine.send(dead_queue(env.prefix), dead_letter(
        delivery.message, reason="subscription crashes: template failed on this event", source=queue,
        kind="event"))
    await delivery.ack()


async def dead_invalid(env: Env) -> None:
    """Garbage on the events exchange: the running relay dead-letters it as invalid."""
    await env.engine.publish(events_exchange(env.prefix), "proc.web1.x.x.FATAL",
                             Message(b"not json at all", message_id="garbage-1", content_type=CONTENT_TYPE))
    before = await env.engine.depth(dead_queue(env.prefix))
    stop = asyncio.Event()
    running = asyncio.create_task(env.relay.run(stop))
    try:
        await wait_until(lambda: dead_count_is(env, before + 1), WAIT, what="the garbage to be dead-lettered")
    finally:
        stop.set()
        await running


async def dead_count_is(env: Env, count: int) -> bool:
    return await env.engine.depth(dead_queue(env.prefix)) == count


async def drain(engine: Engine, queue: str) -> list[Message]:
    taken = []
    while (delivery := await engine.get(queue)) is not None:
        taken.append(delivery.message)
        await delivery.ack()
    return taken


def by_kind(entries: list[DeadEntry]) -> dict[str, DeadEntry]:
    return {e.kind: e for e in entries}


# -- queue_stats and browse -------------------------------------------------------------------


async def test_queue_stats_counts_every_queue_and_the_held_mail(env: Env) -> None:
    p = env.prefix
    # One attempt fails for now (451: retry), one finds the smarthost misconfigured (held).
    fault = "STARTTLS not offered by smtp.example.com"
    env.mailer.script(SMTPTemporaryError(451, "4.3.0 try later"), SMTPSecurityError(fault))
    for to in ("later@example.com", "held@example.com"):
        await env.engine.send(outbound_queue(p), to_message(mail(to)))
        await handle_next_mail(env)
    await dead_mail(env)
    for n in range(2):
        await env.engine.send(outbound_queue(p), to_message(mail(f"waiting{n}@example.com")))
    await publish_event(env, event(state="FATAL"))  # bound: crashes
    await publish_event(env, event(state="RUNNING"))  # nobody's: unrouted

    stats = await queue_stats(env.engine, p, [60_000], ["crashes", "ghost"])

    assert [(q.role, q.name, q.ready) for q in stats.queues] == [
        ("outbound", outbound_queue(p), 2),
        ("retry", retry_queue(p, 60_000), 2),
        ("dead", dead_queue(p), 1),
        ("unrouted", unrouted_queue(p), 1),
        ("subscription", subscription_queue(p, "crashes"), 1),
        ("subscription", subscription_queue(p, "ghost"), None),  # never declared
    ]
    (held,) = stats.held
    assert (held.queue, held.fault, held.holds, held.recipients) == (
        retry_queue(p, 60_000), fault, 1, ("held@example.com",))
    assert stats.to_dict()["held"][0]["fault"] == fault
    # Looking did not take anything away.
    assert await settled_depth(env.engine, retry_queue(p, 60_000), 2) == 2
    assert sorted(m.headers.get("x-held") is not None for m in await drain(env.engine, retry_queue(p, 60_000))) \
        == [False, True]


async def test_browse_leaves_every_message_in_place_and_in_order(env: Env) -> None:
    """Documents the order: a browse requeues each message at its old place on both engines
    (SQLite keeps the row; RabbitMQ classic queues keep publication order across requeues)."""
    queue = dead_queue(env.prefix)
    sent = [Message(f"m{n}".encode(), message_id=f"m{n}") for n in range(5)]
    for message in sent:
        await env.engine.send(queue, message)

    first = await browse(env.engine, queue)
    await settled_depth(env.engine, queue, 5)  # the browse's requeues settled (asserted below)
    second = await browse(env.engine, queue)

    assert [m.message_id for m in first] == [m.message_id for m in second] == ["m0", "m1", "m2", "m3", "m4"]
    assert await settled_depth(env.engine, queue, 5) == 5
    assert [m.body for m in await drain(env.engine, queue)] == [m.body for m in sent]


async def test_browse_of_a_missing_queue_is_empty_and_harmless(env: Env) -> None:
    assert await browse(env.engine, f"{env.prefix}.nothing") == []
    # On RabbitMQ a passive declare of a missing queue closes its channel: the engine still works.
    await env.engine.send(outbound_queue(env.prefix), to_message(mail()))
    assert await env.engine.depth(outbound_queue(env.prefix)) == 1


# -- list and show ------------------------------------------------------------------------------


async def test_list_dead_summarises_mail_event_and_invalid(env: Env) -> None:
    dead = await dead_mail(env)
    ev = event(process="db")
    await dead_event(env, ev)
    await dead_invalid(env)

    entries = await list_dead(env.engine, env.prefix)

    assert [e.kind for e in entries] == ["mail", "event", "invalid"]
    kinds = by_kind(entries)
    m = kinds["mail"].summary(env.prefix)
    assert m["id"] == dead.message_id
    assert m["reason"] == "550 5.1.1 no such user"
    assert m["from"] == outbound_queue(env.prefix)
    assert (m["recipients"], m["attempts"], m["subject"], m["replayable"]) == ([REFUSED], 1, SUBJECT, True)
    assert m["dead_at"].endswith("Z")
    e = kinds["event"].summary(env.prefix)
    assert (e["id"], e["from"], e["subject"], e["replayable"]) == (
        ev.id, subscription_queue(env.prefix, "crashes"), "db FATAL on web1", True)
    assert (e["recipients"], e["attempts"]) == ([], None)
    i = kinds["invalid"].summary(env.prefix)
    assert i["id"] == "garbage-1" and "not JSON" in i["reason"]
    assert i["replayable"] is False and "cannot be replayed" in i["not_replayable_because"]
    # Listing is not consuming.
    assert await settled_depth(env.engine, dead_queue(env.prefix), 3) == 3


async def test_show_dead_has_every_attempt_and_the_message(env: Env) -> None:
    env.mailer.script(SMTPTemporaryError(451, "4.3.0 greylisted"))
    env.mailer.refuse(REFUSED, 550, "5.1.1 no such user")
    queued = mail()
    await env.engine.send(outbound_queue(env.prefix), to_message(queued))
    await handle_next_mail(env)  # 451: to the retry queue
    # What the retry queue's TTL would do after 60s (the engine contract tests the TTL itself).
    await handle_next_mail(env, retry_queue(env.prefix, 60_000))  # 550: dead

    (entry,) = await show_dead(env.engine, env.prefix, queued.message_id)
    detail = entry.detail(env.prefix)

    assert detail["attempts"] == 2
    assert [(a["reply"], a["recipients"]) for a in detail["history"]] == [
        ("451 4.3.0 greylisted", [REFUSED]), ("550 5.1.1 no such user", [REFUSED])]
    assert detail["sender"] == "alerts@example.com" and detail["origin"] == "sendmail"
    assert "Subject: disk full on =?utf-8?q?w=C3=ABb1?=" in detail["message"]  # the raw mail, as queued
    assert "the disk is full" in detail["message"]
    assert detail["headers"]["x-dead-kind"] == "mail"
    assert await show_dead(env.engine, env.prefix, "no-such-id") == []


# -- replay and purge ---------------------------------------------------------------------------


async def test_replay_sends_a_dead_mail_to_outbound_with_fresh_attempts(env: Env) -> None:
    dead = await dead_mail(env)
    other = await dead_mail(env, "other@example.com")

    report = await replay(env.engine, env.prefix, [dead.message_id])

    assert [(e.id, target) for e, target in report.replayed] == [(dead.message_id, outbound_queue(env.prefix))]
    assert (report.refused, report.missing) == ((), ())
    # It left the dead-letter queue; the other one did not.
    assert [e.id for e in await list_dead(env.engine, env.prefix)] == [other.message_id]
    (again,) = await drain(env.engine, outbound_queue(env.prefix))
    assert not any(key.startswith("x-dead-") for key in again.headers)
    fresh = from_message(again)
    assert (fresh.message_id, fresh.recipients, fresh.raw) == (dead.message_id, (REFUSED,), dead.raw)
    assert (fresh.attempts, fresh.holds) == (0, 0)
    assert [a.reply for a in fresh.history] == ["550 5.1.1 no such user"]  # history kept

    # The address was fixed: the relay now delivers it.
    env.mailer.refusals.clear()
    await env.engine.send(outbound_queue(env.prefix), again)
    await handle_next_mail(env)
    assert [(s.recipients, s.raw) for s in env.mailer.sent] == [((REFUSED,), dead.raw)]
    assert await settled_depth(env.engine, dead_queue(env.prefix), 1) == 1


async def test_replay_sends_a_dead_event_back_to_its_subscription(env: Env) -> None:
    ev = event()
    await dead_event(env, ev)

    report = await replay(env.engine, env.prefix, None)

    sub = subscription_queue(env.prefix, "crashes")
    assert [(e.kind, target) for e, target in report.replayed] == [("event", sub)]
    assert await settled_depth(env.engine, dead_queue(env.prefix), 0) == 0
    delivery = await env.engine.get(sub)
    assert delivery is not None
    assert (delivery.message.body, delivery.message.message_id) == (encode_event(ev), ev.id)
    assert not any(key.startswith("x-dead-") for key in delivery.message.headers)
    # And the relay renders it into a mail as if it had never died.
    await env.relay.handle_event(env.config.subscriptions[0], delivery)
    (rendered,) = await drain(env.engine, outbound_queue(env.prefix))
    assert from_message(rendered).recipients == ("oncall@example.com",)


async def test_invalid_dead_letters_are_not_replayed_and_stay(env: Env) -> None:
    await dead_invalid(env)
    dead = await dead_mail(env)

    by_id = await replay(env.engine, env.prefix, ["garbage-1", "missing-1"])
    assert [(e.id, "cannot be replayed" in why) for e, why in by_id.refused] == [("garbage-1", True)]
    assert (by_id.replayed, by_id.missing) == ((), ("missing-1",))

    every = await replay(env.engine, env.prefix, None)
    assert [e.id for e, _ in every.replayed] == [dead.message_id]
    assert [e.id for e, _ in every.refused] == ["garbage-1"]
    assert [e.id for e in await list_dead(env.engine, env.prefix)] == ["garbage-1"]


async def test_a_replay_that_cannot_be_sent_keeps_the_dead_letter(env: Env) -> None:
    """The copy is published before the dead letter is acked: a refused publish loses nothing."""
    ev = event()
    await publish_event(env, ev)
    delivery = await env.engine.get(subscription_queue(env.prefix, "crashes"))
    assert delivery is not None
    gone = subscription_queue(env.prefix, "removed")  # a subscription since taken out of the config
    await env.engine.send(dead_queue(env.prefix), dead_letter(delivery.message, reason="x", source=gone,
                                                               kind="event"))
    await delivery.ack()

    report = await replay(env.engine, env.prefix, [ev.id])

    ((entry, why),) = report.refused
    assert entry.id == ev.id and gone in why
    assert report.replayed == ()
    assert [e.id for e in await list_dead(env.engine, env.prefix)] == [ev.id]


async def test_purge_removes_the_named_ones_then_all(env: Env) -> None:
    first = await dead_mail(env)
    second = await dead_mail(env, "two@example.com")
    await dead_invalid(env)

    named = await purge(env.engine, env.prefix, [first.message_id, "missing-1"])
    assert ([e.id for e in named.purged], named.missing) == ([first.message_id], ("missing-1",))
    assert [e.id for e in await list_dead(env.engine, env.prefix)] == [second.message_id, "garbage-1"]

    every = await purge(env.engine, env.prefix, None)
    assert [e.id for e in every.purged] == [second.message_id, "garbage-1"]
    assert await settled_depth(env.engine, dead_queue(env.prefix), 0) == 0
    assert await list_dead(env.engine, env.prefix) == []


# -- unrouted ------------------------------------------------------------------------------------


async def test_replay_unrouted_reaches_a_new_subscription_and_the_rest_stays_once(env: Env) -> None:
    running = [event(process=f"app{n}", state="RUNNING") for n in range(3)]
    stopped = event(process="cron", state="STOPPED")
    for ev in [*running, stopped]:
        await publish_event(env, ev)
    assert await env.engine.depth(unrouted_queue(env.prefix)) == 4

    # A subscription for RUNNING is added (serve, or `opsrelay unrouted replay`, declares it).
    await env.declare(make_config(env.url, env.prefix, CRASHES, LATE))
    report = await replay_unrouted(env.engine, env.prefix)

    assert (report.replayed, report.remaining) == (4, 1)
    late = await drain(env.engine, subscription_queue(env.prefix, "late"))
    assert sorted(m.message_id for m in late) == sorted(ev.id for ev in running)
    assert all(m.routing_key.endswith(".RUNNING") for m in late)
    assert [m.message_id for m in await drain(env.engine, unrouted_queue(env.prefix))] == [stopped.id]
    assert await env.engine.depth(subscription_queue(env.prefix, "crashes")) == 0


async def test_replay_unrouted_with_nothing_matching_moves_each_event_once(env: Env) -> None:
    evs = [event(process=f"p{n}", state="STOPPED") for n in range(3)]
    for ev in evs:
        await publish_event(env, ev)

    report = await replay_unrouted(env.engine, env.prefix)

    assert (report.replayed, report.remaining) == (3, 3)
    assert [m.message_id for m in await drain(env.engine, unrouted_queue(env.prefix))] == [ev.id for ev in evs]
