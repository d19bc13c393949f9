"""A relay's heartbeat: what ``opsrelay status`` learns of each running relay, and its JSON form.

Each relay publishes one to ``<prefix>.relays`` every :data:`INTERVAL` seconds; the queue drops
each after :data:`TTL_MS`, so what is there is the relays alive in the last minute (all the same
TTL: RabbitMQ expires at the head, and the head is always the oldest). Pure: no IO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from relay.contract.topology import HEARTBEAT_TTL_MS as TTL_MS
from relay.errors import MessageDecodeError

__all__ = ["INTERVAL", "TTL_MS", "Heartbeat", "latest"]

INTERVAL = 10.0
_VERSION = 1


@dataclass(frozen=True, slots=True)
class Heartbeat:
    id: str  # host:pid:random, one per relay process
    host: str
    pid: int
    at: float
    started: float
    version: str
    # The stateful subscriptions whose state this relay owns.
    owned: tuple[str, ...] = ()
    # relay.observe.health.Health.to_doc()
    health: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        doc = {"v": _VERSION, "id": self.id, "host": self.host, "pid": self.pid, "at": self.at,
               "started": self.started, "version": self.version, "owned": list(self.owned), "health": self.health}
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, body: bytes) -> Heartbeat:
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict) or doc.get("v") != _VERSION:
                raise MessageDecodeError(f"not a v{_VERSION} heartbeat")
            return cls(str(doc["id"]), str(doc["host"]), int(doc["pid"]), float(doc["at"]), float(doc["started"]),
                       str(doc["version"]), tuple(str(s) for s in doc["owned"]), dict(doc["health"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise MessageDecodeError(f"heartbeat cannot be read: {exc!r}") from None


def latest(beats: list[Heartbeat], now: float, ttl: float = TTL_MS / 1000) -> list[Heartbeat]:
    """The newest heartbeat of each relay seen within ``ttl``, by host then pid."""
    newest: dict[str, Heartbeat] = {}
    for beat in beats:
        if now - beat.at <= ttl and (beat.id not in newest or beat.at > newest[beat.id].at):
            newest[beat.id] = beat
    return sorted(newest.values(), key=lambda b: (b.host, b.pid, b.id))
