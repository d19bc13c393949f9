"""``opsrelay status`` and the relay's alerts about itself, against a relay on both engines.

The relay runs on the test's loop with its real Mailer and real SMTP servers; ``opsrelay status``
runs as another process and its ``--json`` is parsed. Exit codes: 0 healthy, 1 held, 2 broker
unreachable. A smarthost that refuses us longer than ``status.stale_after`` while a fallback works
gives an ERROR line and one mail to ``[smtp] admin`` through that fallback.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.faults import (
    Ledger,
    Rig,
    Servers,
    fill_outbound,
    new_mail,
    relay_settings,
    running_relay,
    steady_port,
    write_toml,
)
from tests.smtp_server import TlsMode, free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

OPSRELAY = Path(sys.executable).parent / "opsrelay"
ADMIN = "admin@example.test"


def status(config: Path) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    done = subprocess.run([str(OPSRELAY), "status", "--json", "--config", str(config)], capture_output=True,
                          text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


async def test_status_exit_codes_healthy_then_held_then_broker_unreachable(
        rig: Rig, servers: Servers, tmp_path: Path) -> None:
    port = steady_port()
    good = servers.make(port=port)
    settings = {**relay_settings(rig.broker, good, backoff=["300ms"]), "status": {"stale_after": "10m"},
                "subscriptions": [{"name": "ops", "to": ["ops@example.test"], "send_resolved": True}]}
    path = write_toml(settings, tmp_path / "opsrelay.toml")
    config, engine = await rig.open(settings)
    smarthost = f"127.0.0.1:{port}"
    async with running_relay(config) as relay:
        async def reported() -> bool:
            relay.check()
            code, doc = status(path)
            return code == 0 and len(doc["relays"]) == 1 and doc["owners"]["ops"] == doc["relays"][0]["id"]

        await wait_until(reported, 20, what="status 0 with one relay owning the stateful subscription")
        ledger = Ledger()
        await fill_outbound(engine, rig.broker.prefix, ledger, [new_mail(["a@example.test"])])
        await wait_until(lambda: len(good.received) == 1, 10, what="the first mail")

        async def smarthost_seen() -> bool:
            return status(path)[1]["smarthosts"].get(smarthost, {}).get("last_ok") is not None
        await wait_until(smarthost_seen, 10, what="status to show the smarthost's last success")
        code, doc = status(path)
        assert code == 0 and doc["healthy"] and doc["problems"] == [], doc
        assert {q["queue"] for q in doc["queues"]} >= {"outbound", "retry", "dead", "unrouted", "silenced"}
        assert doc["dead_letters"] == 0

        # The smarthost goes: a server on its port that offers no STARTTLS (a fault of the smarthost: held).
        good.stop()
        servers.make(port=port, tls=TlsMode.NONE)
        await fill_outbound(engine, rig.broker.prefix, ledger, [new_mail(["b@example.test"])])

        async def held() -> bool:
            relay.check()
            code, doc = status(path)
            # The mail seen held in its retry queue, and the relay's heartbeat saying why.
            return code == 1 and any("delivery held" in p for p in doc["problems"]) and bool(doc["held_faults"])
        await wait_until(held, 20, what="status 1: delivery held")
        code, doc = status(path)
        assert doc["held_faults"] and doc["held_faults"][0]["smarthost"] == smarthost
        assert "starttls" in doc["held_faults"][0]["reason"].lower()
        assert doc["smarthosts"][smarthost]["last_failure"] is not None

    away = {**settings, "broker": {**settings["broker"], "url": _unreachable(rig.broker.kind, tmp_path)}}
    code, doc = status(write_toml(away, tmp_path / "away.toml"))
    assert code == 2 and not doc["broker"]["reachable"] and doc["problems"][0].startswith("broker unreachable")


def _unreachable(kind: str, tmp_path: Path) -> str:
    if kind == "amqp":
        return f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the queue's folder should be\n")
    return f"sqlite:///{blocked}/queue.db"


async def test_a_smarthost_refusing_us_is_logged_and_mailed_to_admin_through_the_fallback(
        rig: Rig, servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="opsrelay.relay")
    fallback = servers.make()
    primary = servers.make(tls=TlsMode.NONE)  # refuses us: no STARTTLS
    # We expect STARTTLS of the primary, which offers none: a session fault, the fallback takes the mail.
    settings = relay_settings(rig.broker, primary, backoff=["300ms"], failback="1s", admin=[ADMIN],
                              security="starttls")
    settings["smtp"]["fallback"] = [{k: (str(v) if isinstance(v, Path) else v)
                                     for k, v in fallback.client_settings().items() if v is not None}]
    settings["status"] = {"stale_after": "2s"}
    config, engine = await rig.open(settings)
    ledger = Ledger()
    async with running_relay(config) as relay:
        # Mail keeps flowing through the fallback all along.
        for n in range(3):
            await fill_outbound(engine, rig.broker.prefix, ledger, [new_mail([f"u{n}@example.test"])])
            await wait_until(lambda n=n: len(fallback.received) >= n + 1, 10, what=f"mail {n} via the fallback")
        relay.check()

        def admin_mails() -> list[Any]:
            return [m for m in fallback.received if ADMIN in m.rcpt_tos]
        await wait_until(lambda: admin_mails(), 15, what="the mail to admin about the primary")
        errors = [r.getMessage() for r in caplog.records if "MAIL NOT FLOWING" in r.getMessage()]
        name = f"127.0.0.1:{primary.port}"
        assert errors and f"smarthost {name} refused us since" in errors[0]
        [mail] = admin_mails()
        message = email.message_from_bytes(mail.content, policy=email.policy.default)
        assert str(message["Subject"]).startswith(f"opsrelay on faulthost: smarthost {name} refused us since")
        assert "starttls" in str(message["Subject"]).lower()
        assert not primary.received
    # One mail per episode, not one per stale_after.
    assert len(admin_mails()) == 1
    assert not any(ADMIN in m.rcpt_tos for m in primary.received)
