"""Which mails a subscription's events become: digests, flap damping, recovery notices (pure).

:class:`Notifier` turns each event, and the passing of time, into
:class:`~relay.notify.notice.Notice` values, changing a :class:`~relay.notify.state.State`
that the caller keeps (and persists). Nothing here does IO or reads a clock.

* Without ``group_wait``/``group_interval`` one accepted event is one mail, as
  crashmail; with them (in the spirit of Alertmanager) the events of one group
  (equal ``group_by`` values) wait ``group_wait`` before the first digest, then a
  group gets at most one digest every ``group_interval``.
* ``max_mails_per_hour`` counts mails per process (per group for digests) in a
  window (``damping_window``, an hour) from the first mail; past it, events are
  held and one summary of them goes out when the window ends.
* ``send_resolved``: a mail about a process that is down opens an outage; the
  next RUNNING (supervisord only enters RUNNING once the process outlived
  ``startsecs``) ends it with a notice threaded under that first mail. Recovery
  notices are never damped: they end a conversation rather than add to it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from relay.config.models import Subscription
from relay.contract.event import Event, iso_utc
from relay.notify.notice import Notice, NoticeKind, mail_id, message_id_header
from relay.notify.state import MAX_LISTED, Outage, Pending, State, Window, process_key

__all__ = ["DOWN_STATES", "HOUR", "Notifier"]

HOUR = 3600.0
# A mail about one of these opens an outage (an expected exit is not one).
DOWN_STATES = frozenset({"EXITED", "FATAL", "BACKOFF", "UNKNOWN"})


def _iso(epoch: float) -> str:
    return iso_utc(datetime.fromtimestamp(epoch, UTC))


def _is_down(event: Event) -> bool:
    return not event.is_supervisor and event.state in DOWN_STATES and event.expected is not True


class Notifier:
    def __init__(self, sub: Subscription, host: str) -> None:
        self.sub = sub
        self.host = host
        self.window = sub.damping_window

    # -- events ------------------------------------------------------------------------

    def on_event(self, state: State, event: Event, now: float) -> list[Notice]:
        """The mails due now because of ``event`` (often none: it waits in a digest or is held)."""
        if event.id in state.seen:
            return []  # redelivered after a crash that came after its state was saved
        accepted = self.sub.accepts(event)
        recovering = self.sub.watches_recovery(event)
        if not (accepted or recovering):
            return []
        recent = state.remember(event, now) if accepted else 0
        if not accepted:
            state.seen.append(event.id)
        notices: list[Notice] = []
        key = process_key(event)
        if recovering:
            carrier = self._pending_with(state, key) if self.sub.grouped else None
            if carrier is not None and not accepted:
                carrier.add(event)  # listed in the digest that reports the crash: no outage opens
                state.outages.pop(key, None)  # and an older one ends here, unannounced
                return []
            outage = state.outages.pop(key, None)
            if outage is not None:
                notices.append(self._recovered(event, outage))
        if not accepted:
            return notices
        if self.sub.grouped:
            self._collect(state, event, now)
            return notices
        notice = Notice(NoticeKind.EVENT, mail_id(NoticeKind.EVENT, event.id, self.sub.name),
                        (event,), 1, recent=recent)
        return notices + self._damped(state, key, notice, now)

    def _pending_with(self, state: State, key: str) -> Pending | None:
        return next((p for p in state.pending.values() if any(process_key(e) == key for e in p.events)), None)

    def _group(self, event: Event) -> tuple[str, dict[str, str]]:
        labels = {str(g): getattr(event, str(g)) for g in self.sub.group_by}
        return "\x1f".join(f"{k}={v}" for k, v in labels.items()), labels

    def _collect(self, state: State, event: Event, now: float) -> None:
        key, labels = self._group(event)
        pending = state.pending.get(key)
        if pending is None:
            last = state.last_sent.get(key)
            if last is not None and now < last + self.sub.group_interval:
                due = last + self.sub.group_interval
            else:
                due = now + self.sub.group_wait
            pending = state.pending[key] = Pending(labels, due)
        pending.add(event)

    # -- time --------------------------------------------------------------------------

    def on_timer(self, state: State, now: float) -> list[Notice]:
        """Digests whose time has come and damping summaries of windows that ended."""
        notices: list[Notice] = []
        for key, pending in sorted(state.pending.items(), key=lambda item: item[1].due):
            if pending.due > now:
                continue
            del state.pending[key]
            state.last_sent[key] = now
            notice = self._digest(state, key, pending)
            damping_key = process_key(notice.first) if notice.kind is NoticeKind.EVENT else f"group\x1e{key}"
            notices += self._damped(state, damping_key, notice, now)
        for key, window in list(state.windows.items()):
            if now >= window.start + self.window:
                del state.windows[key]
                if window.held_total:
                    notices.append(self._summary(state, key, window))
        for key in [k for k, t in state.last_sent.items() if now >= t + self.sub.group_interval]:
            if key not in state.pending:
                del state.last_sent[key]
        state.forget_old(now)
        return notices

    def next_due(self, state: State) -> float | None:
        """When :meth:`on_timer` next has something to do (None: nothing waits)."""
        dues = [p.due for p in state.pending.values()] + [w.start + self.window for w in state.windows.values()]
        return min(dues, default=None)

    # -- notices -----------------------------------------------------------------------

    def _digest(self, state: State, key: str, pending: Pending) -> Notice:
        events = tuple(sorted(pending.events, key=lambda e: e.at))
        if pending.total == 1:
            only = events[0]
            return Notice(NoticeKind.EVENT, mail_id(NoticeKind.EVENT, only.id, self.sub.name), events, 1,
                          recent=len(state.recent.get(process_key(only), [])) or 1)
        identity = f"{key}/{events[0].id}/{events[-1].id}/{pending.total}"
        return Notice(NoticeKind.DIGEST, mail_id(NoticeKind.DIGEST, identity, self.sub.name), events,
                      pending.total, group=dict(pending.labels))

    def _recovered(self, event: Event, outage: Outage) -> Notice:
        identity = f"{process_key(event)}/{outage.since}/{event.id}"
        return Notice(NoticeKind.RECOVERED, mail_id(NoticeKind.RECOVERED, identity, self.sub.name),
                      (event,), 1, thread=outage.thread, since=outage.since)

    def _summary(self, state: State, key: str, window: Window) -> Notice:
        events = tuple(sorted(window.held, key=lambda e: e.at))
        outage = state.outages.get(process_key(events[0])) if events else None
        identity = f"{key}/{window.start}"
        return Notice(NoticeKind.SUPPRESSED, mail_id(NoticeKind.SUPPRESSED, identity, self.sub.name), events,
                      window.held_total, thread=outage.thread if outage else None,
                      since=_iso(window.start), until=_iso(window.start + self.window))

    def _damped(self, state: State, key: str, notice: Notice, now: float) -> list[Notice]:
        """``notice`` if the window of ``key`` has room, else hold its events for the summary."""
        limit = self.sub.max_mails_per_hour
        if limit is None:
            self._mailed(state, notice)
            return [notice]
        out: list[Notice] = []
        window = state.windows.get(key)
        if window is None or now >= window.start + self.window:
            if window is not None and window.held_total:
                out.append(self._summary(state, key, window))  # the timer was late: end it first
            window = state.windows[key] = Window(start=now)
        if window.sent < limit:
            window.sent += 1
            self._mailed(state, notice)
            return [*out, notice]
        # A summary lists no log tails: the held events keep none (the state stays small).
        window.held.extend(replace(e, log_tail=None) for e in notice.events[: MAX_LISTED - len(window.held)])
        window.held_total += notice.total
        return out

    def _mailed(self, state: State, notice: Notice) -> None:
        """A mail about processes that are down opens their outages (for recovery notices)."""
        if not self.sub.send_resolved:
            return
        latest: dict[str, Event] = {}
        first_down: dict[str, Event] = {}
        for event in notice.events:
            key = process_key(event)
            latest[key] = event
            if _is_down(event):
                first_down.setdefault(key, event)
        for key, event in latest.items():
            if _is_down(event) and key not in state.outages:
                state.outages[key] = Outage(first_down[key].at,
                                            message_id_header(notice.mail_id, self.host))
