"""Message preparation and the address rules of the sendmail front end, all pure."""

from __future__ import annotations

import email.header
import email.utils
import io
import os
import re
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.sendmail.addresses import (
    AddressError,
    check_mailbox,
    envelope_sender,
    format_mailbox,
    parse_address_list,
    qualify,
    resolve_recipient,
)
from relay.sendmail.prep import (
    MessageError,
    TooLarge,
    format_date,
    make_message_id,
    normalise_newlines,
    prepare,
    read_message,
    split_header,
)

NOW = 1795775400.0  # 2026-11-27 10:30:00 UTC, a Friday


class Trickle:
    """A stream that hands out ``size`` bytes per read and fails if read past ``stop_after``."""

    def __init__(self, data: bytes, size: int, stop_after: int | None = None) -> None:
        self.data, self.size, self.pos, self.stop_after = data, size, 0, stop_after

    def read1(self, n: int = -1) -> bytes:
        if self.stop_after is not None and self.pos >= self.stop_after:
            raise AssertionError("read past the end of the message: a waiting writer would hang")
        chunk = self.data[self.pos:self.pos + min(self.size, n)]
        self.pos += len(chunk)
        return chunk


def read(data: bytes, *, dot_ends: bool = True, size: int = 65536, max_size: int = 10**6) -> bytes:
    return read_message(Trickle(data, size), dot_ends=dot_ends, max_size=max_size)


def prep(data: bytes, **overrides: object) -> tuple[bytes, tuple[str, ...]]:
    options: dict[str, object] = {"from_address": "root@web1.example.com", "full_name": "",
                                  "extract_recipients": False, "from_line_override": True, "now": NOW,
                                  "unique": "42.abc", "domain": "web1.example.com"}
    options.update(overrides)
    prepared = prepare(data, **options)  # type: ignore[arg-type]
    return prepared.raw, prepared.header_recipients


def header(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[0]


@pytest.fixture
def utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


# -- reading stdin -----------------------------------------------------------------------------


def test_a_lone_dot_ends_the_input_without_i() -> None:
    assert read(b"Subject: x\n\nline\n.\nafter\n") == b"Subject: x\n\nline\n"
    assert read(b"Subject: x\r\n\r\nline\r\n.\r\nafter") == b"Subject: x\r\n\r\nline\r\n"
    assert read(b".\nall of it\n") == b""
    assert read(b"last\n.") == b"last\n"  # "." then EOF


def test_with_i_the_dot_is_data() -> None:
    data = b"Subject: x\n\nline\n.\nafter\n"
    assert read(data, dot_ends=False) == data


def test_dots_that_are_not_alone_are_data() -> None:
    data = b"Subject: x\n\n..\n.a\n a.\n. \n"
    assert read(data) == data


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_a_dot_line_split_across_reads_is_found(size: int) -> None:
    assert read(b"ab\n.x\n.\ntail\n", size=size) == b"ab\n.x\n"


def test_nothing_is_read_past_the_dot_line() -> None:
    data = b"Subject: x\n\nbody\n.\n"
    stream = Trickle(data + b"the writer would still be waiting here", size=4, stop_after=len(data))
    assert read_message(stream, dot_ends=True, max_size=1000) == b"Subject: x\n\nbody\n"


def test_the_size_limit() -> None:
    assert read(b"x" * 100, dot_ends=False, max_size=100) == b"x" * 100
    with pytest.raises(TooLarge, match=r"larger than sendmail\.max_size \(100 bytes\)"):
        read(b"x" * 101, dot_ends=False, max_size=100)
    # The message ends at the dot: what follows does not count.
    assert read(b"x\n.\n" + b"y" * 500, max_size=100) == b"x\n"


def test_reading_stops_at_the_limit_without_reading_everything() -> None:
    stream = Trickle(b"x" * 10_000_000, size=65536, stop_after=200_000)
    with pytest.raises(TooLarge):
        read_message(stream, dot_ends=False, max_size=100_000)


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"", b"\r", b". ", b"x.y"]), max_size=12),
       st.integers(1, 9), st.booleans())
def test_reading_matches_a_line_by_line_reader(lines: list[bytes], size: int, crlf: bool) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = end.join(lines) + (end if lines else b"")
    expected = bytearray()
    for line in data.splitlines(keepends=True):
        if line.rstrip(b"\r\n") == b".":
            break
        expected += line
    assert read(data, size=size) == bytes(expected)


# -- line ends and the header --------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), [
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    (b"a\rb\r", b"a\r\nb\r\n"),
    (b"a\r\n\nb\r\r\n", b"a\r\n\r\nb\r\n\r\n"),
    (b"no newline", b"no newline"),
])
def test_every_line_end_becomes_crlf(given: bytes, expected: bytes) -> None:
    assert normalise_newlines(given) == expected


@given(st.binary(max_size=200))
def test_normalising_keeps_every_other_byte(data: bytes) -> None:
    out = normalise_newlines(data)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", out) is None
    assert out.replace(b"\r\n", b"") == data.replace(b"\r\n", b"").replace(b"\r", b"").replace(b"\n", b"")
    assert normalise_newlines(out) == out


def test_header_fields_keep_their_continuation_lines() -> None:
    fields, body = split_header(b"Subject: a\r\n b\r\nTo: x@y\r\n\r\nbody\r\n")
    assert fields == [b"Subject: a\r\n b", b"To: x@y"] and body == b"body\r\n"


def test_input_without_a_header_is_all_body() -> None:
    assert split_header(b"hello\r\nworld\r\n") == ([], b"hello\r\nworld\r\n")
    assert split_header(b"\r\nbody\r\n") == ([], b"\r\nbody\r\n")


def test_a_leading_mbox_from_line_is_dropped() -> None:
    fields, _ = split_header(b"From 1234abcd Mon Sep 17 00:00:00 2001\r\nSubject: x\r\n\r\nb")
    assert fields == [b"Subject: x"]


@pytest.mark.parametrize("data", [
    b"Subject: x\r\nthis is not a header\r\n\r\nbody",
    b"Subject: x\r\nBad Name: y\r\n\r\n",
    b"To: a@b\r\n: empty name\r\n",
])
def test_a_malformed_header_is_refused_with_its_line(data: bytes) -> None:
    with pytest.raises(MessageError, match=r"line 2 of the header is not a header field"):
        split_header(data)


def test_obsolete_space_before_the_colon_is_a_field() -> None:
    assert split_header(b"Subject : x\r\n\r\n")[0] == [b"Subject : x"]


# -- prepare -------------------------------------------------------------------------------------


def test_date_message_id_and_from_are_added(utc: None) -> None:
    raw, rcpts = prep(b"Subject: hi\n\nbody\n")
    assert raw == (b"Subject: hi\r\nFrom: root@web1.example.com\r\nDate: Fri, 27 Nov 2026 10:30:00 +0000\r\n"
                   b"Message-ID: <20261127103000.42.abc@web1.example.com>\r\n\r\nbody\r\n")
    assert rcpts == ()


def test_fields_the_message_has_are_kept_as_they_are() -> None:
    data = b"From: Me <me@example.org>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nmessage-id: <x@y>\n\nb\n"
    raw, _ = prep(data)
    assert raw == normalise_newlines(data)


def test_without_from_line_override_the_from_is_the_envelope_s() -> None:
    raw, _ = prep(b"From: spoofed@example.org\nFrom: twice@example.org\nSubject: x\n\nb\n",
                  from_line_override=False, full_name="Cron Daemon")
    assert b"spoofed" not in raw and b"twice" not in raw
    assert b"\r\nFrom: Cron Daemon <root@web1.example.com>\r\n" in raw


def test_a_full_name_names_the_generated_from() -> None:
    raw, _ = prep(b"Subject: x\n\nb\n", full_name="CronDaemon")
    assert b"From: CronDaemon <root@web1.example.com>\r\n" in raw


def test_8bit_bytes_and_long_lines_pass_byte_for_byte() -> None:
    body = "Grüße, ça va? ☃\n".encode() + b"\xff\xfe raw bytes\n" + b"L" * 5000 + b"\n"
    raw, _ = prep("Subject: Grüße\n\n".encode() + body)
    assert raw.endswith(b"\r\n\r\n" + normalise_newlines(body))
    assert "Subject: Grüße\r\n".encode() in raw


def test_a_message_without_a_header_gets_one() -> None:
    raw, _ = prep(b"just a line from a script\n")
    assert raw.startswith(b"From: root@web1.example.com\r\nDate: ")
    assert raw.endswith(b"\r\n\r\njust a line from a script\r\n")


def test_minus_t_takes_to_cc_and_bcc_and_drops_bcc() -> None:
    data = (b'To: a@example.com, "Doe, J" <j@example.com>\nCc: team: c1@example.com, c2@example.com;\n'
            b"Bcc: hidden@example.com,\n  hidden2@example.com\nSubject: x\n\nbody\n")
    raw, rcpts = prep(data, extract_recipients=True)
    assert rcpts == ("a@example.com", "j@example.com", "c1@example.com", "c2@example.com",
                     "hidden@example.com", "hidden2@example.com")
    assert b"hidden" not in raw and b"Bcc" not in raw
    assert raw.startswith(b'To: a@example.com, "Doe, J" <j@example.com>\r\nCc: team:')


def test_without_minus_t_no_recipients_are_read_and_bcc_is_still_removed() -> None:
    # sendmail 8 strips Bcc in either mode: recipients named on the command line must not see it.
    raw, rcpts = prep(b"To: a@example.com\nBcc: b@example.com\n\nx\n")
    assert rcpts == () and b"Bcc" not in raw and b"To: a@example.com" in raw


def test_resent_fields_replace_the_original_recipients() -> None:
    data = b"To: old@example.com\nResent-To: new@example.com\nResent-Bcc: hid@example.com\nBcc: keep@example.com\n\nx\n"
    raw, rcpts = prep(data, extract_recipients=True)
    assert rcpts == ("new@example.com", "hid@example.com")
    assert b"Resent-Bcc" not in raw and b"Bcc:" not in raw and b"Resent-To: new@example.com" in raw


def test_undisclosed_recipients_is_no_recipient() -> None:
    assert prep(b"To: undisclosed-recipients:;\n\nx\n", extract_recipients=True)[1] == ()


@pytest.mark.parametrize("data", [b"", b"\n", b" \r\n\t\n"])
def test_an_empty_message_is_refused(data: bytes) -> None:
    with pytest.raises(MessageError, match="empty"):
        prep(data)


def test_a_malformed_recipient_header_is_refused_with_minus_t() -> None:
    with pytest.raises(MessageError, match=r"To: .*not a mail address"):
        prep(b"To: two words@example.com\n\nx\n", extract_recipients=True)


def test_dates_in_another_timezone() -> None:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/St_Johns"  # -03:30 in November
    time.tzset()
    try:
        assert format_date(NOW) == "Fri, 27 Nov 2026 07:00:00 -0330"
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_dates_parse_back(utc: None) -> None:
    assert email.utils.parsedate_to_datetime(format_date(NOW)).timestamp() == NOW
    assert make_message_id(NOW, "1.2", "h.example") == "<20261127103000.1.2@h.example>"


# -- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("a@x", ["a@x"]),
    ("Bob <b@y>, a@x (Al, the boss)", ["b@y", "a@x"]),
    ('"Doe, John" <j@x>', ["j@x"]),
    ("root", ["root"]),
    ("team: a@x, b@y;, c@z", ["a@x", "b@y", "c@z"]),
    ("undisclosed-recipients:;", []),
    ("<@relay.example:user@host.example>", ["user@host.example"]),
    ('"john doe"@example.com', ['"john doe"@example.com']),
    ("user@[192.0.2.1]", ["user@[192.0.2.1]"]),
    ("=?utf-8?q?J=C3=BCrgen?= <j@x>", ["j@x"]),
    ("", []),
])
def test_address_lists(text: str, expected: list[str]) -> None:
    assert parse_address_list(text) == expected


@pytest.mark.parametrize("text", ["two words@x", "a@", "@x", "a@b@c", "<a@x", "bad\r\n@x", "a@x y"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address_list(text)


_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-+", min_size=1, max_size=8).filter(
    lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s)
_name = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ abc,", max_size=10)


@given(st.lists(st.tuples(_name, _atom, _atom), min_size=1, max_size=5))
def test_address_lists_agree_with_the_email_package(entries: list[tuple[str, str, str]]) -> None:
    text = ", ".join(email.utils.formataddr((name.strip(), f"{local}@{domain}")) for name, local, domain in entries)
    assert parse_address_list(text) == [addr for _, addr in email.utils.getaddresses([text])]


def test_local_recipients_go_through_the_aliases() -> None:
    aliases = {"root": "ops@example.com", "*": "catchall@example.com"}
    assert resolve_recipient("root", aliases, "web1") == "ops@example.com"
    assert resolve_recipient("Root", aliases, "web1") == "ops@example.com"
    assert resolve_recipient("www-data", aliases, "web1") == "catchall@example.com"
    assert resolve_recipient("root@elsewhere.org", aliases, "web1") == "root@elsewhere.org"
    assert resolve_recipient("www-data", {}, "web1.example.com") == "www-data@web1.example.com"


def test_the_envelope_sender_order() -> None:
    senders = {"root": "me@gmail.example"}
    assert envelope_sender("x@y.org", "root", senders, "alerts@e.org", "d.org") == "x@y.org"
    assert envelope_sender("cron", "root", senders, "alerts@e.org", "d.org") == "cron@d.org"
    assert envelope_sender("<>", "root", senders, "alerts@e.org", "d.org") == ""
    assert envelope_sender(None, "root", senders, "alerts@e.org", "d.org") == "me@gmail.example"
    assert envelope_sender(None, "bob", senders, "alerts@e.org", "d.org") == "alerts@e.org"
    assert envelope_sender(None, "bob", senders, "", "d.org") == "bob@d.org"
    with pytest.raises(AddressError):
        envelope_sender("two words", "root", {}, "", "d.org")


def test_qualify_and_check() -> None:
    assert qualify("a", "d.org") == "a@d.org" and qualify("a@x", "d.org") == "a@x"
    assert check_mailbox("a.b+c@x.org") == "a.b+c@x.org"


@pytest.mark.parametrize(("name", "expected"), [
    ("CronDaemon", "CronDaemon <a@x>"),
    ("Cron Daemon", "Cron Daemon <a@x>"),
    ("Doe, John", '"Doe, John" <a@x>'),
    ('Say "hi"', '"Say \\"hi\\"" <a@x>'),
    ("", "a@x"),
    ("Evil\r\nBcc: victim@x", '"Evil Bcc: victim@x" <a@x>'),  # one line, quoted: never a new field
])
def test_from_names_are_quoted_when_needed(name: str, expected: str) -> None:
    assert format_mailbox(name, "a@x") == expected


def test_non_ascii_names_are_encoded_and_decode_back() -> None:
    name = "Jürgen Größer-Überlänge " * 3
    value = format_mailbox(name, "j@x")
    assert value.isascii() and value.endswith(" <j@x>")
    assert all(len(word) <= 75 for word in value.split())  # RFC 2047 §2
    # RFC 2047 §6.2: the space between adjacent encoded-words is not part of the text.
    # (email.headerregistry keeps it, a CPython quirk; email.header follows the RFC.)
    words = value.removesuffix(" <j@x>")
    assert str(email.header.make_header(email.header.decode_header(words))) == " ".join(name.split())


def test_the_input_stream_can_be_a_real_buffered_reader() -> None:
    stream = io.BufferedReader(io.BytesIO(b"Subject: x\n\nb\n.\nrest\n"))  # type: ignore[arg-type]
    assert read_message(stream, dot_ends=True, max_size=100) == b"Subject: x\n\nb\n"
