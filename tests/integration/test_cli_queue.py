"""``opsrelay queue``, ``dlq list|show|replay|purge`` and ``unrouted list|replay`` through typer's
CliRunner: text and --json output, and exit codes (0, 1 not found, 64 usage, 75 broker, 78 config).

The queue is the embedded SQLite engine in a tmp dir, filled by the real relay
(:class:`relay.daemon.Relay` with a :class:`relay.delivery.smtp.RecordingMailer` refusing with 550 or
failing on the smarthost's TLS); one round trip runs on RabbitMQ as well.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from relay.cli.app import app
from relay.config.models import Config, load_config
from relay.contract.event import CONTENT_TYPE, Event, encode_event
from relay.contract.keys import event_key
from relay.contract.mail import OutboundMail, dead_letter, from_message, to_message
from relay.contract.message import Message
from relay.contract.names import events_exchange, outbound_queue, subscription_queue
from relay.daemon.relay import Relay, relay_topology
from relay.engines import open_engine
from relay.errors import SMTPSecurityError
from relay.render.mime import build_message
from tests.brokers import delete_topology
from tests.doubles import RecordingMailer
from tests.smtp_server import free_port

# clean_environment: no OPSRELAY_* from the caller, no config on the search path (the conftest's).
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("clean_environment")]

EX_FAILED, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 1, 64, 75, 78
REFUSED = "nobody@example.com"
FAULT = "STARTTLS not offered by smtp.example.com"
CRASHES = '[[subscriptions]]\nname = "crashes"\nto = ["oncall@example.com"]\nstates = ["FATAL"]\n'
LATE = '[[subscriptions]]\nname = "late"\nto = ["late@example.com"]\nstates = ["RUNNING"]\nunexpected_only = false\n'


def write_config(tmp_path: Path, *, url: str | None = None, prefix: str = "ops", subscriptions: str = CRASHES,
                 name: str = "opsrelay.toml") -> Path:
    url = url or f"sqlite:///{tmp_path}/queue.db"
    path = tmp_path / name
    path.write_text(f'host = "web1"\n[broker]\nurl = "{url}"\nprefix = "{prefix}"\n'
                    '[smtp]\nhost = "127.0.0.1"\nsecurity = "none"\nfrom = "alerts@example.com"\n'
                    f'[retry]\nmax_attempts = 2\nbackoff = ["60s"]\n{subscriptions}', encoding="utf-8")
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def mail(to: str) -> OutboundMail:
    raw = build_message(sender="alerts@example.com", to=[to], subject=f"report for {to}", body="hello\n")
    return OutboundMail(sender="alerts@example.com", recipients=(to,), raw=raw, origin="sendmail")


def event(process: str, state: str) -> Event:
    return Event(host="web1", group=process, process=process, event=f"PROCESS_STATE_{state}", state=state,
                 expected=False, pid=7)


@dataclass(frozen=True)
class State:
    config: Path
    dead_mail: str
    dead_event: str
    invalid: str
    held: str


async def fill(cfg: Config) -> tuple[str, str, str, str]:
    """What a day of trouble leaves: a held mail, a refused one, a waiting one, a failed event, garbage."""
    prefix = cfg.broker.prefix
    async with open_engine(cfg.broker.url) as engine:
        await engine.declare(relay_topology(cfg))
        mailer = RecordingMailer([SMTPSecurityError(FAULT)])
        mailer.refuse(REFUSED, 550, "5.1.1 no such user")
        relay = Relay(cfg, engine, mailer)
        held, dead = mail("held@example.com"), mail(REFUSED)
        for queued in (held, dead):
            await engine.send(outbound_queue(prefix), to_message(queued))
            delivery = await engine.get(outbound_queue(prefix))
            assert delivery is not None
            await relay.handle_mail(delivery)
        await engine.send(outbound_queue(prefix), to_message(mail("waiting@example.com")))
        # Dead-lettered as the daemon does: an event that failed rendering, and garbage.
        sub = subscription_queue(prefix, "crashes")
        ev = event("db", "FATAL")
        await engine.send(sub, Message(encode_event(ev), ev.id, CONTENT_TYPE))
        await engine.send(sub, Message(b"\xff not json", "garbage-1", CONTENT_TYPE))
        for kind in ("event", "invalid"):
            delivery = await engine.get(sub)
            assert delivery is not None
            await engine.send(f"{prefix}.dead", dead_letter(delivery.message, reason=f"{kind} reason",
                                                            source=sub, kind=kind))
            await delivery.ack()
        return dead.message_id, ev.id, "garbage-1", held.message_id


@pytest.fixture
def state(tmp_path: Path) -> State:
    path = write_config(tmp_path)
    return State(path, *asyncio.run(fill(load_config(path))))


async def _drain(url: str, queue: str) -> list[Message]:
    async with open_engine(url) as engine:
        taken = []
        while (delivery := await engine.get(queue)) is not None:
            taken.append(delivery.message)
            await delivery.ack()
        return taken


def drain(config: Path, queue: str) -> list[Message]:
    return asyncio.run(_drain(load_config(config).broker.url, queue))


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output)
    return result


def dead_ids(config: Path) -> list[str]:
    return [e["id"] for e in json.loads(ok(run("dlq", "list", "--json", "--config", str(config))).stdout)]


# -- opsrelay queue --------------------------------------------------------------------------


def test_queue_shows_every_queue_and_the_held_delivery_first(state: State) -> None:
    lines = ok(run("queue", "--config", str(state.config))).stdout.splitlines()
    assert lines[0] == f"DELIVERY HELD: {FAULT} (1 mail(s) wait until the smarthost or config is fixed)"
    rows = {m[1]: (m[2], m[3]) for line in lines[1:] if (m := re.fullmatch(r"(\S+)\s+(\S+)\s+(.+)", line))}
    assert len(rows) == len(lines) - 1
    assert rows == {
        "ops.outbound": ("1", "ready to deliver"),
        "ops.retry.60000ms": ("1", "waiting to retry"),
        "ops.dead": ("3", "dead letters (opsrelay dlq list)"),
        "ops.unrouted": ("0", "events no subscription matched (opsrelay unrouted list)"),
        "ops.sub.crashes": ("0", "events to render"),
    }


def test_queue_json(state: State) -> None:
    report = json.loads(ok(run("queue", "--json", "--config", str(state.config))).stdout)
    assert {q["name"]: q["ready"] for q in report["queues"]} == {
        "ops.outbound": 1, "ops.retry.60000ms": 1, "ops.dead": 3, "ops.unrouted": 0, "ops.sub.crashes": 0}
    assert report["held"] == [{"queue": "ops.retry.60000ms", "id": state.held, "fault": FAULT, "holds": 1,
                               "recipients": ["held@example.com"]}]


def test_queue_before_the_relay_ever_ran(tmp_path: Path) -> None:
    result = ok(run("queue", "--config", str(write_config(tmp_path))))
    assert "HELD" not in result.stdout
    assert re.search(r"^ops\.outbound\s+-\s+not declared yet$", result.stdout, re.MULTILINE), result.stdout


# -- opsrelay dlq list / show -----------------------------------------------------------------


def test_dlq_list_text(state: State) -> None:
    lines = ok(run("dlq", "list", "--config", str(state.config))).stdout.splitlines()
    assert lines[0] == "3 dead letter(s) in ops.dead"
    assert re.fullmatch(rf"{state.dead_mail}  mail  \S+Z  1 attempt\(s\)  to {REFUSED}  'report for {REFUSED}'",
                        lines[1]), lines[1]
    assert lines[2] == "    550 5.1.1 no such user"
    assert re.fullmatch(rf"{state.dead_event}  event  \S+Z  from ops.sub.crashes  'db FATAL on web1'", lines[3])
    assert lines[5].startswith(f"{state.invalid}  invalid  ")
    assert len(lines) == 7


def test_dlq_list_json(state: State) -> None:
    entries = json.loads(ok(run("dlq", "list", "--json", "--config", str(state.config))).stdout)
    assert [(e["id"], e["kind"], e["replayable"]) for e in entries] == [
        (state.dead_mail, "mail", True), (state.dead_event, "event", True), (state.invalid, "invalid", False)]
    assert (entries[0]["recipients"], entries[0]["attempts"], entries[0]["reason"]) == (
        [REFUSED], 1, "550 5.1.1 no such user")
    # Listing leaves them in place.
    assert dead_ids(state.config) == [state.dead_mail, state.dead_event, state.invalid]


def test_dlq_show_text(state: State) -> None:
    out = ok(run("dlq", "show", state.dead_mail, "--config", str(state.config))).stdout
    head, _, message = out.partition("--- message ---\n")
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in head.splitlines() if line[0] != " ")}
    assert fields.pop("dead at").endswith("Z")
    assert fields.pop("history") == ""
    assert fields == {
        "id": state.dead_mail, "kind": "mail", "from queue": "ops.outbound",
        "reason": "550 5.1.1 no such user", "sender": "alerts@example.com", "subject": f"report for {REFUSED}",
        "recipients": REFUSED, "attempts": "1 (held 0 time(s))", "replayable": "yes"}
    assert re.search(rf"^  1\. \S+Z  {REFUSED}: 550 5\.1\.1 no such user$", head, re.MULTILINE)
    assert f"\nTo: {REFUSED}\nSubject: report for {REFUSED}\n" in message and "\r" not in message
    assert message.endswith("\n\nhello\n")


def test_dlq_show_json_and_invalid(state: State) -> None:
    (detail,) = json.loads(ok(run("dlq", "show", state.invalid, "--json", "--config", str(state.config))).stdout)
    assert (detail["kind"], detail["replayable"], detail["reason"]) == ("invalid", False, "invalid reason")
    assert detail["message"] == "\ufffd not json"  # the undecodable byte shown, not a crash
    assert detail["history"] == []


def test_dlq_show_unknown_id_exits_1(state: State) -> None:
    result = run("dlq", "show", "no-such-id", "--config", str(state.config))
    assert result.exit_code == EX_FAILED
    assert result.stderr.splitlines() == ["opsrelay: no dead letter 'no-such-id' in ops.dead"]
    assert result.stdout == ""


# -- opsrelay dlq replay / purge --------------------------------------------------------------


def test_dlq_replay_by_id(state: State) -> None:
    result = ok(run("dlq", "replay", state.dead_mail, state.dead_event, "--config", str(state.config)))
    assert result.stdout.splitlines() == [f"replayed {state.dead_mail} (mail) to ops.outbound",
                                          f"replayed {state.dead_event} (event) to ops.sub.crashes"]
    assert dead_ids(state.config) == [state.invalid]
    _waiting, replayed = drain(state.config, "ops.outbound")
    assert (from_message(replayed).message_id, from_message(replayed).attempts) == (state.dead_mail, 0)
    assert [m.message_id for m in drain(state.config, "ops.sub.crashes")] == [state.dead_event]


def test_dlq_replay_json(state: State) -> None:
    result = ok(run("dlq", "replay", "--all", "--json", "--config", str(state.config)))
    report = json.loads(result.stdout)
    assert report["replayed"] == [{"id": state.dead_mail, "kind": "mail", "to": "ops.outbound"},
                                  {"id": state.dead_event, "kind": "event", "to": "ops.sub.crashes"}]
    assert [(r["id"], r["kind"]) for r in report["refused"]] == [(state.invalid, "invalid")]
    assert report["missing"] == []


def test_dlq_replay_all_reports_what_stays_and_exits_0(state: State) -> None:
    result = ok(run("dlq", "replay", "--all", "--config", str(state.config)))
    assert f"not replayed {state.invalid} (invalid): " in result.stdout
    assert dead_ids(state.config) == [state.invalid]


@pytest.mark.parametrize("which", ["invalid", "missing"])
def test_dlq_replay_of_a_named_id_it_cannot_do_exits_1(state: State, which: str) -> None:
    dead_id = state.invalid if which == "invalid" else "no-such-id"
    result = run("dlq", "replay", dead_id, state.dead_mail, "--config", str(state.config))
    assert result.exit_code == EX_FAILED, result.output
    assert f"replayed {state.dead_mail} (mail) to ops.outbound" in result.stdout  # the other one went
    expected = f"not replayed {dead_id} (invalid)" if which == "invalid" else f"no dead letter {dead_id}"
    assert expected in result.stdout
    assert dead_ids(state.config) == [state.dead_event, state.invalid]


@pytest.mark.parametrize("command", ["replay", "purge"])
@pytest.mark.parametrize("args", [[], ["some-id", "--all"]])
def test_dlq_needs_ids_or_all_not_both(state: State, command: str, args: list[str]) -> None:
    result = run("dlq", command, *args, "--config", str(state.config))
    assert result.exit_code == EX_USAGE
    assert result.stderr.splitlines() == ["opsrelay: give dead-letter IDs or --all (one of them)"]
    assert len(dead_ids(state.config)) == 3


def test_dlq_purge_by_id_then_all(state: State) -> None:
    result = ok(run("dlq", "purge", state.invalid, "--config", str(state.config)))
    assert result.stdout.splitlines() == [f"purged {state.invalid} (invalid)"]
    assert dead_ids(state.config) == [state.dead_mail, state.dead_event]

    report = json.loads(ok(run("dlq", "purge", "--all", "--json", "--config", str(state.config))).stdout)
    assert report == {"purged": [{"id": state.dead_mail, "kind": "mail"}, {"id": state.dead_event, "kind": "event"}],
                      "missing": []}
    assert dead_ids(state.config) == []
    assert ok(run("dlq", "purge", "--all", "--config", str(state.config))).stdout == "no dead letters\n"


def test_dlq_purge_of_a_missing_id_exits_1(state: State) -> None:
    result = run("dlq", "purge", "no-such-id", "--config", str(state.config))
    assert result.exit_code == EX_FAILED
    assert result.stdout == "no dead letter no-such-id\n"
    assert len(dead_ids(state.config)) == 3


# -- opsrelay unrouted -----------------------------------------------------------------------


async def _publish(cfg: Config, events: list[Event]) -> None:
    async with open_engine(cfg.broker.url) as engine:
        await engine.declare(relay_topology(cfg))
        for ev in events:
            await engine.publish(events_exchange(cfg.broker.prefix), event_key(ev.host, ev.group, ev.process, ev.state),
                                 Message(encode_event(ev), ev.id, CONTENT_TYPE))


@pytest.fixture
def unrouted(tmp_path: Path) -> tuple[Path, list[Event]]:
    config = write_config(tmp_path)
    events = [event("web", "RUNNING"), event("cron", "STOPPED"), event("api", "RUNNING")]
    asyncio.run(_publish(load_config(config), events))
    return config, events


def test_unrouted_list(unrouted: tuple[Path, list[Event]]) -> None:
    config, events = unrouted
    lines = ok(run("unrouted", "list", "--config", str(config))).stdout.splitlines()
    assert lines == ["3 event(s) in ops.unrouted", *(
        f"{ev.id}  proc.web1.{ev.group}.{ev.process}.{ev.state}  {ev.process} {ev.state} on web1" for ev in events)]
    listed = json.loads(ok(run("unrouted", "list", "--json", "--config", str(config))).stdout)
    assert [(e["id"], e["key"]) for e in listed] == [(ev.id, f"proc.web1.{ev.process}.{ev.process}.{ev.state}")
                                                     for ev in events]


def test_unrouted_replay_declares_the_new_subscription_and_delivers_to_it(
        tmp_path: Path, unrouted: tuple[Path, list[Event]]) -> None:
    _, events = unrouted
    # The operator adds a subscription for RUNNING, then replays before the relay restarts.
    config = write_config(tmp_path, subscriptions=CRASHES + LATE, name="with-late.toml")
    result = ok(run("unrouted", "replay", "--config", str(config)))
    assert result.stdout == "replayed 3 event(s) from ops.unrouted; it now holds 1 (what no subscription matches)\n"
    assert [m.message_id for m in drain(config, "ops.sub.late")] == [events[0].id, events[2].id]
    assert [m.message_id for m in drain(config, "ops.unrouted")] == [events[1].id]


def test_unrouted_replay_json(unrouted: tuple[Path, list[Event]]) -> None:
    config, _ = unrouted
    report = json.loads(ok(run("unrouted", "replay", "--json", "--config", str(config))).stdout)
    assert report == {"replayed": 3, "remaining": 3, "keys": {
        "proc.web1.web.web.RUNNING": 1, "proc.web1.cron.cron.STOPPED": 1, "proc.web1.api.api.RUNNING": 1}}


# -- exit codes ------------------------------------------------------------------------------

COMMANDS = [["queue"], ["dlq", "list"], ["dlq", "show", "x"], ["dlq", "replay", "--all"], ["dlq", "purge", "x"],
            ["unrouted", "list"], ["unrouted", "replay"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_bad_config_exits_78_with_one_line(tmp_path: Path, command: list[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[broker]\nprefx = "ops"\n', encoding="utf-8")
    result = run(*command, "--config", str(bad))
    assert result.exit_code == EX_CONFIG, result.output
    (line,) = result.stderr.splitlines()
    assert str(bad) in line and "broker.prefx" in line
    assert result.stdout == ""


@pytest.mark.parametrize("broker", ["sqlite", "amqp"])
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_broker_unavailable_exits_75_with_one_line(tmp_path: Path, command: list[str], broker: str) -> None:
    # /proc takes no new directories, even for root; nothing listens on a free port.
    url = ("sqlite:////proc/opsrelay-test/queue.db" if broker == "sqlite"
           else f"amqp://guest:secret-pw@127.0.0.1:{free_port()}/")
    result = run(*command, "--config", str(write_config(tmp_path, url=url)))
    assert result.exit_code == EX_TEMPFAIL, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("opsrelay: broker unavailable: ")
    assert "secret-pw" not in result.output
    assert result.stdout == ""


# -- the same on RabbitMQ --------------------------------------------------------------------


@pytest.fixture
def rabbit_state(tmp_path: Path, amqp_url: str, prefix: str) -> Iterator[State]:
    path = write_config(tmp_path, url=amqp_url, prefix=prefix)
    cfg = load_config(path)
    try:
        yield State(path, *asyncio.run(fill(cfg)))
    finally:
        asyncio.run(_delete(amqp_url, cfg))


async def _delete(url: str, cfg: Config) -> None:
    await delete_topology(url, relay_topology(cfg))


@pytest.mark.rabbitmq
def test_queue_and_dlq_round_trip_on_rabbitmq(rabbit_state: State, prefix: str) -> None:
    config = str(rabbit_state.config)
    report = json.loads(ok(run("queue", "--json", "--config", config)).stdout)
    assert {q["role"]: q["ready"] for q in report["queues"]} == {
        "outbound": 1, "retry": 1, "dead": 3, "unrouted": 0, "subscription": 0}
    assert [h["fault"] for h in report["held"]] == [FAULT]
    assert dead_ids(rabbit_state.config) == [rabbit_state.dead_mail, rabbit_state.dead_event, rabbit_state.invalid]

    result = ok(run("dlq", "replay", rabbit_state.dead_mail, "--config", config))
    assert result.stdout == f"replayed {rabbit_state.dead_mail} (mail) to {outbound_queue(prefix)}\n"
    assert ok(run("dlq", "purge", rabbit_state.invalid, "--config", config)).stdout.startswith("purged ")
    assert dead_ids(rabbit_state.config) == [rabbit_state.dead_event]
    _waiting, replayed = drain(rabbit_state.config, outbound_queue(prefix))
    assert (from_message(replayed).message_id, from_message(replayed).attempts) == (rabbit_state.dead_mail, 0)
