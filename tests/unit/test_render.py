"""relay.render: events into mail through the default and custom templates, safely."""

from __future__ import annotations

import email
import email.policy
import json
from email.message import EmailMessage
from typing import Any

import pytest

from relay.config.models import Config, Subscription
from relay.contract.event import Event, decode_event, encode_event
from relay.contract.mail import OutboundMail
from relay.errors import ConfigError, MessageDecodeError
from relay.render.context import event_context
from relay.render.renderer import Renderer, default_sender

EXPECTED_HEADERS = {
    "from", "to", "subject", "date", "message-id", "auto-submitted", "x-opsrelay-event",
    "x-opsrelay-subscription", "x-opsrelay-kind", "content-type", "content-transfer-encoding", "mime-version",
}


def make_config(*subs: dict[str, Any], **extra: Any) -> Config:
    subscriptions = subs or ({"name": "crashes", "to": ["oncall@example.com"]},)
    return Config.model_validate({"host": "relayhost", "subscriptions": list(subscriptions), **extra})


def crash(**overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "host": "web1", "group": "workers", "process": "worker_03", "event": "PROCESS_STATE_EXITED",
        "state": "EXITED", "from_state": "RUNNING", "expected": False, "pid": 4242,
        "at": "2026-11-27T10:00:00.123456Z",
        "log_tail": "Traceback (most recent call last):\nValueError: disk quota exceeded",
    }
    fields.update(overrides)
    return Event(**fields)


def render(event: Event, config: Config | None = None, sub: int = 0) -> tuple[OutboundMail, EmailMessage]:
    config = config or make_config()
    mail = Renderer(config).render(config.subscriptions[sub], event)
    parsed = email.message_from_bytes(mail.raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return mail, parsed


def header_block(raw: bytes) -> bytes:
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, "no blank line between header and body"
    return head


def assert_header_block_intact(raw: bytes, parsed: EmailMessage) -> None:
    assert not parsed.defects, parsed.defects
    assert {k.lower() for k in parsed} == EXPECTED_HEADERS
    assert len(parsed.keys()) == len(EXPECTED_HEADERS)
    for line in header_block(raw).split(b"\r\n"):
        # Each line starts a known header or continues one (RFC 5322 §2.2.3 folding).
        assert line[:1] in (b" ", b"\t") or line.split(b":", 1)[0].lower().decode() in EXPECTED_HEADERS, line
    for name in ("Subject", "From", "To", "Message-ID", "Date"):
        assert len(parsed.get_all(name) or []) == 1, name
    assert parsed.get_all("Bcc") is None
    assert parsed.get_all("Cc") is None


# -- the default templates -----------------------------------------------------------------


def test_default_subject_and_body() -> None:
    event = crash()
    mail, msg = render(event)
    subject = str(msg["Subject"])
    assert "web1" in subject and "workers:worker_03" in subject and "exited unexpectedly" in subject
    body = msg.get_content()
    assert isinstance(body, str)
    for text in ("workers:worker_03 on web1 exited unexpectedly at 2026-11-27 10:00:00 UTC",
                 "host      web1", "group     workers", "process   worker_03",
                 "state     EXITED (was RUNNING)", "expected  no", "pid       4242",
                 "event     PROCESS_STATE_EXITED", "    ValueError: disk quota exceeded",
                 "    Traceback (most recent call last):", event.id):
        assert text in body, text
    assert msg.get_content_type() == "text/plain"
    assert_header_block_intact(mail.raw, msg)


def test_envelope_and_addresses() -> None:
    config = make_config({"name": "ops", "to": ["a@example.com", "b@example.com"]},
                         smtp={"from": "alerts@example.com"})
    mail, msg = render(crash(), config)
    assert mail.sender == "alerts@example.com"
    assert mail.recipients == ("a@example.com", "b@example.com")
    assert msg["From"].addresses[0].addr_spec == "alerts@example.com"
    assert [a.addr_spec for a in msg["To"].addresses] == ["a@example.com", "b@example.com"]
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Opsrelay-Subscription"] == "ops"


def test_default_sender_uses_the_host() -> None:
    config = make_config()
    assert default_sender(config) == "opsrelay@relayhost"
    assert render(crash(), config)[0].sender == "opsrelay@relayhost"


@pytest.mark.parametrize(
    ("state", "expected", "summary"),
    [("EXITED", True, "exited as expected"), ("FATAL", None, "could not be started (FATAL)"),
     ("BACKOFF", None, "is failing to start (BACKOFF)"), ("RUNNING", None, "is running")],
)
def test_summary_per_state(state: str, expected: bool | None, summary: str) -> None:
    _, msg = render(crash(state=state, event=f"PROCESS_STATE_{state}", expected=expected, log_tail=None))
    assert str(msg["Subject"]) == f"[opsrelay] web1: workers:worker_03 {summary}"
    assert "Last lines of its log" not in msg.get_content()


def test_program_is_the_bare_name_when_group_equals_process() -> None:
    _, msg = render(crash(group="nginx", process="nginx"))
    assert str(msg["Subject"]) == "[opsrelay] web1: nginx exited unexpectedly"


# -- header injection ----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["host", "group", "process", "state", "from_state", "event", "id"])
@pytest.mark.parametrize("evil", ["x\r\nBcc: evil@example.com", "x\nBcc: evil@example.com",
                                  "x\rBcc: evil@example.com", "x\r\n\r\nBcc: evil@example.com",
                                  "x\x00\x0bBcc: evil@example.com"])
def test_names_cannot_add_a_header(field: str, evil: str) -> None:
    mail, msg = render(crash(**{field: evil}))
    assert_header_block_intact(mail.raw, msg)
    assert b"\r\nBcc:" not in header_block(mail.raw)
    if field in ("host", "group", "process"):
        assert "evil@example.com" in str(msg["Subject"])  # kept, as text on the one Subject line


def test_custom_subject_with_multiline_values_stays_one_header() -> None:
    config = make_config({"name": "s", "to": ["a@example.com"],
                          "subject": "{{ log_tail }} {{ state }}\nBcc: evil@example.com"})
    mail, msg = render(crash(state="FATAL\r\nCc: evil@example.com"), config)
    assert_header_block_intact(mail.raw, msg)
    assert "\n" not in str(msg["Subject"])


# -- non-ASCII -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "group", "process"),
    [("hôte-ü", "grüppe", "wörker_ß"), ("web1", "队列", "工人_03"), ("web1", "ж" * 40, "🙂" * 30)],
)
def test_non_ascii_names_are_encoded_words(host: str, group: str, process: str) -> None:
    mail, msg = render(crash(host=host, group=group, process=process))
    head = header_block(mail.raw)
    assert head.isascii()
    raw_subject = head.split(b"\nSubject:", 1)[1].split(b"\nDate:", 1)[0]
    assert b"=?utf-8?" in raw_subject.lower()  # RFC 2047
    assert str(msg["Subject"]) == f"[opsrelay] {host}: {group}:{process} exited unexpectedly"
    assert f"process   {process}" in msg.get_content()
    assert_header_block_intact(mail.raw, msg)


# -- Message-ID ----------------------------------------------------------------------------


def test_message_id_is_stable_per_event_and_subscription() -> None:
    config = make_config({"name": "one", "to": ["a@example.com"]}, {"name": "two", "to": ["a@example.com"]})
    event = crash()
    first, msg1 = render(event, config, 0)
    again, msg2 = render(event, config, 0)
    other_sub, msg3 = render(event, config, 1)
    other_event, msg4 = render(crash(), config, 0)
    assert first.message_id == again.message_id
    assert msg1["Message-ID"] == msg2["Message-ID"] == f"<{first.message_id}@opsrelay.relayhost>"
    assert other_sub.message_id != first.message_id and msg3["Message-ID"] != msg1["Message-ID"]
    assert other_event.message_id != first.message_id and msg4["Message-ID"] != msg1["Message-ID"]


def test_message_id_survives_the_wire() -> None:
    """A redelivered event (decoded again from its JSON) renders to the same Message-ID."""
    config = make_config()
    event = crash()
    again = decode_event(encode_event(event))
    assert render(event, config)[0].message_id == render(again, config)[0].message_id


# -- custom templates ----------------------------------------------------------------------


def test_custom_subject_and_body() -> None:
    config = make_config({"name": "custom", "to": ["a@example.com"],
                          "subject": "ALERT {{ program }} {{ state }} on {{ host }} (pid {{ pid }})",
                          "body": "{{ summary }}\n{% if log_tail %}{{ log_tail | upper }}{% endif %}\n"})
    _, msg = render(crash(), config)
    assert str(msg["Subject"]) == "ALERT workers:worker_03 EXITED on web1 (pid 4242)"
    body = msg.get_content().replace("\r\n", "\n")
    assert body == "exited unexpectedly\nTRACEBACK (MOST RECENT CALL LAST):\nVALUEERROR: DISK QUOTA EXCEEDED\n"


@pytest.mark.parametrize(
    ("which", "source", "line"),
    [("subject", "{{ host ", 1), ("body", "line one\n{% if %}\nline three\n", 2),
     ("body", "a\nb\nc\n{{ x | }}\nd\n", 4)],
)
def test_template_syntax_error_names_subscription_and_line(which: str, source: str, line: int) -> None:
    config = make_config({"name": "pager", "to": ["a@example.com"], which: source})
    with pytest.raises(ConfigError) as info:
        Renderer(config)
    text = str(info.value)
    assert "\n" not in text
    assert f"subscriptions.pager.{which}" in text
    assert f"line {line}" in text


def test_undefined_variable_fails_when_the_renderer_is_built() -> None:
    """StrictUndefined catches a typo only if something renders: that must be at start, not mid-outage."""
    config = make_config({"name": "typo", "to": ["a@example.com"], "subject": "{{ hots }} is down"})
    with pytest.raises(ConfigError, match=r"typo.*hots"):
        Renderer(config)


def test_sandbox_refuses_unsafe_attributes() -> None:
    config = make_config({"name": "evil", "to": ["a@example.com"],
                          "subject": "{{ host.__class__.__mro__[1].__subclasses__() }}"})
    with pytest.raises(ConfigError):
        Renderer(config).render(config.subscriptions[0], crash())


# -- events the relay cannot turn into mail ------------------------------------------------


def test_unencodable_name_is_refused_as_undecodable_not_a_crash() -> None:
    """A lone surrogate is valid JSON (\\ud800) but no mail can carry it.

    The relay dead-letters MessageDecodeError; anything else (UnicodeEncodeError) escapes
    its handler and leaves the event unacked for ever.
    """
    doc = json.loads(encode_event(crash()))
    doc["process"] = "worker_\ud800"
    body = json.dumps(doc).encode("ascii")  # ensure_ascii: the surrogate travels as \ud800
    config = make_config()
    renderer = Renderer(config)
    with pytest.raises(MessageDecodeError):
        event = decode_event(body)
        renderer.render(config.subscriptions[0], event)


# -- context -------------------------------------------------------------------------------


def test_event_context_cleans_names() -> None:
    context = event_context(crash(process="a\r\nb", host="h\tx"))
    assert context["process"] == "a b"
    assert context["host"] == "h x"
    assert context["program"] == "workers:a b"
    assert context["time"] == "2026-11-27 10:00:00 UTC"
    assert context["summary"] == "exited unexpectedly"


def test_event_context_keeps_odd_timestamps() -> None:
    assert event_context(crash(at="yesterday"))["time"] == "yesterday"


def test_subscription_model_is_what_renderer_reads() -> None:
    sub = Subscription.model_validate({"name": "x", "to": ["a@example.com"], "subject": "S {{ host }}"})
    config = make_config({"name": "x", "to": ["a@example.com"], "subject": "S {{ host }}"})
    mail = Renderer(config).render(sub, crash())
    assert b"Subject: S web1" in mail.raw
