"""relay.mail: the outbound envelope on the queue, and raw messages built without injection."""

from __future__ import annotations

import email
import email.policy
import json
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from relay.contract.mail import CONTENT_TYPE, Attempt, OutboundMail, from_message, to_message
from relay.contract.message import HeaderValue, Message
from relay.errors import MessageDecodeError
from relay.render.mime import build_message, clean_header

RAW = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def sample() -> OutboundMail:
    return OutboundMail(
        sender="alerts@example.com",
        recipients=("a@example.com", "b@example.com"),
        raw=RAW,
        message_id="mid-1",
        attempts=2,
        history=(Attempt("2026-11-27T10:00:00Z", "451 4.3.0 try later", ("a@example.com", "b@example.com")),
                 Attempt("2026-11-27T10:01:00Z", "held: STARTTLS not offered", ())),
        origin="sendmail",
        holds=1,
    )


def test_round_trip() -> None:
    mail = sample()
    message = to_message(mail)
    assert message.content_type == CONTENT_TYPE
    assert message.message_id == "mid-1"
    assert message.body == RAW
    assert from_message(message) == mail


def test_round_trip_of_a_fresh_mail() -> None:
    mail = OutboundMail(sender="", recipients=("ops@example.com",), raw=RAW)
    again = from_message(to_message(mail))
    assert again == mail
    assert (again.attempts, again.holds, again.history, again.origin) == (0, 0, (), "event")


def test_round_trip_with_headers_as_strings_like_amqp_returns_them() -> None:
    # aio-pika hands back str/int headers; the extra header rides along untouched.
    message = to_message(sample(), held="AUTH rejected")
    assert message.headers["x-held"] == "AUTH rejected"
    assert from_message(Message(message.body, message.message_id, message.content_type,
                                dict(message.headers))) == sample()


def test_after_narrows_recipients_and_counts() -> None:
    mail = sample()
    attempt = Attempt("t", "550 no such user", ("b@example.com",))
    tried = mail.after(attempt, recipients=["b@example.com"])
    assert tried.recipients == ("b@example.com",)
    assert (tried.attempts, tried.holds) == (3, 1)
    assert tried.history == (*mail.history, attempt)
    held = mail.after(attempt, recipients=mail.recipients, held=True)
    assert (held.attempts, held.holds) == (2, 2)
    assert from_message(to_message(tried)) == tried
    assert mail.attempts == 2  # frozen: the original is untouched


def good_headers() -> dict[str, HeaderValue]:
    return dict(to_message(sample()).headers)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"x-opsrelay-v": None}, "not an opsrelay mail"),
        ({"x-opsrelay-v": 2}, "not an opsrelay mail"),
        ({"x-opsrelay-v": "1"}, "not an opsrelay mail"),
        ({"x-sender": None}, "x-sender"),
        ({"x-sender": 5}, "wrong types"),
        ({"x-recipients": "not json"}, "malformed"),
        ({"x-recipients": '"a@example.com"'}, "not a list"),
        ({"x-recipients": "[1, 2]"}, "not a list"),
        ({"x-recipients": "[]"}, "no recipients"),
        ({"x-recipients": 5}, "not a list"),
        ({"x-attempts": "3"}, "wrong types"),
        ({"x-attempts": -1}, "wrong types"),
        ({"x-attempts": True}, "wrong types"),
        ({"x-holds": "0"}, "wrong types"),
        ({"x-history": "not json"}, "malformed"),
        ({"x-history": "[[1]]"}, "malformed"),
        ({"x-history": "[5]"}, "malformed"),
        ({"x-history": "7"}, "malformed"),
        ({"x-history": '[["t", "r", 5]]'}, "malformed"),
    ],
)
def test_from_message_rejects_bad_headers(change: dict[str, HeaderValue], problem: str) -> None:
    headers = good_headers()
    for key, value in change.items():
        if value is None:
            headers.pop(key)
        else:
            headers[key] = value
    with pytest.raises(MessageDecodeError, match=problem):
        from_message(Message(RAW, "mid", CONTENT_TYPE, headers))


@pytest.mark.parametrize("missing", ["x-opsrelay-v", "x-sender", "x-recipients"])
def test_from_message_rejects_missing_required_headers(missing: str) -> None:
    headers = good_headers()
    del headers[missing]
    with pytest.raises(MessageDecodeError):
        from_message(Message(RAW, "mid", CONTENT_TYPE, headers))


def test_from_message_rejects_no_headers_and_empty_body() -> None:
    with pytest.raises(MessageDecodeError):
        from_message(Message(RAW, "mid"))
    with pytest.raises(MessageDecodeError, match="empty body"):
        from_message(Message(b"", "mid", CONTENT_TYPE, good_headers()))


def test_a_decode_error_is_permanent_so_it_is_dead_lettered() -> None:
    from relay.errors import PermanentError

    with pytest.raises(PermanentError):
        from_message(Message(RAW, "mid", CONTENT_TYPE, {"x-opsrelay-v": 1}))


# -- build_message -------------------------------------------------------------------------


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def test_build_message_headers() -> None:
    when = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    raw = build_message(sender="alerts@example.com", to=["a@example.com", "b@example.com"], subject="hello",
                        body="line 1\n.line 2\n", message_id="<x@example.com>", date=when,
                        extra_headers=[("X-Test", "1")])
    msg = parse(raw)
    assert str(msg["From"]) == "opsrelay <alerts@example.com>"
    assert [a.addr_spec for a in msg["To"].addresses] == ["a@example.com", "b@example.com"]
    assert msg["Subject"] == "hello"
    assert msg["Message-ID"] == "<x@example.com>"
    assert msg["Date"].datetime == when
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Test"] == "1"
    assert msg.get_content().replace("\r\n", "\n") == "line 1\n.line 2\n"
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")  # RFC 5322: CRLF only


def test_build_message_makes_a_message_id() -> None:
    first = parse(build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="b"))
    second = parse(build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="b"))
    assert first["Message-ID"] != second["Message-ID"]
    assert str(first["Message-ID"]).endswith("@example.com>")


@pytest.mark.parametrize("evil", ["s\r\nBcc: evil@example.com", "s\nBcc: evil@example.com", "s\rBcc: e@x"])
def test_build_message_cleans_every_value(evil: str) -> None:
    raw = build_message(sender="a@example.com", to=["b@example.com"], subject=evil, body="b",
                        sender_name=evil, extra_headers=[("X-Name", evil)])
    msg = parse(raw)
    assert msg.get_all("Bcc") is None
    assert len(msg.get_all("Subject") or []) == 1
    assert "\n" not in str(msg["Subject"]) and "\r" not in str(msg["Subject"])
    assert "Bcc" in str(msg["Subject"])  # the text is kept, on one line
    assert "\n" not in str(msg["X-Name"]) and "\n" not in str(msg["From"])


def test_build_message_non_ascii_subject_and_name() -> None:
    raw = build_message(sender="a@example.com", to=["b@example.com"], subject="Größe ≠ 0 · 队列",
                        body="Größe\n", sender_name="Überwachung")
    head = raw.partition(b"\r\n\r\n")[0]
    assert head.isascii()
    msg = parse(raw)
    assert msg["Subject"] == "Größe ≠ 0 · 队列"
    assert msg["From"].addresses[0].display_name == "Überwachung"
    assert msg.get_content().replace("\r\n", "\n") == "Größe\n"


@pytest.mark.parametrize(
    ("value", "clean"),
    [("a\r\nb", "a b"), ("a\n\n\nb", "a b"), ("  x  ", "x"), ("a\tb", "a b"), ("a\x00b\x7f", "a b"),
     ("plain", "plain"), ("ünï", "ünï"), ("\r\n", "")],
)
def test_clean_header(value: str, clean: str) -> None:
    assert clean_header(value) == clean


def test_history_header_is_json_lists() -> None:
    headers = to_message(sample()).headers
    assert json.loads(str(headers["x-history"]))[0] == ["2026-11-27T10:00:00Z", "451 4.3.0 try later",
                                                        ["a@example.com", "b@example.com"]]
    assert json.loads(str(headers["x-recipients"])) == ["a@example.com", "b@example.com"]


# -- HTML alternative, threading, extra headers, folding --------------------------------------


def test_build_message_html_is_the_second_alternative() -> None:
    raw = build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="plain ü\n",
                        html="<p>rich ü</p>\n")
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/alternative"
    text, html = msg.iter_parts()
    # RFC 2046 §5.1.4: alternatives in increasing preference, so the plain text comes first.
    assert (text.get_content_type(), html.get_content_type()) == ("text/plain", "text/html")
    assert text.get_content().replace("\r\n", "\n") == "plain ü\n"
    assert html.get_content().replace("\r\n", "\n") == "<p>rich ü</p>\n"
    assert msg.get_all("MIME-Version") == ["1.0"] and text["MIME-Version"] is None and html["MIME-Version"] is None


def test_build_message_without_html_is_plain_text() -> None:
    assert parse(build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="b\n")
                 ).get_content_type() == "text/plain"


def test_build_message_threads_under_a_message_id() -> None:
    msg = parse(build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="b",
                              thread="<first@opsrelay.web1>"))
    # RFC 5322 §3.6.4
    assert msg["In-Reply-To"] == "<first@opsrelay.web1>"
    assert msg["References"] == "<first@opsrelay.web1>"
    unthreaded = parse(build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="b"))
    assert unthreaded["In-Reply-To"] is None and unthreaded["References"] is None


def test_build_message_thread_cannot_inject() -> None:
    msg = parse(build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="b",
                              thread="<x@y>\r\nBcc: evil@example.com"))
    assert msg.get_all("Bcc") is None and "\n" not in str(msg["References"])


def test_extra_header_replaces_one_of_the_same_name() -> None:
    msg = parse(build_message(sender="a@example.com", to=["b@example.com"], subject="s", body="b",
                              extra_headers=[("Auto-Submitted", "auto-notified"), ("X-A", "1"), ("x-a", "2")]))
    assert msg.get_all("Auto-Submitted") == ["auto-notified"]
    assert msg.get_all("X-A") == ["2"]


@pytest.mark.parametrize("length", [60, 69, 70, 75, 77, 78, 79, 120, 300])
def test_long_ascii_subjects_round_trip_without_a_leading_space(length: int) -> None:
    """CPython folds a 70-77 character value onto its own line ("Subject:" CRLF SP value)."""
    words = ("crashed (EXITED x10, FATAL x2) " * 20)[:length].strip()
    raw = build_message(sender="a@example.com", to=["b@example.com"], subject=words, body="b")
    assert parse(raw)["Subject"] == words
    assert b"\r\nSubject: " + words.split()[0].encode() in raw
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
