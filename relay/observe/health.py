"""The pure record of how delivery fares: each smarthost's last success and failure, holds, dead letters.

The relay feeds it as it delivers; its heartbeat carries it to ``opsrelay status`` (:meth:`Health.to_doc`),
and :meth:`Health.due_alerts` decides when the relay must say, in its log and by mail, that mail is
not flowing: an alerting path that fails silently is worse than none. No IO here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Alert", "Health", "HeldFault", "SmarthostHealth"]


@dataclass
class SmarthostHealth:
    last_ok: float | None = None
    last_failure: float | None = None
    last_reply: str = ""
    # The first failure since the last success (None: it works).
    failing_since: float | None = None


@dataclass
class HeldFault:
    since: float
    reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    """Something to say about ourselves: ``key`` names the episode (one mail each), ``text`` is one line."""

    key: str
    text: str
    mail: bool  # worth a mail to [smtp] admin (a smarthost that refuses us while another works)


@dataclass
class Health:
    smarthosts: dict[str, SmarthostHealth] = field(default_factory=dict)
    held: dict[tuple[str, str], HeldFault] = field(default_factory=dict)
    dead_letters: int = 0
    last_dead_letter: float | None = None
    # Dead letters already alerted about, and when the last log line went out.
    _alerted_dead: int = 0
    _logged: float | None = None
    _mailed: set[str] = field(default_factory=set)

    def session(self, smarthost: str, *, ok: bool, reply: str, now: float) -> None:
        host = self.smarthosts.setdefault(smarthost, SmarthostHealth())
        if ok:
            host.last_ok, host.failing_since = now, None
        else:
            host.last_failure, host.last_reply = now, reply
            if host.failing_since is None:
                host.failing_since = now

    def hold(self, smarthost: str, fault: str, reason: str, now: float) -> bool:
        """Note a hold; True when it is new (the gauge goes to 1)."""
        found = self.held.get((smarthost, fault))
        if found is None:
            self.held[smarthost, fault] = HeldFault(now, reason)
            return True
        found.reason = reason
        return False

    def flowing(self) -> list[tuple[str, str]]:
        """A mail was delivered: nothing is held any more; returns the holds that ended."""
        ended = list(self.held)
        self.held.clear()
        return ended

    def dead_letter(self, now: float) -> None:
        self.dead_letters += 1
        self.last_dead_letter = now

    def held_since(self) -> float | None:
        return min((h.since for h in self.held.values()), default=None)

    def due_alerts(self, now: float, stale_after: float) -> list[Alert]:
        """What to log now (at most once per ``stale_after``); alerts with ``mail`` once per episode."""
        alerts: list[Alert] = []
        for (smarthost, fault), held in sorted(self.held.items()):
            if now - held.since >= stale_after:
                alerts.append(Alert(f"held/{smarthost}/{fault}/{held.since}",
                                    f"delivery held since {_iso(held.since)} by {smarthost} ({fault}): "
                                    f"{held.reason}", mail=False))
        for name, host in sorted(self.smarthosts.items()):
            if host.failing_since is not None and now - host.failing_since >= stale_after:
                alerts.append(Alert(f"refused/{name}/{host.failing_since}",
                                    f"smarthost {name} refused us since {_iso(host.failing_since)}: "
                                    f"{host.last_reply}", mail=True))
        if self.dead_letters > self._alerted_dead:
            new = self.dead_letters - self._alerted_dead
            alerts.append(Alert(f"dead/{self.dead_letters}", f"{new} new dead letter{'s' if new != 1 else ''} "
                                "(opsrelay dlq list)", mail=False))
        if not alerts or (self._logged is not None and now - self._logged < stale_after):
            return []
        self._logged = now
        self._alerted_dead = self.dead_letters
        return alerts

    def first_mail(self, alert: Alert) -> bool:
        """True the first time an episode is mailed about."""
        if not alert.mail or alert.key in self._mailed:
            return False
        self._mailed.add(alert.key)
        return True

    def signature(self) -> tuple[object, ...]:
        """What changes what status says (not every success's time): a heartbeat goes out when it does."""
        return (tuple(sorted((n, h.failing_since) for n, h in self.smarthosts.items())),
                tuple(sorted(self.held)), self.dead_letters)

    def to_doc(self) -> dict[str, Any]:
        return {
            "smarthosts": {name: {"last_ok": h.last_ok, "last_failure": h.last_failure, "last_reply": h.last_reply,
                                  "failing_since": h.failing_since} for name, h in self.smarthosts.items()},
            "held": [{"smarthost": s, "fault": f, "since": h.since, "reason": h.reason}
                     for (s, f), h in self.held.items()],
            "dead_letters": self.dead_letters,
            "last_dead_letter": self.last_dead_letter,
        }


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))
