"""The notifier's decisions: digests, flap damping, recovery notices, duplicates (pure, no clock)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import pytest

from relay.config.models import Subscription
from relay.contract.event import Event
from relay.notify.notice import NoticeKind, event_mail_id, message_id_header
from relay.notify.notifier import HOUR, Notifier
from relay.notify.state import MAX_LISTED, State

_serial = itertools.count()


def sub(**settings: Any) -> Subscription:
    return Subscription.model_validate({"name": "ops", "to": ["ops@example.com"], **settings})


def ev(state: str = "EXITED", process: str = "worker", *, host: str = "web1", expected: bool | None = False,
       at: float = 0.0) -> Event:
    n = next(_serial)
    return Event(host=host, group=process, process=process, event=f"PROCESS_STATE_{state}", state=state,
                 expected=expected if state == "EXITED" else None, at=f"2026-11-27T10:00:{at:09.6f}Z",
                 id=f"e{n}")


def test_without_settings_one_event_is_one_mail_with_the_v1_message_id() -> None:
    notifier, state = Notifier(sub(), "web1"), State()
    event = ev()
    [notice] = notifier.on_event(state, event, 100.0)
    assert notice.kind is NoticeKind.EVENT and notice.events == (event,)
    assert notice.mail_id == event_mail_id(event.id, "ops")
    assert notifier.next_due(state) is None


def test_recent_counts_this_process_in_the_last_hour() -> None:
    notifier, state = Notifier(sub(), "web1"), State()
    counts = [notifier.on_event(state, ev(), t)[0].recent for t in (0.0, 10.0, 20.0)]
    other = notifier.on_event(state, ev(process="other"), 30.0)[0].recent
    later = notifier.on_event(state, ev(), 20.0 + HOUR + 1)[0].recent
    assert counts == [1, 2, 3] and other == 1 and later == 1


def test_filtered_and_redelivered_events_make_no_mail() -> None:
    notifier, state = Notifier(sub(), "web1"), State()
    assert notifier.on_event(state, ev(expected=True), 0.0) == []
    assert notifier.on_event(state, ev("RUNNING"), 0.0) == []
    event = ev()
    assert len(notifier.on_event(state, event, 1.0)) == 1
    assert notifier.on_event(state, event, 2.0) == []


def test_crash_loop_of_30_exits_in_20s_gives_two_digests_listing_every_exit() -> None:
    notifier, state = Notifier(sub(group_wait="5s", group_interval="30s", group_by=["process"]), "web1"), State()
    sent = []
    exits = [ev(at=i * 20 / 30) for i in range(30)]
    now = 1000.0
    for i, event in enumerate(exits):
        t = now + i * 20 / 30
        sent += notifier.on_timer(state, t)
        assert notifier.on_event(state, event, t) == []
    sent += notifier.on_timer(state, now + 20)
    due = notifier.next_due(state)
    assert due == pytest.approx(now + 5 + 30, abs=20 / 30)  # 30 s after the first digest left
    assert notifier.on_timer(state, due - 0.01) == []
    sent += notifier.on_timer(state, due)
    assert [n.kind for n in sent] == [NoticeKind.DIGEST, NoticeKind.DIGEST]
    assert [e.id for n in sent for e in n.events] == [e.id for e in exits]
    assert sum(n.total for n in sent) == 30
    assert sent[0].group == {"process": "worker"}
    assert notifier.next_due(state) is None


def test_groups_are_separate_and_a_single_event_group_is_a_plain_mail() -> None:
    notifier, state = Notifier(sub(group_wait="5s", group_by=["process"]), "web1"), State()
    a1, a2, b1 = ev(process="a"), ev(process="a"), ev(process="b")
    for event in (a1, a2, b1):
        notifier.on_event(state, event, 0.0)
    sent = notifier.on_timer(state, 5.0)
    kinds = {n.events[0].process: n.kind for n in sent}
    assert kinds == {"a": NoticeKind.DIGEST, "b": NoticeKind.EVENT}
    assert next(n for n in sent if n.kind is NoticeKind.EVENT).mail_id == event_mail_id(b1.id, "ops")


def test_a_digest_of_a_very_long_loop_lists_the_first_events_and_counts_all() -> None:
    notifier, state = Notifier(sub(group_wait="5s"), "web1"), State()
    for _ in range(MAX_LISTED + 50):
        notifier.on_event(state, ev(), 0.0)
    [digest] = notifier.on_timer(state, 5.0)
    assert len(digest.events) == MAX_LISTED and digest.total == MAX_LISTED + 50


def test_pending_digests_survive_a_save_and_load_and_go_out_once() -> None:
    notifier, state = Notifier(sub(group_wait="5s"), "web1"), State()
    events = [ev(at=i) for i in range(3)]
    for i, event in enumerate(events):
        notifier.on_event(state, event, float(i))
    restored = State.loads(state.dumps())
    # The last event is redelivered after the restart (its ack was lost): not listed twice.
    assert notifier.on_event(restored, events[-1], 3.0) == []
    [digest] = notifier.on_timer(restored, 5.0)
    assert [e.id for e in digest.events] == [e.id for e in events]
    assert notifier.on_timer(restored, 100.0) == []


def test_flap_damping_holds_mails_past_the_limit_and_summarises_at_the_end_of_the_hour() -> None:
    notifier, state = Notifier(sub(max_mails_per_hour=3), "web1"), State()
    sent = [n for t in range(10) for n in notifier.on_event(state, ev(at=t), float(t))]
    assert len(sent) == 3 and all(n.kind is NoticeKind.EVENT for n in sent)
    assert notifier.next_due(state) == pytest.approx(HOUR)
    assert notifier.on_timer(state, HOUR - 1) == []
    [summary] = notifier.on_timer(state, HOUR)
    assert summary.kind is NoticeKind.SUPPRESSED and summary.total == 7 and len(summary.events) == 7
    assert summary.since == "1970-01-01T00:00:00.000000Z" and summary.until == "1970-01-01T01:00:00.000000Z"
    # A new window: mails flow again.
    assert len(notifier.on_event(state, ev(), HOUR + 5)) == 1


def test_damping_counts_each_process_apart() -> None:
    notifier, state = Notifier(sub(max_mails_per_hour=1), "web1"), State()
    assert len(notifier.on_event(state, ev(process="a"), 0.0)) == 1
    assert len(notifier.on_event(state, ev(process="b"), 0.0)) == 1
    assert notifier.on_event(state, ev(process="a"), 1.0) == []


def test_a_window_without_held_events_ends_without_a_summary() -> None:
    notifier, state = Notifier(sub(max_mails_per_hour=5), "web1"), State()
    notifier.on_event(state, ev(), 0.0)
    assert notifier.on_timer(state, HOUR) == []
    assert state.windows == {}


def test_recovery_notice_threads_under_the_first_crash_mail() -> None:
    notifier, state = Notifier(sub(send_resolved=True, states=["EXITED", "FATAL", "BACKOFF"]), "web1"), State()
    first = ev("BACKOFF", at=1)
    [crash] = notifier.on_event(state, first, 1.0)
    [again] = notifier.on_event(state, ev("FATAL", at=2), 2.0)
    running = ev("RUNNING", at=9)
    [recovered] = notifier.on_event(state, running, 9.0)
    assert recovered.kind is NoticeKind.RECOVERED and recovered.events == (running,)
    assert recovered.thread == message_id_header(crash.mail_id, "web1") != message_id_header(again.mail_id, "web1")
    assert recovered.since == first.at
    # Running again without an outage: nothing to say.
    assert notifier.on_event(state, ev("RUNNING"), 10.0) == []


def test_recovery_needs_send_resolved_and_a_mail_about_the_crash() -> None:
    plain = Notifier(sub(), "web1")
    state = State()
    plain.on_event(state, ev(), 0.0)
    assert plain.on_event(state, ev("RUNNING"), 1.0) == []
    resolved, state = Notifier(sub(send_resolved=True), "web1"), State()
    resolved.on_event(state, ev(expected=True), 0.0)  # filtered out: no mail, no outage
    assert resolved.on_event(state, ev("RUNNING"), 1.0) == []


def test_a_process_running_again_before_its_digest_goes_out_is_listed_not_recovered() -> None:
    notifier, state = Notifier(sub(send_resolved=True, group_wait="5s"), "web1"), State()
    notifier.on_event(state, ev(at=0), 0.0)
    assert notifier.on_event(state, ev("RUNNING", at=1), 1.0) == []
    [digest] = notifier.on_timer(state, 5.0)
    assert [e.state for e in digest.events] == ["EXITED", "RUNNING"]
    assert state.outages == {}


def test_digest_then_recovery_threads_under_the_digest() -> None:
    notifier, state = Notifier(sub(send_resolved=True, group_wait="5s"), "web1"), State()
    notifier.on_event(state, ev(at=0), 0.0)
    notifier.on_event(state, ev(at=1), 1.0)
    [digest] = notifier.on_timer(state, 5.0)
    [recovered] = notifier.on_event(state, ev("RUNNING", at=30), 30.0)
    assert recovered.thread == message_id_header(digest.mail_id, "web1")


def test_recovery_notices_are_not_damped_and_suppressed_crashes_open_no_outage() -> None:
    notifier, state = Notifier(sub(send_resolved=True, max_mails_per_hour=1), "web1"), State()
    assert len(notifier.on_event(state, ev(), 0.0)) == 1
    assert [n.kind for n in notifier.on_event(state, ev("RUNNING"), 1.0)] == [NoticeKind.RECOVERED]
    assert notifier.on_event(state, ev(), 2.0) == []  # held by damping
    assert notifier.on_event(state, ev("RUNNING"), 3.0) == []


def test_state_document_round_trips_every_part() -> None:
    notifier, state = Notifier(sub(send_resolved=True, max_mails_per_hour=1, group_wait="5s",
                                   group_interval="1m", group_by=["host", "state"]), "web1"), State()
    notifier.on_event(state, ev(at=0), 0.0)
    notifier.on_timer(state, 5.0)
    notifier.on_event(state, ev(at=6), 6.0)
    notifier.on_timer(state, 70.0)
    notifier.on_event(state, ev(at=71), 71.0)
    restored = State.loads(state.dumps())
    assert restored.to_doc() == state.to_doc()
    assert restored.windows and restored.outages and restored.pending and restored.last_sent


def test_a_pending_digest_keeps_only_the_newest_log_tail_and_the_newest_event_past_the_cap() -> None:
    notifier, state = Notifier(sub(group_wait="5s"), "web1"), State()
    events = [replace(ev(at=i), log_tail=f"tail {i}\n" * 200) for i in range(MAX_LISTED + 5)]
    for event in events:
        notifier.on_event(state, event, 0.0)
    [pending] = state.pending.values()
    assert [e.log_tail is not None for e in pending.events].count(True) == 1
    assert pending.events[-1].id == events[-1].id and pending.events[-1].log_tail == events[-1].log_tail
    assert pending.events[0].id == events[0].id and pending.total == MAX_LISTED + 5
    assert len(state.dumps()) < 100_000  # 105 tails of 1.4 KB each would be 150 KB


def test_held_events_keep_no_log_tail() -> None:
    notifier, state = Notifier(sub(max_mails_per_hour=1), "web1"), State()
    for t in range(3):
        notifier.on_event(state, replace(ev(), log_tail="Traceback ..."), float(t))
    [window] = state.windows.values()
    assert window.held_total == 2 and all(e.log_tail is None for e in window.held)


def test_a_recovery_absorbed_by_a_digest_also_ends_an_older_outage() -> None:
    notifier, state = Notifier(sub(send_resolved=True, group_wait="5s"), "web1"), State()
    notifier.on_event(state, ev(at=0), 0.0)
    notifier.on_event(state, ev(at=1), 1.0)
    notifier.on_timer(state, 5.0)  # the digest opens the outage
    assert state.outages
    notifier.on_event(state, ev(at=10), 10.0)  # crashes again: a new digest is pending
    assert notifier.on_event(state, ev("RUNNING", at=11), 11.0) == []
    assert state.outages == {}  # the next crash's recovery will not date back to the first one


def test_forget_lets_a_redelivered_event_through_again() -> None:
    notifier, state = Notifier(sub(), "web1"), State()
    event = ev()
    assert len(notifier.on_event(state, event, 0.0)) == 1
    state.forget(event.id)
    assert len(notifier.on_event(state, event, 1.0)) == 1
