"""relay.render: every kind of notice, threading, prefix, headers, HTML, log tails, template errors."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest

from relay.config.models import Config
from relay.contract.event import Event
from relay.contract.mail import OutboundMail
from relay.errors import ConfigError, MessageDecodeError, PermanentError
from relay.notify.notice import Notice, NoticeKind, event_mail_id, mail_id, message_id_header
from relay.render.context import format_duration, notice_context, ordinal, sample_notice, trim_log
from relay.render.renderer import Renderer

THREAD = "<first-crash@opsrelay.relayhost>"


def make_config(sub: dict[str, Any] | None = None, **extra: Any) -> Config:
    return Config.model_validate({"host": "relayhost",
                                  "subscriptions": [{"name": "crashes", "to": ["oncall@example.com"], **(sub or {})}],
                                  **extra})


def event(state: str = "EXITED", second: int = 0, **overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "host": "web1", "group": "workers", "process": "worker_03", "event": f"PROCESS_STATE_{state}",
        "state": state, "from_state": "RUNNING", "expected": False if state == "EXITED" else None, "pid": 4242,
        "at": f"2026-11-27T10:{second // 60:02d}:{second % 60:02d}.123456Z",
        "log_tail": "Traceback (most recent call last):\nValueError: disk quota exceeded\n",
    }
    fields.update(overrides)
    return Event(**fields)


def notice(kind: NoticeKind, events: tuple[Event, ...], total: int | None = None, **extra: Any) -> Notice:
    return Notice(kind, mail_id(kind, events[0].id, "crashes"), events, len(events) if total is None else total,
                  **extra)


def rendered(n: Notice, config: Config | None = None) -> tuple[OutboundMail, EmailMessage]:
    config = config or make_config()
    mail = Renderer(config).render_notice(config.subscriptions[0], n)
    msg = email.message_from_bytes(mail.raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return mail, msg


def text(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def crash_loop() -> tuple[Event, ...]:
    exits = tuple(event(second=2 * i, exit_status=3) for i in range(10))
    fatal = (event("FATAL", 25, from_state="BACKOFF", log_tail=None, spawnerr="can't find command '/srv/w'"),
             event("FATAL", 27, from_state="BACKOFF", log_tail=None))
    return exits + fatal


# -- EVENT ---------------------------------------------------------------------------------


def test_render_is_the_event_notice_with_the_same_message_id() -> None:
    config = make_config()
    e = event()
    old = Renderer(config).render(config.subscriptions[0], e)
    new, msg = rendered(Notice(NoticeKind.EVENT, event_mail_id(e.id, "crashes"), (e,), 1), config)
    assert old.message_id == new.message_id == event_mail_id(e.id, "crashes")
    assert msg["Message-ID"] == message_id_header(new.message_id, "relayhost")
    assert msg["X-Opsrelay-Event"] == e.id and msg["X-Opsrelay-Kind"] == "event"
    assert msg["In-Reply-To"] is None and msg["References"] is None


@pytest.mark.parametrize(("recent", "said"), [(1, None), (2, "2nd time in the last hour"),
                                              (3, "3rd time in the last hour"), (11, "11th time in the last hour")])
def test_how_often_lately(recent: int, said: str | None) -> None:
    _, msg = rendered(notice(NoticeKind.EVENT, (event(),), recent=recent))
    subject, body = str(msg["Subject"]), text(msg)
    if said is None:
        assert subject == "[opsrelay] web1: workers:worker_03 exited unexpectedly"
        assert "last hour" not in body
    else:
        assert subject == f"[opsrelay] web1: workers:worker_03 exited unexpectedly ({said})"
        assert f"exited unexpectedly at 2026-11-27 10:00:00 UTC, the {said}." in body


@pytest.mark.parametrize(
    ("fields", "said"),
    [({"exit_status": 3}, "It exited with status 3."),
     ({"exit_status": 0}, "It exited with status 0."),
     ({"signal": "SIGKILL", "exit_status": None}, "It was killed by signal SIGKILL."),
     ({"state": "FATAL", "event": "PROCESS_STATE_FATAL", "spawnerr": "can't find command '/srv/w'"},
      "supervisord could not spawn it: can't find command '/srv/w'")],
)
def test_exit_status_signal_and_spawn_error(fields: dict[str, Any], said: str) -> None:
    _, msg = rendered(notice(NoticeKind.EVENT, (event(**fields),)))
    assert said in text(msg)


def test_notes_say_why_something_is_missing() -> None:
    notes = ("exit status unknown: the process had already respawned",
             "no log tail: supervisord not reachable:\nconnection refused")
    _, msg = rendered(notice(NoticeKind.EVENT, (event(log_tail=None, notes=notes),)))
    body = text(msg)
    assert "Note: exit status unknown: the process had already respawned\n" in body
    assert "Note: no log tail: supervisord not reachable: connection refused\n" in body  # one line each
    assert "Last lines" not in body and "exited with status" not in body


def test_log_tail_is_an_indented_block_after_the_summary() -> None:
    _, msg = rendered(notice(NoticeKind.EVENT, (event(),)))
    body = text(msg)
    block = "Last lines of its log:\n\n    Traceback (most recent call last):\n    ValueError: disk quota exceeded\n"
    assert block in body
    assert body.index("exited unexpectedly at") < body.index(block) < body.index("  state     EXITED (was RUNNING)")


@pytest.mark.parametrize("state", ["STOPPING", "RUNNING"])
def test_supervisord_lifecycle(state: str) -> None:
    e = Event(host="web1", group="", process="", event=f"SUPERVISOR_STATE_CHANGE_{state}", state=state,
              at="2026-11-27T10:00:00.000000Z")
    _, msg = rendered(notice(NoticeKind.EVENT, (e,)))
    assert str(msg["Subject"]) == f"[opsrelay] web1: supervisord is {state.lower()}"
    body = text(msg)
    assert body.startswith(f"supervisord on web1 is {state.lower()} at 2026-11-27 10:00:00 UTC.\n")
    assert "group" not in body and "process   " not in body


# -- log tails -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log", "limit", "shown", "cut"),
    [("a\nbb\nccc\n", 100, "a\nbb\nccc", False),
     ("a\nbb\nccc\n", 8, "a\nbb\nccc", False),  # the trailing newline is not shown, so not counted
     ("a\nbb\nccc\n", 7, "bb\nccc", True),
     ("a\nbb\nccc\n", 6, "bb\nccc", True),     # the cut falls right after a newline: the line is whole
     ("a\nbb\nccc\n", 5, "ccc", True),         # "b\nccc": a partial line is dropped
     ("xxxxxxxxxx", 4, "…xxxx", True),         # one line longer than the budget: its end, marked
     ("é\nüüü\n", 6, "üüü", True),             # bytes, not characters: ü is two bytes in UTF-8
     ("\x1b[31mred\x1b[0m\r\n50%\r100%\n", 100, "red\n50%\n100%", False),
     ("", 100, None, False), (None, 100, None, False), ("a\n", 0, None, False)],
)
def test_trim_log(log: str | None, limit: int, shown: str | None, cut: bool) -> None:
    assert trim_log(log, limit) == (shown, cut)


def test_log_tail_follows_the_subscription_then_the_listener_setting() -> None:
    lines = "".join(f"line {i:02d}\n" for i in range(50))  # 8 bytes a line
    own = make_config({"log_tail_bytes": 24}, listener={"log_tail_bytes": 4096})
    body = text(rendered(notice(NoticeKind.EVENT, (event(log_tail=lines),)), own)[1])
    assert "    line 47\n    line 48\n    line 49\n" in body and "line 46" not in body
    assert "Last lines of its log (the end of it):" in body
    fallback = make_config(listener={"log_tail_bytes": 16})
    body = text(rendered(notice(NoticeKind.EVENT, (event(log_tail=lines),)), fallback)[1])
    assert "    line 48\n    line 49\n" in body and "line 47" not in body
    off = make_config({"log_tail_bytes": 0})
    assert "Last lines" not in text(rendered(notice(NoticeKind.EVENT, (event(log_tail=lines),)), off)[1])


# -- DIGEST --------------------------------------------------------------------------------


def test_digest_lists_every_event_in_order_with_counts() -> None:
    events = crash_loop()
    _, msg = rendered(notice(NoticeKind.DIGEST, events, group={"process": "worker_03"}))
    assert str(msg["Subject"]) == "[opsrelay] web1: workers:worker_03 crashed 12 times (EXITED x10, FATAL x2)"
    assert msg["X-Opsrelay-Kind"] == "digest" and msg["X-Opsrelay-Event"] is None
    body = text(msg)
    assert body.startswith("workers:worker_03 on web1 crashed 12 times between 10:00:00 and 10:00:27 UTC "
                           "on 2026-11-27.\nEXITED x10, FATAL x2.\n")
    rows = [line for line in body.splitlines() if line.startswith("  10:00:")]
    assert rows[0] == "  10:00:00  workers:worker_03  EXITED    exited with status 3"
    assert rows[10] == "  10:00:25  workers:worker_03  FATAL     can't find command '/srv/w'"
    assert rows[11] == "  10:00:27  workers:worker_03  FATAL"
    assert [row.split()[0] for row in rows] == [f"10:00:{2 * i:02d}" for i in range(10)] + ["10:00:25", "10:00:27"]
    # The latest log tail any event has (the FATALs have none).
    assert "Last lines of the log at 10:00:18:\n\n    Traceback (most recent call last):" in body
    assert "not listed" not in body
    assert "process=worker_03" in body


def test_digest_says_how_many_were_not_listed() -> None:
    _, msg = rendered(notice(NoticeKind.DIGEST, crash_loop()[:5], total=40))
    assert str(msg["Subject"]) == "[opsrelay] web1: workers:worker_03 crashed 40 times (EXITED x5, 35 not listed)"
    body = text(msg)
    assert "EXITED x5 among the 5 listed." in body
    assert "  … and 35 more not listed.\n" in body
    assert body.count("  10:00:") == 5


def test_digest_over_several_hosts_and_days_names_them() -> None:
    events = (event(host="web1"), event(host="web2", at="2026-11-28T00:00:05.000000Z", process="other",
                                        group="other", log_tail=None))
    _, msg = rendered(notice(NoticeKind.DIGEST, events))
    assert str(msg["Subject"]) == "[opsrelay] web1, web2: workers:worker_03, other crashed twice (EXITED x2)"
    body = text(msg)
    assert "  10:00:00                 web1 workers:worker_03  EXITED\n" in body
    assert "  2026-11-28 00:00:05 UTC  web2 other              EXITED\n" in body
    assert "Last lines of the log of web1 workers:worker_03 at 10:00:00:" in body


def test_digest_that_is_not_all_crashes() -> None:
    events = (event(), event("RUNNING", 30, from_state="STARTING", log_tail=None))
    _, msg = rendered(notice(NoticeKind.DIGEST, events))
    assert str(msg["Subject"]) == "[opsrelay] web1: workers:worker_03 changed state twice (EXITED x1, RUNNING x1)"


def test_custom_digest_templates_serve_digests_only() -> None:
    config = make_config({"subject": "ONE {{ program }}", "digest_subject": "MANY {{ total }} {{ labels_text }}",
                          "digest_body": "{% for e in events %}{{ e.when }} {{ e.state }}\n{% endfor %}"})
    _, single = rendered(notice(NoticeKind.EVENT, (event(),)), config)
    _, digest = rendered(notice(NoticeKind.DIGEST, crash_loop()[9:], group={"host": "web1"}), config)
    assert str(single["Subject"]) == "ONE workers:worker_03"
    assert str(digest["Subject"]) == "MANY 3 host=web1"
    assert text(digest) == "10:00:18 EXITED\n10:00:25 FATAL\n10:00:27 FATAL\n"


# -- RECOVERED and SUPPRESSED --------------------------------------------------------------


def running(second: int) -> Event:
    return event("RUNNING", second, from_state="STARTING", log_tail=None)


@pytest.mark.parametrize(("since", "subject"), [
    ("2026-11-27T10:00:00.123456Z", "[opsrelay] web1: workers:worker_03 recovered after 4m 12s"),
    (None, "[opsrelay] web1: workers:worker_03 recovered"),
    ("not a time", "[opsrelay] web1: workers:worker_03 recovered"),
])
def test_recovered_is_threaded_and_says_how_long(since: str | None, subject: str) -> None:
    mail, msg = rendered(notice(NoticeKind.RECOVERED, (running(252),), thread=THREAD, since=since))
    assert str(msg["Subject"]) == subject
    assert msg["In-Reply-To"] == THREAD and msg["References"] == THREAD
    assert msg["Message-ID"] == message_id_header(mail.message_id, "relayhost") != THREAD
    body = text(msg)
    assert "workers:worker_03 on web1 is running again at 2026-11-27 10:04:12 UTC" in body
    assert ("after 4m 12s down" in body) == subject.endswith("4m 12s")


def test_suppressed_summarises_what_damping_held_back() -> None:
    config = make_config({"max_mails_per_hour": 5})
    held = crash_loop()[:4]
    _, msg = rendered(notice(NoticeKind.SUPPRESSED, held, total=7, thread=THREAD,
                             since="2026-11-27T10:00:00Z", until="2026-11-27T11:00:00Z"), config)
    assert str(msg["Subject"]) == ("[opsrelay] web1: 7 more state changes of workers:worker_03 suppressed "
                                   "between 10:00:00 and 11:00:00 UTC on 2026-11-27")
    assert msg["In-Reply-To"] == THREAD
    body = text(msg)
    assert "at most 5 mails per process per hour" in body
    assert body.count("  10:00:0") == 4 and "  … and 3 more not listed." in body


@pytest.mark.parametrize(("seconds", "said"), [(0, "0s"), (0.4, "0s"), (12, "12s"), (252, "4m 12s"),
                                               (3600, "1h"), (3725, "1h 2m"), (90061, "1d 1h"), (-5, "0s")])
def test_format_duration(seconds: float, said: str) -> None:
    assert format_duration(seconds) == said


@pytest.mark.parametrize(("n", "said"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                         (12, "12th"), (13, "13th"), (21, "21st"), (22, "22nd"), (101, "101st"),
                                         (111, "111th"), (112, "112th"), (123, "123rd")])
def test_ordinal(n: int, said: str) -> None:
    assert ordinal(n) == said


# -- every kind: threading, prefix, headers, one-line subjects -----------------------------


def every_kind() -> list[Notice]:
    loop = crash_loop()
    return [notice(NoticeKind.EVENT, loop[:1]), notice(NoticeKind.DIGEST, loop),
            notice(NoticeKind.RECOVERED, (running(300),), since=loop[0].at),
            notice(NoticeKind.SUPPRESSED, loop[:3], total=9, since=loop[0].at, until=loop[-1].at)]


@pytest.mark.parametrize("n", every_kind(), ids=lambda n: n.kind.value)
def test_prefix_headers_and_thread_on_every_kind(n: Notice) -> None:
    config = make_config({"subject_prefix": "ACME\r\nBcc: evil@example.com",
                          "headers": {"X-Team": "ops · nuit\r\nBcc: evil@example.com"}})
    threaded = Notice(n.kind, n.mail_id, n.events, n.total, thread=THREAD, since=n.since, until=n.until)
    mail, msg = rendered(threaded, config)
    assert str(msg["Subject"]).startswith("ACME Bcc: evil@example.com: [opsrelay] web1")
    assert msg.get_all("Bcc") is None
    assert msg["X-Team"] == "ops · nuit Bcc: evil@example.com"
    assert b"\r\nX-Team: ops =?utf-8?q?=C2=B7?= nuit Bcc: evil@example.com\r\n" in mail.raw  # RFC 2047
    assert msg.get_all("X-Opsrelay-Kind") == [n.kind.value]
    assert msg["In-Reply-To"] == THREAD and msg["References"] == THREAD
    assert msg["X-Opsrelay-Subscription"] == "crashes"
    assert mail.message_id == n.mail_id and msg["Message-ID"] == f"<{n.mail_id}@opsrelay.relayhost>"


@pytest.mark.parametrize("n", every_kind(), ids=lambda n: n.kind.value)
def test_default_subjects_are_one_line(n: Notice) -> None:
    _, msg = rendered(n)
    subject = str(msg["Subject"])
    assert "\n" not in subject and "  " not in subject and subject.startswith("[opsrelay] web1")
    assert msg.get_content_type() == "text/plain"


def test_multi_line_subject_templates_become_one_line() -> None:
    config = make_config({"subject": "{{ program }}\n\n   {{ state }}\n"})
    _, msg = rendered(notice(NoticeKind.EVENT, (event(),)), config)
    assert str(msg["Subject"]) == "workers:worker_03 EXITED"


def test_thread_value_cannot_add_a_header() -> None:
    _, msg = rendered(notice(NoticeKind.RECOVERED, (running(5),), thread="<a@b>\r\nBcc: evil@example.com"))
    assert msg.get_all("Bcc") is None
    assert "\n" not in str(msg["In-Reply-To"])


# -- HTML ----------------------------------------------------------------------------------


HTML = "<p>{{ program }} {{ summary }}</p>{% if log_tail %}<pre>{{ log_tail }}</pre>{% endif %}"


def test_html_is_an_escaped_alternative_after_the_text() -> None:
    config = make_config({"html": HTML})
    e = event(process="<script>alert(1)</script>", log_tail="<b>bold</b> & more")
    _, msg = rendered(notice(NoticeKind.EVENT, (e,)), config)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]  # RFC 2046 §5.1.4
    html = parts[1].get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "<pre>&lt;b&gt;bold&lt;/b&gt; &amp; more</pre>" in html
    assert "<script>alert(1)</script>" in text(msg)  # the text part is not escaped


def test_html_serves_digests_but_not_built_in_kinds() -> None:
    config = make_config({"html": "<p>{{ kind }}: {{ total }}</p>"})
    _, digest = rendered(notice(NoticeKind.DIGEST, crash_loop()), config)
    part = digest.get_body(preferencelist=("html",))
    assert part is not None and "<p>digest: 12</p>" in part.get_content()
    _, recovered = rendered(notice(NoticeKind.RECOVERED, (running(5),)), config)
    assert recovered.get_content_type() == "text/plain"


# -- template errors at start --------------------------------------------------------------


def build_error(sub: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        Renderer(make_config(sub))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("field", "source", "line", "said"),
    [("body", "first\nsecond\n{{ hots }} is down\n", 3, "unknown variable 'hots' (did you mean"),
     # A branch the sample does not take is checked all the same.
     ("body", "a\n{% if false %}\n{{ exti_status }}\n{% endif %}", 3, "unknown variable 'exti_status'"),
     ("subject", "{{ program }} {{ zzz }}", 1, "unknown variable 'zzz'"),
     ("digest_body", "a\n{{ events[0].hots }}\n", 2, "fails on a sample digest notice"),
     # Without group_by a digest covers the whole subscription: it has no labels.
     ("digest_body", "{{ labels.process }}", 1, "fails on a sample digest notice"),
     ("body", "x\ny\n{{ pid + 'a' }}", 3, "fails on a sample event notice"),
     ("html", "<p>\n{{ host.__class__ }}</p>", 2, "unsafe"),
     ("digest_subject", "{{ total ", 1, "syntax error"),
     ("html", "<p>\n{% for e in %}</p>", 2, "syntax error")],
)
def test_template_errors_name_subscription_field_and_line(field: str, source: str, line: int, said: str) -> None:
    message = build_error({field: source})
    assert message.startswith(f"(defaults), subscriptions.crashes.{field}: line {line}: ")
    assert said in message


def test_digest_labels_follow_group_by() -> None:
    config = make_config({"group_by": ["host", "process"], "group_wait": "5s",
                          "digest_subject": "{{ labels.host }}/{{ labels.process }}: {{ total }}"})
    _, msg = rendered(notice(NoticeKind.DIGEST, crash_loop(), group={"host": "web1", "process": "worker_03"}), config)
    assert str(msg["Subject"]) == "web1/worker_03: 12"


def test_template_error_names_the_file_the_config_came_from(tmp_path: Any) -> None:
    from relay.config.models import load_config

    path = tmp_path / "opsrelay.toml"
    path.write_text('[[subscriptions]]\nname = "pager"\nto = ["a@example.com"]\n'
                    'digest_subject = "{{ totl }}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Renderer(load_config(path))
    assert str(info.value).startswith(f"{path}, subscriptions.pager.digest_subject: line 1: unknown variable 'totl'")


def test_every_variable_the_docstring_promises_is_there() -> None:
    import relay.render.context

    config = make_config()
    context = notice_context(sample_notice(NoticeKind.DIGEST, config.subscriptions[0]), config.subscriptions[0],
                             config)
    doc = relay.render.context.__doc__ or ""
    documented = {word.strip("`") for word in doc.replace(",", " ").replace("(", " ").split()
                  if word.startswith("``") and word.endswith("``")}
    assert set(context) - {"v"} <= documented | {"v"}, set(context) - documented
    assert "v" in context


# -- template errors on a real notice ------------------------------------------------------


def test_a_template_that_fails_on_a_real_event_is_permanent() -> None:
    config = make_config({"body": "ok\n{{ pid + 1 }}\n"})  # the sample has a pid; a FATAL event has none
    renderer = Renderer(config)
    with pytest.raises(PermanentError) as info:
        renderer.render(config.subscriptions[0], event("FATAL", pid=None))
    assert not isinstance(info.value, MessageDecodeError)  # the daemon dead-letters it as a replayable event
    assert "subscription crashes: template body (line 2) failed on this event notice" in str(info.value)


def test_a_notice_without_events_is_permanent() -> None:
    config = make_config()
    with pytest.raises(PermanentError, match="without events"):
        Renderer(config).render_notice(config.subscriptions[0], Notice(NoticeKind.DIGEST, "m", (), 0))


@pytest.mark.parametrize("kind", list(NoticeKind))
def test_built_in_templates_render_every_sample(kind: NoticeKind) -> None:
    config = make_config()
    n = sample_notice(kind, config.subscriptions[0])
    mail, msg = rendered(n, config)
    assert mail.message_id == n.mail_id
    assert text(msg).endswith("\n")
