"""Template variables: what a :class:`~relay.notify.notice.Notice` says, as plain values.

Every template (a subscription's ``subject``, ``body``, ``digest_subject``,
``digest_body``, ``html`` and the built-in ones) sees the same variables
whatever the notice's kind, so one template can serve several kinds by testing
``kind``. Names are one line each (controls become spaces); the log tail is
cleaned of terminal escapes and trimmed to whole trailing lines.

The notice: ``kind`` ("event", "digest", "recovered", "suppressed", "silenced"),
``subscription`` (its name), ``relay_host`` (config.host), ``thread`` (the
Message-ID this mail replies to, or None), ``total`` (events it stands for),
``shown`` (events listed), ``omitted`` (total - shown), ``total_text`` ("once",
"twice", "12 times"), ``events`` (every listed event, in order, each with the
event variables below), ``events_text`` (one aligned line per listed event: when,
label, state, outcome), ``counts`` (state -> how many listed), ``counts_text``
("EXITED x10, FATAL x2"), ``all_crashes`` (every event is an unexpected exit,
FATAL or BACKOFF), ``hosts`` / ``programs`` (distinct, in order) and
``hosts_text`` / ``programs_text`` ("web1", "web1, web2", "5 hosts"),
``labels`` / ``labels_text`` (a digest's group_by values, "process=worker_03"),
``since`` / ``until`` (ISO times or None) and ``since_time`` / ``until_time``,
``period`` ("between 10:00:00 and 10:00:20 UTC on 2026-11-27"), ``outage`` /
``outage_seconds`` (RECOVERED: "4m 12s" / 252.0), ``recent`` (events of this
process in the last hour, this one included) and ``recent_text`` ("3rd time in
the last hour", "" when 1), ``max_mails_per_hour`` (the subscription's damping),
``silence`` (SILENCED: ``id``, ``matchers``, ``comment``, ``text``: "while silenced: 14
events, 3 processes") and ``still_down`` (SILENCED: processes down when it ended).

The event (top level: the notice's latest event; also each item of ``events``):
``id``, ``v``, ``host``, ``group``, ``process``, ``program`` ("group:process",
the bare name when equal, "supervisord" for its own lifecycle), ``event``
("PROCESS_STATE_EXITED"), ``state``, ``from_state``, ``expected``, ``pid``,
``tries``, ``at`` (ISO), ``time`` ("2026-11-27 10:00:00 UTC"), ``when`` (the
time without the date when it is the first event's day), ``summary`` ("exited
unexpectedly"), ``exit_status``, ``signal``, ``spawnerr``, ``outcome``
("exited with status 3", "killed by signal SIGKILL", ""), ``notes`` (list),
``log_tail`` (trimmed to log_tail_bytes, or None; a digest's top-level
``log_tail`` is the latest one any listed event has, and ``log_label`` /
``log_when`` say whose), ``log_trimmed``,
``is_supervisor``, ``label`` (``program``, with the host before it when the
notice covers several hosts).
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from relay.config.models import Config, Subscription
from relay.contract.event import Event
from relay.notify.notice import Notice, NoticeKind, mail_id
from relay.render.mime import clean_header

__all__ = ["event_context", "format_duration", "notice_context", "ordinal", "sample_notice", "trim_log"]

_SUMMARIES = {
    "STOPPED": "was stopped",
    "STARTING": "is starting",
    "RUNNING": "is running",
    "BACKOFF": "is failing to start (BACKOFF)",
    "STOPPING": "is stopping",
    "FATAL": "could not be started (FATAL)",
    "UNKNOWN": "is in an unknown state",
}
_CRASH_STATES = frozenset({"FATAL", "BACKOFF"})
# ECMA-48 escapes (colours, cursor moves) that a program's stderr often holds; then the other controls.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def format_duration(seconds: float) -> str:
    """The two largest units: "12s", "4m 12s", "1h 5m", "3d 4h"."""
    rest = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts[:2])


def _parse(at: str | None) -> datetime | None:
    if not at:
        return None
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _time(at: str | None) -> str:
    when = _parse(at)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when else (at or "")


def trim_log(text: str | None, limit: int) -> tuple[str | None, bool]:
    """The last ``limit`` UTF-8 bytes of a cleaned log, whole lines only; and whether it was cut."""
    if not text or limit <= 0:
        return None, False
    # A lone CR is a progress bar redrawing its line: show each state on its own line.
    clean = _ESCAPES.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip("\n")
    data = clean.encode("utf-8")
    if len(data) <= limit:
        return clean or None, False
    # One byte more than the budget: a cut right after a newline keeps the line it starts.
    window = data[-limit - 1 :]
    newline = window.find(b"\n")
    if newline == -1:
        # One line longer than the budget: its end, marked as cut (a split character is dropped).
        return "…" + window[1:].decode("utf-8", "ignore"), True
    return window[newline + 1 :].decode("utf-8"), True


def _summary(event: Event) -> str:
    if event.state == "EXITED":
        return "exited as expected" if event.expected else "exited unexpectedly"
    return _SUMMARIES.get(event.state, f"is {event.state}")


def _outcome(event: Event) -> str:
    if event.signal:
        return f"killed by signal {clean_header(event.signal)}"
    if event.exit_status is not None:
        return f"exited with status {event.exit_status}"
    return ""


def _is_crash(event: Event) -> bool:
    return event.state in _CRASH_STATES or (event.state == "EXITED" and event.expected is not True)


def _program(event: Event) -> str:
    return "supervisord" if event.is_supervisor else clean_header(event.program)


def _one(value: str | None) -> str | None:
    return None if value is None else clean_header(value)


def event_context(event: Event, *, log_tail_bytes: int = 1 << 20, first_day: str = "",
                  several_hosts: bool = False) -> dict[str, Any]:
    """One event's variables; names are shown on one line whatever control characters they hold."""
    tail, trimmed = trim_log(event.log_tail, log_tail_bytes)
    when, time = _parse(event.at), _time(event.at)
    program = _program(event)
    host = clean_header(event.host)
    return {
        **event.to_dict(),
        **{key: clean_header(getattr(event, key)) for key in ("host", "group", "process", "event", "state")},
        "from_state": _one(event.from_state), "signal": _one(event.signal), "spawnerr": _one(event.spawnerr),
        "notes": [clean_header(note) for note in event.notes],
        "program": program, "label": f"{host} {program}" if several_hosts else program,
        "summary": _summary(event), "outcome": _outcome(event), "is_supervisor": event.is_supervisor,
        "time": time, "when": f"{when:%H:%M:%S}" if when and f"{when:%Y-%m-%d}" == first_day else time,
        "log_tail": tail, "log_trimmed": trimmed,
    }


def _distinct_text(values: list[str], noun: str) -> str:
    return ", ".join(values) if len(values) <= 3 else f"{len(values)} {noun}"


def _period(start: str | None, end: str | None) -> str:
    first, last = _parse(start), _parse(end)
    if first is None or last is None:
        return f"between {_time(start)} and {_time(end)}"
    if first.date() == last.date():
        return f"between {first:%H:%M:%S} and {last:%H:%M:%S} UTC on {first:%Y-%m-%d}"
    return f"between {_time(start)} and {_time(end)}"


def _listing(events: list[dict[str, Any]]) -> str:
    """One aligned line per event: when, what, state, how it ended."""
    when, label = (max(len(e[key]) for e in events) for key in ("when", "label"))
    lines = (f"  {e['when']:<{when}}  {e['label']:<{label}}  {e['state']:<8}  {e['outcome'] or e['spawnerr'] or ''}"
             for e in events)
    return "\n".join(line.rstrip() for line in lines)


def _outage(notice: Notice) -> float | None:
    """RECOVERED: from the start of the outage to the RUNNING event."""
    end, start = _parse(notice.last.at), _parse(notice.since)
    if notice.kind is not NoticeKind.RECOVERED or end is None or start is None or end < start:
        return None
    return (end - start).total_seconds()


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def notice_context(notice: Notice, sub: Subscription, config: Config) -> dict[str, Any]:
    """Every variable a template sees (listed in this module's docstring)."""
    if not notice.events:
        raise ValueError(f"a {notice.kind.value} notice without events cannot be rendered")
    limit = config.listener.log_tail_bytes if sub.log_tail_bytes is None else sub.log_tail_bytes
    hosts = list(dict.fromkeys(clean_header(e.host) for e in notice.events))
    first = _parse(notice.first.at)
    day = first.strftime("%Y-%m-%d") if first else ""
    events = [event_context(e, log_tail_bytes=limit, first_day=day, several_hosts=len(hosts) > 1)
              for e in notice.events]
    programs = list(dict.fromkeys(e["program"] for e in events))
    counts = dict(Counter(e["state"] for e in events))
    start, end = notice.since or notice.first.at, notice.until or notice.last.at
    outage_seconds = _outage(notice)
    top = dict(events[-1])
    # A digest shows the latest log tail any of its events has.
    tailed = next((e for e in reversed(events) if e["log_tail"]), top) if notice.kind is NoticeKind.DIGEST else top
    top.update(log_tail=tailed["log_tail"], log_trimmed=tailed["log_trimmed"])
    labels = {clean_header(k): clean_header(v) for k, v in notice.group.items()}
    return {
        **top,
        "kind": notice.kind.value, "subscription": sub.name, "relay_host": clean_header(config.host),
        "thread": notice.thread, "total": notice.total, "shown": len(events),
        "omitted": max(0, notice.total - len(events)), "total_text": _times(notice.total),
        "events": events, "events_text": _listing(events), "log_label": tailed["label"], "log_when": tailed["when"],
        "counts": counts, "counts_text": ", ".join(f"{s} x{n}" for s, n in counts.items()),
        "all_crashes": all(_is_crash(e) for e in notice.events),
        "hosts": hosts, "hosts_text": _distinct_text(hosts, "hosts"),
        "programs": programs, "programs_text": _distinct_text(programs, "programs"),
        "labels": labels, "labels_text": ", ".join(f"{k}={v}" for k, v in labels.items()),
        "since": notice.since, "until": notice.until,
        "since_time": _time(notice.since) if notice.since else None,
        "until_time": _time(notice.until) if notice.until else None,
        "period": _period(start, end),
        "outage": format_duration(outage_seconds) if outage_seconds is not None else "",
        "outage_seconds": outage_seconds,
        "recent": notice.recent,
        "recent_text": f"{ordinal(notice.recent)} time in the last hour" if notice.recent > 1 else "",
        "max_mails_per_hour": sub.max_mails_per_hour,
        "silence": {clean_header(k): clean_header(v) for k, v in notice.silence.items()},
        "still_down": [clean_header(p) for p in notice.still_down],
    }


def _sample_event(state: str, second: int, **extra: Any) -> Event:
    return Event(host="web1", group="workers", process="worker_03", event=f"PROCESS_STATE_{state}", state=state,
                 from_state="RUNNING", expected=False, pid=4242, tries=0, at=f"2026-11-27T10:00:{second:02d}.000000Z",
                 log_tail="Traceback (most recent call last):\nValueError: sample", exit_status=3,
                 notes=("sample note",), **extra)


def sample_notice(kind: NoticeKind, sub: Subscription) -> Notice:
    """What a template is rendered on when the Renderer is built, so a typo fails at start."""
    if kind is NoticeKind.EVENT:
        event = _sample_event("EXITED", 0)
        return Notice(kind, mail_id(kind, event.id, sub.name), (event,), 1, recent=3)
    events = (_sample_event("EXITED", 0), _sample_event("EXITED", 5, signal="SIGKILL"),
              _sample_event("FATAL", 9, spawnerr="can't find command"))
    # The labels a digest of this subscription has: one per group_by field.
    labels = {by.value: str(getattr(events[0], by.value)) for by in sub.group_by}
    return Notice(kind, mail_id(kind, "sample", sub.name), events, 5, thread="<sample@opsrelay.web1>",
                  since="2026-11-27T09:58:00.000000Z", until="2026-11-27T10:58:00.000000Z", group=labels,
                  silence={"id": "0123456789ab", "matchers": "host=web1", "comment": "deploy 4711",
                           "text": "while silenced: 5 events, 1 process"}, still_down=("workers:worker_03",))
