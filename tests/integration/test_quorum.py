"""broker.queue_type = "quorum" on a real RabbitMQ: the layout, a classic layout refused in one line and
migrated, and a message that keeps killing its consumer ending in dead with the reason.

Queue types are read back from the broker itself (``rabbitmqctl list_queues name type``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.config.models import Config
from relay.contract.event import Event, event_message
from relay.contract.names import dead_queue, events_exchange, outbound_queue, retry_queue, subscription_queue
from relay.daemon.relay import Relay, relay_topology
from relay.engines import open_engine
from relay.engines.base import Engine
from relay.errors import ConfigurationError
from tests.brokers import delete_topology
from tests.doubles import RecordingMailer
from tests.integration.faults import new_mail, write_toml
from tests.waiting import wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(90)]

OPSRELAY = Path(sys.executable).parent / "opsrelay"


def queue_types(prefix: str) -> dict[str, str]:
    done = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "type", "--formatter", "json"],
                          capture_output=True, text=True, check=True, timeout=60)
    return {q["name"]: q["type"] for q in json.loads(done.stdout) if q["name"].startswith(f"{prefix}.")}


def settings(amqp_url: str, prefix: str, queue_type: str, **broker: Any) -> dict[str, Any]:
    return {"host": "qhost", "broker": {"url": amqp_url, "prefix": prefix, "queue_type": queue_type, **broker},
            "retry": {"backoff": ["200ms"]},
            "subscriptions": [{"name": "ops", "to": ["ops@example.test"]},
                              {"name": "digest", "to": ["ops@example.test"], "group_wait": "1h"}]}


@pytest.fixture
async def cleanup(amqp_url: str, prefix: str) -> AsyncIterator[list[Config]]:
    configs: list[Config] = []
    yield configs
    for config in configs:
        topology = relay_topology(config)
        await delete_topology(amqp_url, topology)


def cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    return subprocess.run([str(OPSRELAY), *args, "--config", str(path)], capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)


def crash_event(n: int) -> Event:
    return Event(host="qhost", group="web", process="web", event="PROCESS_STATE_EXITED", state="EXITED",
                 from_state="RUNNING", expected=False, pid=100 + n, id=str(uuid.uuid4()))


async def open_for(config: Config) -> Engine:
    engine = open_engine(config.broker.url, **config.broker.engine_options)
    await engine.connect()
    return engine


async def test_every_durable_queue_is_quorum_and_mail_flows(
        amqp_url: str, prefix: str, cleanup: list[Config]) -> None:
    config = Config.model_validate(settings(amqp_url, prefix, "quorum"))
    cleanup.append(config)
    engine = await open_for(config)
    mailer = RecordingMailer()
    relay = Relay(config, engine, mailer, grace=5.0)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        publisher = await open_for(config)
        await wait_until(lambda: relay._all_subscribed(), 10, what="the relay to consume")
        key, message = event_message(crash_event(1))
        await publisher.publish(events_exchange(prefix), key, message)
        await wait_until(lambda: len(mailer.sent) == 1, 10, what="the crash mail")
        await publisher.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await engine.close()
    types = queue_types(prefix)
    expected = {outbound_queue(prefix), dead_queue(prefix), retry_queue(prefix, 200), f"{prefix}.unrouted",
                subscription_queue(prefix, "ops"), f"{prefix}.state.digest", f"{prefix}.silences",
                f"{prefix}.silenced", f"{prefix}.relays", f"{prefix}.silences.owner"}
    assert expected <= set(types), sorted(types)
    assert {name: types[name] for name in expected} == dict.fromkeys(expected, "quorum")


async def test_a_classic_layout_is_refused_in_one_line_then_migrated_with_its_messages(
        amqp_url: str, prefix: str, cleanup: list[Config], tmp_path: Path) -> None:
    classic = Config.model_validate(settings(amqp_url, prefix, "classic"))
    quorum = Config.model_validate(settings(amqp_url, prefix, "quorum"))
    cleanup.append(quorum)
    old = await open_for(classic)
    await old.declare(relay_topology(classic))
    mails = [new_mail([f"u{n}@example.test"]) for n in range(3)]
    from relay.contract.mail import to_message

    for mail in mails:
        await old.send(outbound_queue(prefix), to_message(mail))
    events = [crash_event(n) for n in range(2)]
    for event in events:
        key, message = event_message(event)
        await old.publish(events_exchange(prefix), key, message)
    await old.close()

    new = await open_for(quorum)
    with pytest.raises(ConfigurationError) as refused:
        await new.declare(relay_topology(quorum))
    line = str(refused.value)
    assert "\n" not in line and "migrate-queues" in line and "queue_type is 'quorum'" in line
    assert f"queue {prefix}." in line
    await new.close()
    path = write_toml(settings(amqp_url, prefix, "quorum"), tmp_path / "opsrelay.toml")
    serve = await asyncio.to_thread(cli, path, "serve")
    assert serve.returncode == 78 and "migrate-queues" in serve.stderr, serve.stderr

    migrated = cli(path, "migrate-queues")
    assert migrated.returncode == 0, migrated.stderr
    assert f"{outbound_queue(prefix)}: now quorum, 3 message(s) kept" in migrated.stdout
    assert f"{subscription_queue(prefix, 'ops')}: now quorum, 2 message(s) kept" in migrated.stdout
    types = queue_types(prefix)
    assert types[outbound_queue(prefix)] == types[subscription_queue(prefix, "ops")] == "quorum"
    assert not any(name.endswith(".migrating") for name in types)
    again = cli(path, "migrate-queues")
    assert again.returncode == 0 and "every queue is already quorum" in again.stdout

    # The same messages, and the bindings are back: the relay on quorum delivers them all.
    engine = await open_for(quorum)
    mailer = RecordingMailer()
    stop = asyncio.Event()
    relay = Relay(quorum, engine, mailer, grace=5.0)
    task = asyncio.create_task(relay.run(stop))
    try:
        await wait_until(lambda: len(mailer.sent) == 5, 15, what="3 mails and 2 crash mails")
        key, message = event_message(crash_event(9))
        await engine.publish(events_exchange(prefix), key, message)
        await wait_until(lambda: len(mailer.sent) == 6, 10, what="a new event through the restored binding")
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await engine.close()
    recipients = sorted(r for m in mailer.sent for r in m.recipients)
    assert recipients == sorted(["u0@example.test", "u1@example.test", "u2@example.test", *["ops@example.test"] * 3])


CRASHING_CONSUMER = """
import asyncio, os, sys
import aio_pika
async def main():
    connection = await aio_pika.connect(sys.argv[1])
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1)
    queue = await channel.declare_queue(sys.argv[2], passive=True)
    async with queue.iterator() as deliveries:
        async for delivery in deliveries:
            print(delivery.headers.get("x-delivery-count"), flush=True)
            os._exit(3)   # dies holding it, as a relay that crashes on this message
asyncio.run(main())
"""


async def test_a_message_that_kills_its_consumer_every_time_ends_in_dead_with_the_reason(
        amqp_url: str, prefix: str, cleanup: list[Config], tmp_path: Path) -> None:
    config = Config.model_validate(settings(amqp_url, prefix, "quorum", delivery_limit=3))
    cleanup.append(config)
    engine = await open_for(config)
    await engine.declare(relay_topology(config))
    poison = crash_event(0)
    key, message = event_message(poison)
    await engine.publish(events_exchange(prefix), key, message)
    queue = subscription_queue(prefix, "ops")
    counts = []
    for _ in range(4):
        crashed = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", CRASHING_CONSUMER, amqp_url, queue],
                                          capture_output=True, text=True, timeout=30)
        assert crashed.returncode == 3, crashed.stderr
        counts.append(crashed.stdout.strip())
        if await engine.depth(queue) == 0 and await engine.depth(dead_queue(prefix)) == 1:
            break
    await wait_until(lambda: _dead(engine, prefix), 10, what="the poison event in dead")
    assert await engine.depth(queue) == 0
    await engine.close()
    path = write_toml(settings(amqp_url, prefix, "quorum", delivery_limit=3), tmp_path / "opsrelay.toml")
    listed = cli(path, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["id"] == poison.id and entry["kind"] == "event" and entry["from"] == queue
    assert entry["reason"].startswith("delivery_limit: ") and "kept killing the relay" in entry["reason"]
    assert entry["replayable"] is True
    print(f"\npoison event: delivered {len(counts)} time(s) (x-delivery-count {counts}) before dead")


async def _dead(engine: Engine, prefix: str) -> bool:
    return await engine.depth(dead_queue(prefix)) == 1
