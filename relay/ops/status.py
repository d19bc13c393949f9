"""``opsrelay status``: is alert mail flowing, and if not, why. Gathered through the engine, judged purely.

What it reads: the relays' heartbeats (``<prefix>.relays``: who runs, who owns each stateful
subscription, each smarthost's last success and failure, held faults), the queues (depth and
oldest age), mail held in the retry queues, the silences, and the listener's spool when it is
on this host. The verdict is an exit code a Nagios or monit check can use: 0 healthy, 1 mail
held or older than ``status.stale_after`` (or no relay running), 2 the broker unreachable.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from relay.config.models import Config
from relay.contract.names import relays_queue, spool_name
from relay.contract.urls import is_amqp, mask_url, sqlite_path
from relay.daemon.relay import retry_delays_ms
from relay.engines.base import Engine
from relay.errors import ConfigurationError, MessageDecodeError, RelayError
from relay.notify.silence import Silence
from relay.notify.silence_log import read_silences
from relay.observe.heartbeat import Heartbeat, latest
from relay.observe.observer import QueueSample
from relay.ops.stats import HeldMail, held_mails, queue_samples, sample_queues

__all__ = ["EXIT_BROKER", "EXIT_HEALTHY", "EXIT_STUCK", "Status", "gather", "unreachable"]

EXIT_HEALTHY, EXIT_STUCK, EXIT_BROKER = 0, 1, 2
# Queues whose oldest message says mail is late (dead letters and unrouted events wait on purpose).
_FLOWING = ("outbound", "retry", "spool", "maildrop")


@dataclass
class Status:
    broker: str
    stale_after: float
    reachable: bool = True
    broker_error: str = ""
    relays: list[Heartbeat] = field(default_factory=list)
    queues: list[QueueSample] = field(default_factory=list)
    held: list[HeldMail] = field(default_factory=list)
    silences: list[Silence] = field(default_factory=list)
    stateful: list[str] = field(default_factory=list)
    now: float = field(default_factory=time.time)

    @property
    def owners(self) -> dict[str, str]:
        """Stateful subscription -> the relay that owns its state ("" when none does)."""
        owned = {sub: beat.id for beat in self.relays for sub in beat.owned}
        return {sub: owned.get(sub, "") for sub in self.stateful}

    def smarthosts(self) -> dict[str, dict[str, Any]]:
        """Each smarthost as the relays saw it, the latest success and failure across them."""
        merged: dict[str, dict[str, Any]] = {}
        for beat in self.relays:
            for name, seen in beat.health.get("smarthosts", {}).items():
                into = merged.setdefault(name, {"last_ok": None, "last_failure": None, "last_reply": ""})
                if seen.get("last_ok") and (into["last_ok"] or 0) < seen["last_ok"]:
                    into["last_ok"] = seen["last_ok"]
                if seen.get("last_failure") and (into["last_failure"] or 0) < seen["last_failure"]:
                    into["last_failure"], into["last_reply"] = seen["last_failure"], seen.get("last_reply", "")
        return merged

    def held_faults(self) -> list[dict[str, Any]]:
        return [h for beat in self.relays for h in beat.health.get("held", [])]

    def problems(self) -> list[str]:
        if not self.reachable:
            return [f"broker unreachable: {self.broker_error}"]
        found: list[str] = []
        if not self.relays:
            found.append("no relay has reported in the last minute (is opsrelay serve running?)")
        for sub, owner in self.owners.items():
            if self.relays and not owner:
                found.append(f"no relay owns the state of subscription {sub}")
        faults = {h.fault for h in self.held} | {f"{h['smarthost']}: {h['reason']}" for h in self.held_faults()}
        found += [f"delivery held: {fault}" for fault in sorted(faults)]
        for q in self.queues:
            if q.queue in _FLOWING and q.oldest_seconds is not None and q.oldest_seconds > self.stale_after:
                found.append(f"{q.queue}: oldest of {q.messages} waiting for {q.oldest_seconds:.0f}s "
                             f"(stale after {self.stale_after:g}s)")
        return found

    @property
    def exit_code(self) -> int:
        if not self.reachable:
            return EXIT_BROKER
        return EXIT_STUCK if self.problems() else EXIT_HEALTHY

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.exit_code == EXIT_HEALTHY, "exit_code": self.exit_code, "problems": self.problems(),
            "broker": {"url": self.broker, "reachable": self.reachable, "error": self.broker_error},
            "relays": [{"id": b.id, "host": b.host, "pid": b.pid, "version": b.version, "seen_seconds_ago":
                        round(self.now - b.at, 1), "up_seconds": round(self.now - b.started), "owns": list(b.owned)}
                       for b in self.relays],
            "owners": self.owners,
            "smarthosts": self.smarthosts(),
            "held": [{"queue": h.queue, "id": h.id, "fault": h.fault, "holds": h.holds} for h in self.held],
            "held_faults": self.held_faults(),
            "queues": [{"queue": q.queue, "messages": q.messages, "oldest_seconds":
                        None if q.oldest_seconds is None else round(q.oldest_seconds, 1)} for q in self.queues],
            "dead_letters": next((q.messages for q in self.queues if q.queue == "dead"), 0),
            "silences": [s.to_dict() for s in self.silences],
        }


def unreachable(config: Config, error: str) -> Status:
    return Status(mask_url(config.broker.url), config.status.stale_after, reachable=False, broker_error=error)


async def gather(engine: Engine, config: Config) -> Status:
    prefix = config.broker.prefix
    status = Status(mask_url(config.broker.url), config.status.stale_after,
                    stateful=[s.name for s in config.subscriptions if s.stateful])
    subs = [s.name for s in config.subscriptions]
    beats: list[Heartbeat] = []
    try:
        for message in await engine.read_all(relays_queue(prefix)):
            try:
                beats.append(Heartbeat.decode(message.body))
            except MessageDecodeError:
                continue
    except ConfigurationError:
        pass  # no relay ever ran with this prefix
    status.relays = latest(beats, status.now)
    status.queues = await queue_samples(engine, prefix, retry_delays_ms(config), subs)
    status.held = await held_mails(engine, prefix, retry_delays_ms(config))
    status.silences = [s for s in (await read_silences(engine, prefix)).values() if s.ends > status.now]
    spool = await _spool(config)
    if spool is not None:
        status.queues.append(spool)
    from relay.config.fast import load_path
    from relay.maildrop.ingest import Maildrop

    count, age = Maildrop(load_path(config.source)).waiting()
    if count:
        status.queues.append(QueueSample("maildrop", count, age))
    return status


def _spool_here(config: Config) -> bool:
    """The listener spools here: an AMQP broker and the spool's file exists (it is not created here)."""
    return is_amqp(config.broker.url) and os.path.exists(sqlite_path(config.broker.spool))


async def _spool(config: Config) -> QueueSample | None:
    if not _spool_here(config):
        return None
    from relay.engines.sqlite import SqliteEngine

    try:
        async with SqliteEngine(config.broker.spool) as spool:
            return await sample_queues(spool, "spool", [spool_name(config.broker.prefix)])
    except RelayError:
        return None  # not ours to read
