"""Queues written by the previous release are read, delivered and listed by this one.

The fixtures in ``tests/fixtures/legacy/`` were captured from the old code (see their README):
``queue.db`` is an embedded-queue file with five messages (a, b in outbound; c held in
``retry.30000ms``; d, e dead letters) and ``amqp_messages.json`` holds the same messages as
RabbitMQ returned them. ``expected.json`` says what a reader must decode from each.

- the embedded queue: ``mailq``, ``opsrelay queue --json``, ``opsrelay dlq list|show --json``
  read the file as it is; ``serve_forever`` with the real SMTP client delivers a, b and c to a
  real STARTTLS+AUTH server byte for byte and leaves the dead letters alone; ``replay`` puts d
  back on outbound with fresh counters and its history;
- RabbitMQ: the recorded messages, published raw under a new prefix, are listed and delivered
  the same way;
- every message of both fixtures decodes with ``from_message`` / ``decode_event``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from relay.cli.app import app
from relay.config import fast
from relay.config.models import Config
from relay.contract.envelope import DEAD_HEADERS
from relay.contract.event import decode_event, encode_event
from relay.contract.mail import OutboundMail, from_message
from relay.contract.message import HeaderValue, Message
from relay.contract.names import dead_queue, outbound_queue, retry_queue, subscription_queue, unrouted_queue
from relay.daemon.relay import Relay, relay_topology
from relay.delivery.smtp import SmtpPool
from relay.engines import open_engine
from relay.ops.dlq import list_dead, replay, show_dead
from relay.ops.stats import queue_stats
from relay.sendmail.mailq import list_queue
from tests.integration.faults import cleanup_broker, running_relay, wait_until
from tests.smtp_server import ReceivedMail, SmtpServer

pytestmark = pytest.mark.timeout(90)

LEGACY = Path(__file__).resolve().parent.parent / "fixtures" / "legacy"
EXPECTED: dict[str, Any] = json.loads((LEGACY / "expected.json").read_text(encoding="utf-8"))
AMQP_FIXTURE: dict[str, Any] = json.loads((LEGACY / "amqp_messages.json").read_text(encoding="utf-8"))
MESSAGES: dict[str, dict[str, Any]] = EXPECTED["messages"]
SQLITE_PREFIX = "opsrelay"
AMQP_PREFIX: str = AMQP_FIXTURE["prefix"]  # the prefix the captured messages were written under
BACKOFF = ["30s", "2m"]  # the fixture's retry.backoff (README)
RETRY_MS = (30_000, 120_000)
ID = {key: str(m["message_id"]) for key, m in MESSAGES.items()}
MAILS = ("a", "b", "c", "d")
DELIVERED = ("a", "b", "c")  # what waits in outbound or retry, and so must reach the server
DEAD = ("d", "e")


def raw(key: str) -> bytes:
    return base64.b64decode(MESSAGES[key]["raw_b64"])


def letter(message_id: str) -> str:
    [key] = [k for k, i in ID.items() if i == message_id]
    return key


# -- the fixtures, read without opsrelay -----------------------------------------------------------


def copy_queue_db(folder: Path) -> Path:
    """queue.db in ``folder`` (opening it in place would write -wal/-shm into the fixtures)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "queue.db"
    shutil.copyfile(LEGACY / "queue.db", copy)
    return copy


def sqlite_rows(db: Path) -> dict[str, tuple[str, Message, int | None]]:
    """letter -> (queue, message, expires_at), read with SQL as the rows are in the file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT queue, body, message_id, content_type, headers, routing_key, expires_at"
                            " FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
    found: dict[str, tuple[str, Message, int | None]] = {}
    for queue, body, message_id, content_type, headers, routing_key, expires_at in rows:
        found[letter(message_id)] = (queue, Message(bytes(body), message_id, content_type, json.loads(headers),
                                                    routing_key), expires_at)
    assert len(found) == len(rows) == 5, rows
    return found


def amqp_headers(record: Mapping[str, Any]) -> dict[str, Any]:
    """The headers as aio-pika returned them (the JSON stores 'bytes' values decoded)."""
    types: Mapping[str, str] = record["header_types"]
    headers: dict[str, Any] = {}
    for key, value in record["headers"].items():
        headers[key] = value.encode("utf-8") if types[key] == "bytes" else value
        if types[key] != "bytes":
            assert type(value).__name__ == types[key], (key, value, types[key])
    return headers


def amqp_message(record: Mapping[str, Any]) -> Message:
    """A record as the AMQP engine hands it on (bytes header values decoded to str)."""
    headers: dict[str, HeaderValue] = {k: v.decode() if isinstance(v, bytes) else v
                                       for k, v in amqp_headers(record).items()}
    props = record["properties"]
    return Message(base64.b64decode(record["body_b64"]), props["message_id"], props["content_type"], headers,
                   record["routing_key"])


def amqp_records() -> dict[str, dict[str, Any]]:
    records = {str(r["letter"]): r for r in AMQP_FIXTURE["messages"]}
    assert sorted(records) == ["a", "b", "c", "d", "e"]
    return records


# -- what expected.json says ------------------------------------------------------------------------


def decoded(mail: OutboundMail) -> dict[str, Any]:
    return {"message_id": mail.message_id, "sender": mail.sender, "recipients": list(mail.recipients),
            "attempts": mail.attempts, "holds": mail.holds, "origin": mail.origin,
            "history": [[a.at, a.reply, list(a.recipients)] for a in mail.history], "raw": mail.raw}


def expected_mail(key: str) -> dict[str, Any]:
    m = MESSAGES[key]
    return {"message_id": m["message_id"], "sender": m["sender"], "recipients": m["recipients"],
            "attempts": m["attempts"], "holds": m["holds"], "origin": m["origin"], "history": m["history"],
            "raw": raw(key)}


def dead_headers(key: str, prefix: str) -> dict[str, str]:
    return {k: str(v).replace("{prefix}", prefix) for k, v in MESSAGES[key]["dead"].items()}


def expected_summary(key: str, header_prefix: str) -> dict[str, Any]:
    """``dlq list --json``'s entry (``replayable`` aside) for dead letter ``key``."""
    m = MESSAGES[key]
    dead = dead_headers(key, header_prefix)
    if m["kind"] == "mail":
        recipients, attempts, subject = m["recipients"], m["attempts"], m["subject"]
    else:
        event = m["event"]
        program = event["process"] if event["group"] == event["process"] else f"{event['group']}:{event['process']}"
        recipients, attempts, subject = [], None, f"{program} {event['state']} on {event['host']}"
    return {"id": m["message_id"], "kind": dead["x-dead-kind"], "reason": dead["x-dead-reason"],
            "dead_at": dead["x-dead-at"], "from": dead["x-dead-from"], "recipients": recipients,
            "attempts": attempts, "subject": subject}


def expected_detail_d(header_prefix: str) -> dict[str, Any]:
    d = MESSAGES["d"]
    return {**expected_summary("d", header_prefix), "replayable": True, "not_replayable_because": None,
            "sender": d["sender"], "holds": d["holds"], "origin": d["origin"],
            "history": [{"at": at, "reply": reply, "recipients": rcpts, "smarthost": ""}
                        for at, reply, rcpts in d["history"]],
            "message_id": d["message_id"], "content_type": d["content_type"], "message": raw("d").decode()}


def assert_delivered(received: list[ReceivedMail], keys: tuple[str, ...]) -> None:
    """Each mail of ``keys`` reached the server once, byte for byte, to its envelope, over TLS."""
    got = sorted((m.content, m.mail_from, m.rcpt_tos) for m in received)
    want = sorted((raw(k), MESSAGES[k]["sender"], tuple(MESSAGES[k]["recipients"])) for k in keys)
    assert got == want, [(m.mail_from, m.rcpt_tos, m.content[:80]) for m in received]
    assert all(m.tls and m.auth_user for m in received)


# -- configuration ----------------------------------------------------------------------------------


def settings(url: str, prefix: str, server: SmtpServer) -> dict[str, Any]:
    """The fixture's config (README/capture.py), with the smarthost replaced by the test server."""
    smtp = {k: str(v) if isinstance(v, Path) else v for k, v in server.client_settings().items()}
    return {
        "host": "legacyhost",
        "broker": {"url": url, "prefix": prefix, "confirm_timeout": 2.0},
        "smtp": {**smtp, "from": "opsrelay@example.com"},
        "sendmail": {"domain": "example.com"},
        "retry": {"max_attempts": 5, "backoff": BACKOFF},
        "subscriptions": [{"name": "crashes", "to": ["oncall@example.com"]}],
    }


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def write_toml(data: Mapping[str, Any], path: Path) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    for table, values in data.items():
        if isinstance(values, dict):
            lines += ["", f"[{table}]", *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items())]
        elif isinstance(values, list):
            for item in values:
                lines += ["", f"[[{table}]]", *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in item.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli(*args: str) -> Any:
    result: Result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.exit_code, result.output)
    return json.loads(result.stdout)


# -- 1. the embedded queue ----------------------------------------------------------------------------


async def depths(config: Config) -> dict[str, int]:
    prefix = config.broker.prefix
    names = [outbound_queue(prefix), *(retry_queue(prefix, ms) for ms in RETRY_MS), dead_queue(prefix)]
    async with open_engine(config.broker.url, confirm_timeout=2.0) as engine:
        return {name: await engine.depth(name) for name in names}


async def serve_until_delivered(config: Config, server: SmtpServer, keys: tuple[str, ...]) -> None:
    """``opsrelay serve`` (serve_forever, real SmtpPool) until the server has ``keys``, then stopped."""
    async with running_relay(config) as relay:
        def arrived() -> bool:
            relay.check()
            return len(server.received) >= len(keys)

        await wait_until(arrived, 30.0, what=f"mails {', '.join(keys)} at the SMTP server",
                         diagnostics=lambda: f"received {[m.mail_from for m in server.received]}")


@pytest.mark.usefixtures("clean_environment")
def test_embedded_queue_file_of_the_previous_release(tmp_path: Path, smtp_server: SmtpServer) -> None:
    db = copy_queue_db(tmp_path / "var")
    data = settings(f"sqlite:///{db.absolute()}", SQLITE_PREFIX, smtp_server)
    config_path = write_toml(data, tmp_path / "opsrelay.toml")
    config = Config.model_validate(data)

    # mailq first: it reads the rows with SQL and moves nothing, so c is still in its retry queue
    # (an engine's take or depth would first move it to outbound: its expires_at is long past).
    out, said = io.StringIO(), list[str]()
    env = {"OPSRELAY_CONFIG": str(config_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert list_queue(fast.load(env), out, said.append) == 0, said
    lines = out.getvalue().splitlines()
    for key in ("a", "b"):
        head = lines.index(f"{ID[key]}  {len(raw(key))} bytes  <{MESSAGES[key]['sender']}>  waiting")
        assert lines[head + 1] == f"        -> {', '.join(MESSAGES[key]['recipients'])}"
    [c_line] = [n for n, line in enumerate(lines) if line.startswith(f"{ID['c']}  ")]
    assert lines[c_line] == (f"{ID['c']}  {len(raw('c'))} bytes  <{MESSAGES['c']['sender']}>  held in 0s "
                             f"(attempt 0: {MESSAGES['c']['history'][-1][1]})"), lines
    assert lines[c_line + 1] == f"        -> {', '.join(MESSAGES['c']['recipients'])}"
    assert lines[-2:] == [f"3 mail(s) waiting in {db.absolute()}", "2 dead letter(s): opsrelay dlq list"], lines

    # opsrelay queue --json. c is due: it is counted in outbound if the engine moved it first,
    # otherwise it is in retry.30000ms and listed as held. Either way the three are there.
    stats = cli("queue", "--json", "--config", str(config_path))
    ready = {q["name"]: q["ready"] for q in stats["queues"]}
    retry30, retry120 = (retry_queue(SQLITE_PREFIX, ms) for ms in RETRY_MS)
    assert ready == {outbound_queue(SQLITE_PREFIX): ready[outbound_queue(SQLITE_PREFIX)], retry30: ready[retry30],
                     retry120: 0, dead_queue(SQLITE_PREFIX): 2, unrouted_queue(SQLITE_PREFIX): 0,
                     subscription_queue(SQLITE_PREFIX, "crashes"): 0}, stats
    assert ready[outbound_queue(SQLITE_PREFIX)] + ready[retry30] == 3, stats
    held = [{"queue": retry30, "id": ID["c"], "fault": MESSAGES["c"]["x_held"], "holds": 1,
             "recipients": MESSAGES["c"]["recipients"]}]
    assert stats["held"] == (held if ready[retry30] else []), stats

    # opsrelay dlq list --json / dlq show d --json: the dead letters as they were written.
    listed = cli("dlq", "list", "--json", "--config", str(config_path))
    assert [entry.pop("replayable") for entry in listed] == [True, True], listed
    assert [entry.pop("not_replayable_because") for entry in listed] == [None, None], listed
    assert listed == [expected_summary(key, SQLITE_PREFIX) for key in DEAD]
    [shown] = cli("dlq", "show", ID["d"], "--json", "--config", str(config_path))
    headers = shown.pop("headers")
    assert shown == expected_detail_d(SQLITE_PREFIX)
    assert {k: headers[k] for k in DEAD_HEADERS} == dead_headers("d", SQLITE_PREFIX)

    # The relay delivers what waits (a, b and c, now due) and leaves the dead letters alone.
    asyncio.run(serve_until_delivered(config, smtp_server, DELIVERED))
    assert_delivered(smtp_server.received, DELIVERED)
    assert asyncio.run(depths(config)) == {outbound_queue(SQLITE_PREFIX): 0, retry30: 0, retry120: 0,
                                           dead_queue(SQLITE_PREFIX): 2}

    asyncio.run(replay_d(config))
    assert_delivered(smtp_server.received, DELIVERED)  # nothing more was sent meanwhile


async def replay_d(config: Config) -> None:
    """Replaying d puts it on outbound with its counters reset and its history kept; e stays dead."""
    prefix = config.broker.prefix
    async with open_engine(config.broker.url, confirm_timeout=2.0) as engine:
        [entry] = await show_dead(engine, prefix, ID["d"])
        assert entry.summary(prefix) == {**expected_summary("d", prefix), "replayable": True,
                                         "not_replayable_because": None}
        report = await replay(engine, prefix, [ID["d"]])
        assert [(entry.id, target) for entry, target in report.replayed] == [(ID["d"], outbound_queue(prefix))]
        assert report.refused == () and report.missing == ()
        assert [e.id for e in await list_dead(engine, prefix)] == [ID["e"]]
        assert await engine.depth(outbound_queue(prefix)) == 1
        delivery = await engine.get(outbound_queue(prefix))
        assert delivery is not None
        try:
            message = delivery.message
            assert message.message_id == ID["d"] and message.content_type == MESSAGES["d"]["content_type"]
            assert not set(DEAD_HEADERS) & set(message.headers), message.headers
            assert decoded(from_message(message)) == {**expected_mail("d"), "attempts": 0, "holds": 0}
        finally:
            await delivery.reject(requeue=True)
        assert await engine.depth(outbound_queue(prefix)) == 1


# -- 2. RabbitMQ ----------------------------------------------------------------------------------------


async def publish_raw(url: str, prefix: str) -> None:
    """Each recorded message as it was on the wire, to its role's queue under ``prefix``."""
    import aio_pika

    queues = {"outbound": outbound_queue(prefix), "retry": retry_queue(prefix, RETRY_MS[0]),
              "dead": dead_queue(prefix)}
    recorded = {role: name.replace(AMQP_PREFIX, prefix, 1) for role, name in AMQP_FIXTURE["queues"].items()}
    assert recorded == queues
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()  # publisher confirms: publish returns once it is queued
        for record in AMQP_FIXTURE["messages"]:
            props = record["properties"]
            assert record["exchange"] == "" and record["routing_key"] == record["queue"], record
            assert set(props) == {"message_id", "content_type", "delivery_mode", "priority"}, props
            message = aio_pika.Message(base64.b64decode(record["body_b64"]), headers=amqp_headers(record),
                                       message_id=props["message_id"], content_type=props["content_type"],
                                       delivery_mode=aio_pika.DeliveryMode(props["delivery_mode"]),
                                       priority=props["priority"])
            await channel.default_exchange.publish(message, routing_key=queues[record["queue_role"]])


@pytest.mark.rabbitmq
async def test_rabbitmq_messages_of_the_previous_release(amqp_url: str, prefix: str,
                                                         smtp_server: SmtpServer) -> None:
    config = Config.model_validate(settings(amqp_url, prefix, smtp_server))
    retry30 = retry_queue(prefix, RETRY_MS[0])
    try:
        async with open_engine(amqp_url, confirm_timeout=2.0) as engine:
            await engine.declare(relay_topology(config))
        await publish_raw(amqp_url, prefix)

        async with open_engine(amqp_url, confirm_timeout=2.0) as engine:
            # The dead letters, decoded as expected.json says; their x-dead-from names the queues
            # they died in, under the capture's prefix.
            entries = await list_dead(engine, prefix)
            summaries = [e.summary(prefix) for e in entries]
            d, e = summaries
            assert (d.pop("replayable"), d.pop("not_replayable_because")) == (True, None)
            # e died in another prefix's subscription queue: listed, but not replayable under this one.
            assert e.pop("replayable") is False and AMQP_PREFIX in str(e.pop("not_replayable_because"))
            assert [d, e] == [expected_summary(key, AMQP_PREFIX) for key in DEAD]
            detail = entries[0].detail(prefix)
            headers = detail.pop("headers")
            assert detail == expected_detail_d(AMQP_PREFIX)
            assert {k: headers[k] for k in DEAD_HEADERS} == dead_headers("d", AMQP_PREFIX)
            assert entries[1].event is not None and entries[1].event.to_dict() == MESSAGES["e"]["event"]
            assert entries[1].message.body == base64.b64decode(MESSAGES["e"]["body_b64"])

            stats = await queue_stats(engine, prefix, RETRY_MS, ["crashes"])
            ready = {q.name: q.ready or 0 for q in stats.queues}
            assert all(q.ready is not None for q in stats.queues), stats
            assert ready[dead_queue(prefix)] == 2 and ready[retry_queue(prefix, RETRY_MS[1])] == 0
            # c moves to outbound when its 30 s TTL (counted from our publish) runs out.
            assert ready[outbound_queue(prefix)] + ready[retry30] == 3, ready
            if ready[retry30]:
                assert [(h.id, h.fault, h.holds) for h in stats.held] == [(ID["c"], MESSAGES["c"]["x_held"], 1)]

            # The relay (serve_forever, real SmtpPool) delivers a (sendmail's) and b from outbound.
            async with running_relay(config) as relay:
                def arrived(count: int) -> bool:
                    relay.check()
                    return len(smtp_server.received) >= count

                await wait_until(lambda: arrived(2), 30.0, what="mails a and b at the SMTP server")
                # c waits out its retry TTL in RabbitMQ; take it from there (as the TTL would hand it
                # to outbound) and let a relay deliver it. If the TTL already ran out, the running
                # relay has it from outbound.
                delivery = await engine.get(retry30)
                if delivery is not None:
                    assert delivery.message.message_id == ID["c"]
                    assert decoded(from_message(delivery.message)) == expected_mail("c")
                    pool = SmtpPool(config.smtp)
                    try:
                        await Relay(config, engine, pool).handle_mail(delivery)
                    finally:
                        await pool.close()
                await wait_until(lambda: arrived(3), 40.0, what="mail c at the SMTP server")
            assert_delivered(smtp_server.received, DELIVERED)

            names = [outbound_queue(prefix), *(retry_queue(prefix, ms) for ms in RETRY_MS), dead_queue(prefix)]
            assert {n: await engine.depth(n) for n in names} == {**dict.fromkeys(names, 0), dead_queue(prefix): 2}
            assert [x.id for x in await list_dead(engine, prefix)] == [ID[k] for k in DEAD]
    finally:
        await cleanup_broker(config)


# -- 3. decoding ----------------------------------------------------------------------------------------


def test_every_legacy_message_decodes(tmp_path: Path) -> None:
    rows = sqlite_rows(copy_queue_db(tmp_path))
    records = amqp_records()
    for key, want in MESSAGES.items():
        queue, from_sqlite, expires_at = rows[key]
        from_amqp = amqp_message(records[key])
        assert queue == f"{SQLITE_PREFIX}.{want['queue']}"
        assert records[key]["queue"] == f"{AMQP_PREFIX}.{want['queue']}"
        want_expiry = EXPECTED["retry_expires_at_ms"]["queue.db c"] if key == "c" else None
        assert expires_at == want_expiry, (key, expires_at)
        for prefix, message in ((SQLITE_PREFIX, from_sqlite), (AMQP_PREFIX, from_amqp)):
            assert message.message_id == want["message_id"] and message.content_type == want["content_type"]
            dead = dead_headers(key, prefix) if want["dead"] else {}
            assert {k: message.headers.get(k) for k in DEAD_HEADERS} == {k: dead.get(k) for k in DEAD_HEADERS}
            if want["kind"] == "event":
                assert message.body == base64.b64decode(want["body_b64"])
                event = decode_event(message.body)
                assert event.to_dict() == want["event"]
                assert encode_event(event) == message.body  # and it re-encodes to the same bytes
                assert not any(k.startswith("x-opsrelay") for k in message.headers)
                continue
            assert decoded(from_message(message)) == expected_mail(key), (prefix, key)
            assert message.headers.get("x-held") == want["x_held"]
        assert from_sqlite.body == from_amqp.body
        assert sorted(from_sqlite.headers.items(), key=str) == sorted(
            {k: v.replace(AMQP_PREFIX, SQLITE_PREFIX) if isinstance(v, str) else v
             for k, v in from_amqp.headers.items()}.items(), key=str)
    assert sorted(k for k in MESSAGES if MESSAGES[k]["kind"] == "mail") == list(MAILS)
