"""The relay watching itself: loop heartbeat, readiness, queue gauges, its heartbeat for ``opsrelay status``,
and the alerts about itself when mail stops flowing.

One task beside the consumers, once a second: tells the observer the loop runs (``/-/healthy``),
checks the broker (``/-/ready`` goes 503 within seconds of losing it: aio-pika's robust
connection reconnects quietly and a consumer just stops receiving), publishes the relay's
heartbeat every :data:`~relay.observe.heartbeat.INTERVAL` and within a second of a change in
its :class:`~relay.observe.health.Health`, and asks that what is due: an ERROR line per ``status.stale_after``
and, once per episode, a mail to ``[smtp] admin`` when a smarthost refused us for that long
(through a fallback that works) or dead letters appeared.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.contract.mail import OutboundMail, to_message
from relay.contract.message import Message
from relay.contract.names import outbound_queue, relays_queue
from relay.errors import BrokerUnavailable, RelayError
from relay.observe.health import Alert
from relay.observe.heartbeat import INTERVAL, Heartbeat
from relay.observe.observer import running_version
from relay.render.mime import build_message
from relay.render.renderer import default_sender

if TYPE_CHECKING:
    from relay.daemon.relay import Relay

__all__ = ["FAILOVER_AFTER", "PROBE_TIMEOUT", "SelfWatch", "relay_id"]

log = logging.getLogger("opsrelay.relay")
# A broker that does not answer a passive declare within this is not one we are consuming from.
PROBE_TIMEOUT = 3.0
# Lost this long with other nodes to go to: the relay ends and serve_forever connects to another
# (aio-pika's robust connection would wait for the same node for ever).
FAILOVER_AFTER = 2.0


def relay_id(host: str) -> str:
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}"


class SelfWatch:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.id = relay_id(relay.config.host)
        self.started = time.time()
        self.stale_after = relay.config.status.stale_after

    async def run(self, consuming: Callable[[], bool]) -> None:
        """Until stopped; ``consuming()`` says whether the consumers are subscribed."""
        relay, observer = self.relay, self.relay.observer
        next_beat, told = 0.0, None
        lost_since: float | None = None
        while True:
            observer.heartbeat()
            problem = await self._probe() if consuming() else "starting: subscribing to the queues"
            observer.ready(problem)
            lost = relay.engine.lost()
            lost_since = None if lost is None else lost_since or time.monotonic()
            if lost_since is not None and relay.engine.failover() and time.monotonic() - lost_since >= FAILOVER_AFTER:
                raise BrokerUnavailable(f"{lost}; moving to another node")
            if problem is None:
                if time.monotonic() >= next_beat or relay.health.signature() != told:
                    # Every INTERVAL, and within a second of a change status should see.
                    next_beat, told = time.monotonic() + INTERVAL, relay.health.signature()
                    await self._beat()
                await self._alerts()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(relay.stop_requested.wait(), 1.0)
            if relay.stop_requested.is_set():
                observer.ready("stopping")
                return

    async def _probe(self) -> str | None:
        engine = self.relay.engine
        lost = engine.lost()
        if lost is not None:
            return lost
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await engine.depth(outbound_queue(self.relay.prefix))
        except TimeoutError:
            return f"broker did not answer within {PROBE_TIMEOUT:g}s"
        except RelayError as exc:
            return f"broker: {exc}"
        return None

    async def _beat(self) -> None:
        beat = Heartbeat(self.id, self.relay.config.host, os.getpid(), time.time(), self.started, running_version(),
                         tuple(sorted(self.relay.owned)), self.relay.health.to_doc())
        try:
            await self.relay.engine.send(relays_queue(self.relay.prefix), Message(beat.encode(), f"beat-{self.id}"))
        except RelayError as exc:
            log.warning("relay: could not publish its heartbeat: %s", exc)

    async def _alerts(self) -> None:
        relay = self.relay
        for alert in relay.health.due_alerts(time.time(), self.stale_after):
            log.error("relay: MAIL NOT FLOWING: %s", alert.text)
            if relay.health.first_mail(alert) and self._worth_mailing():
                await self._mail_admin(alert)

    def _worth_mailing(self) -> bool:
        """Someone to tell, and a fallback to tell them through: without one the mail would wait behind
        the very smarthost it complains about (the only alerts that mail are about a refusing smarthost)."""
        return bool(self.relay.config.admins) and len(self.relay.config.smtp.smarthosts) > 1

    async def _mail_admin(self, alert: Alert) -> None:
        config = self.relay.config
        sender = default_sender(config)
        subject = f"opsrelay on {config.host}: {alert.text}"
        body = (f"{alert.text}\n\nopsrelay status (on a host with the config) shows what waits; "
                f"opsrelay dlq list shows dead letters.\n\n-- \nopsrelay on {config.host}\n")
        raw = build_message(sender=sender, to=config.admins, subject=subject, body=body,
                            extra_headers=[("X-Opsrelay-Kind", "self")])
        mail = OutboundMail(sender=sender, recipients=config.admins, raw=raw, origin="self")
        try:
            await self.relay.engine.send(outbound_queue(self.relay.prefix), to_message(mail))
            log.info("relay: mailed %s: %s", ", ".join(config.admins), alert.text)
        except RelayError as exc:
            log.error("relay: could not queue the mail to %s: %s", ", ".join(config.admins), exc)
