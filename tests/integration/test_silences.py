"""Silences through the whole relay, on both engines, added and expired by another process (the CLI).

Events are published to the events exchange as a listener does; the relay runs on the test's
loop with a RecordingMailer. What must hold: a silence stops mail for the events it matches on
the next event after ``silence add`` returned, others still mail; when it ends, one summary per
subscription lists every event it held; a relay restart in the middle changes nothing.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.config.models import Config
from relay.contract.event import Event, event_message
from relay.contract.names import events_exchange, silenced_queue
from relay.daemon.relay import Relay
from relay.engines.base import Engine
from tests.brokers import Broker
from tests.doubles import RecordingMailer, SentMail
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

OPSRELAY = Path(sys.executable).parent / "opsrelay"


@dataclass
class Rig:
    broker: Broker
    prefix: str
    config_path: Path
    mailer: RecordingMailer
    publisher: Engine
    caplog: pytest.LogCaptureFixture
    relays: list[tuple[asyncio.Event, asyncio.Task[None]]]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
        return subprocess.run([str(OPSRELAY), *args, "--config", str(self.config_path)], capture_output=True,
                              text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)

    def add(self, *args: str) -> str:
        done = self.cli("silence", "add", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    async def start(self) -> Relay:
        config = Config.model_validate({
            "host": "web1", "broker": {"url": self.broker.url, "prefix": self.prefix},
            "subscriptions": [{"name": "ops", "to": ["ops@example.com"]},
                              {"name": "db", "to": ["dba@example.com"], "programs": ["db*"]}],
        })
        relay = Relay(config, await self.broker.open(), self.mailer, grace=5.0)
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        self.relays.append((stop, task))
        started = len(self.relays)
        await wait_until(lambda: self.logged("relay: consuming") >= started, 10, what="the relay to consume")
        await wait_until(lambda: self.logged("sends the summaries of silences") >= started, 10,
                         what="the relay to own the silences (the only relay running)")
        return relay

    async def stop(self) -> None:
        stop, task = self.relays[-1]
        stop.set()
        await asyncio.wait_for(task, 20)

    def logged(self, text: str) -> int:
        return sum(text in r.getMessage() for r in self.caplog.records)

    async def crash(self, process: str, group: str | None = None) -> Event:
        event = Event(host="web1", group=group or process, process=process, event="PROCESS_STATE_EXITED",
                      state="EXITED", from_state="RUNNING", expected=False, pid=4000, id=str(uuid.uuid4()))
        key, message = event_message(event)
        await self.publisher.publish(events_exchange(self.prefix), key, message)
        return event


@pytest.fixture
async def rig(broker: Broker, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Rig]:
    caplog.set_level(logging.INFO, logger="opsrelay.relay")
    path = tmp_path / "opsrelay.toml"
    path.write_text(f'host = "admin1"\n[broker]\nurl = "{broker.url}"\nprefix = "{prefix}"\n', encoding="utf-8")
    made = Rig(broker, prefix, path, RecordingMailer(), await broker.open(), caplog, [])
    yield made
    for stop, task in reversed(made.relays):
        if not task.done():
            stop.set()
            await asyncio.wait_for(task, 20)


def text_of(mail: SentMail) -> tuple[str, str]:
    message = email.message_from_bytes(mail.raw, policy=email.policy.default)
    part = message.get_body(preferencelist=("plain",))  # type: ignore[attr-defined]
    assert part is not None
    return str(message["Subject"]), str(part.get_content())


def mails_to(mailer: RecordingMailer, rcpt: str) -> list[SentMail]:
    return [m for m in mailer.sent if rcpt in m.recipients]


def summaries(mailer: RecordingMailer) -> list[SentMail]:
    return [m for m in mailer.sent if b"X-Opsrelay-Kind: silenced" in m.raw]


async def test_a_silence_from_another_process_stops_matching_mail_at_once_and_its_end_sends_one_summary(
        rig: Rig) -> None:
    await rig.start()
    silence_id = rig.add("--match", "program=web_*", "--match", "host=web1", "--for", "2h",
                         "--comment", "deploy 4711")
    assert len(silence_id) == 12
    # At once: the very next events, one matching, one not.
    web = [await rig.crash("web_1", "web"), await rig.crash("web_2", "web"), await rig.crash("web_1", "web")]
    db = await rig.crash("db1")
    await wait_until(lambda: len(mails_to(rig.mailer, "dba@example.com")) == 1, 10, what="the db mail")
    await wait_until(lambda: rig.logged("silenced by") == 3, 10, what="the three web events to be silenced")
    ops = mails_to(rig.mailer, "ops@example.com")
    assert [text_of(m)[0] for m in ops if "db1" in text_of(m)[0]] and len(ops) == 1  # ops gets db1 only
    assert not any(b"web_" in m.raw for m in rig.mailer.sent)
    assert db.id.encode() in ops[0].raw

    listed = json.loads(rig.cli("silence", "list", "--json").stdout)
    assert [(s["id"], s["matchers"], s["comment"], s["active"]) for s in listed] == [
        (silence_id, ["program=web_*", "host=web1"], "deploy 4711", True)]

    expired = rig.cli("silence", "expire", silence_id)
    assert expired.returncode == 0, expired.stderr
    await wait_until(lambda: len(summaries(rig.mailer)) == 1, 15, what="the summary mail")
    [summary] = summaries(rig.mailer)
    assert summary.recipients == ("ops@example.com",)  # the db subscription never matched web_*
    subject, body = text_of(summary)
    assert "while silenced: 3 events, 2 processes" in subject + body
    assert "2 still down" in subject and "web:web_1" in body and "web:web_2" in body
    assert "deploy 4711" in body and silence_id in body
    assert body.count("EXITED") >= 3
    await wait_until(lambda: _empty(rig), 10, what="the silenced events to be removed")
    assert rig.cli("silence", "list", "--json").stdout.strip() == "[]"
    assert len(web) == 3


async def _empty(rig: Rig) -> bool:
    return await rig.publisher.depth(silenced_queue(rig.prefix)) == 0


async def test_a_relay_restart_in_the_middle_changes_nothing(rig: Rig) -> None:
    await rig.start()
    silence_id = rig.add("--match", "process=worker", "--for", "1h", "--quiet-summary")
    kept = rig.add("--match", "program=api", "--for", "1h")
    for _ in range(3):
        await rig.crash("worker")
    await rig.crash("api")
    await wait_until(lambda: rig.logged("silenced by") == 4, 10, what="four silenced events")
    await rig.stop()
    await rig.start()  # the next relay reads the same silences from the broker
    for _ in range(2):
        await rig.crash("worker")
    await rig.crash("api")
    await wait_until(lambda: rig.logged("silenced by") == 7, 10, what="three more silenced events")
    assert rig.mailer.sent == []
    assert rig.cli("silence", "expire", silence_id).returncode == 0
    assert rig.cli("silence", "expire", kept).returncode == 0
    await wait_until(lambda: len(summaries(rig.mailer)) == 1, 15, what="the api summary")
    await wait_until(lambda: _empty(rig), 10, what="every silenced event removed, summarized or not")
    await asyncio.sleep(2.5)  # a negative check: the quiet silence sends nothing, nor a second summary
    [summary] = summaries(rig.mailer)
    assert "while silenced: 2 events, 1 process" in "".join(text_of(summary))
    assert len(rig.mailer.sent) == 1
    # After the silence: mail again.
    await rig.crash("worker")
    await wait_until(lambda: len(rig.mailer.sent) == 2, 10, what="the worker mail after the silence")


async def test_a_silence_needs_an_end_and_a_known_key(rig: Rig) -> None:
    refused = rig.cli("silence", "add", "--match", "host=web1")
    assert refused.returncode == 64 and "without an end is refused" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    unknown = rig.cli("silence", "add", "--match", "colour=red", "--for", "1h")
    assert unknown.returncode == 64 and "unknown match key 'colour'" in unknown.stderr
    missing = rig.cli("silence", "expire", "000000000000")
    assert missing.returncode != 0 and "no silence '000000000000'" in missing.stderr
    assert rig.cli("silence", "list", "--json").stdout.strip() == "[]"
