"""sendmail's command line: every form real callers use, and one-line refusals for the rest."""

from __future__ import annotations

import pytest

from relay.sendmail.args import LIST_QUEUE, SEND, Invocation, UsageError, parse_argv


def parse(*argv: str, prog: str = "sendmail") -> Invocation:
    return parse_argv(list(argv), prog)


def test_plain_recipients_read_until_a_lone_dot() -> None:
    inv = parse("root", "ops@example.com")
    assert inv == Invocation(recipients=("root", "ops@example.com"))
    assert inv.mode == SEND and inv.dot_ends and not inv.from_headers and inv.sender is None


def test_debian_cron_invocation() -> None:
    # cron/do_command.c: MAILCMD "-FCronDaemon -i -B8BITMIME -oem" then the MAILTO user.
    inv = parse("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "user")
    assert inv == Invocation(recipients=("user",), full_name="CronDaemon", dot_ends=False)


@pytest.mark.parametrize("argv", [["-t", "-i"], ["-ti"], ["-it"], ["-t", "-oi"], ["-oi", "-t"], ["-t", "-o", "i"]])
def test_t_and_i_in_every_form(argv: list[str]) -> None:
    inv = parse(*argv)
    assert inv.from_headers and not inv.dot_ends and inv.recipients == ()


@pytest.mark.parametrize(("argv", "sender"), [
    (["-f", "a@example.com"], "a@example.com"),
    (["-fa@example.com"], "a@example.com"),
    (["-r", "a@example.com"], "a@example.com"),
    (["-ra@example.com"], "a@example.com"),
    (["-f", "<>"], "<>"),
    (["-tif", "a@example.com"], "a@example.com"),   # clustered flags, then an option with its value next
    (["-tifa@example.com"], "a@example.com"),       # ... or attached
])
def test_envelope_sender_attached_and_separate(argv: list[str], sender: str) -> None:
    assert parse(*argv, "rcpt").sender == sender
    assert parse(*argv, "rcpt").recipients == ("rcpt",)


@pytest.mark.parametrize(("argv", "name"), [(["-F", "Cron Daemon"], "Cron Daemon"), (["-FCron Daemon"], "Cron Daemon"),
                                            (["-F", ""], "")])
def test_full_name_attached_and_separate(argv: list[str], name: str) -> None:
    assert parse(*argv, "x").full_name == name


@pytest.mark.parametrize("ignored", [
    ["-B8BITMIME"], ["-B", "7BIT"], ["-oem"], ["-oee"], ["-odi"], ["-odb"], ["-o", "di"], ["-oQ/var/spool"],
    ["-O", "DeliveryMode=b"], ["-ODeliveryMode=b"], ["-N", "never"], ["-Rhdrs"], ["-V", "envid"], ["-L", "tag"],
    ["-h", "5"], ["-d0.1"], ["-X", "/tmp/log"], ["-p", "smtp"], ["-Mr"], ["-e"], ["-c"], ["-m"], ["-n"], ["-s"],
    ["-G"], ["-T"], ["-bm"], ["-b", "m"],
])
def test_options_that_change_nothing_are_accepted(ignored: list[str]) -> None:
    assert parse(*ignored, "root") == Invocation(recipients=("root",))


def test_verbose() -> None:
    assert parse("-v", "root").verbose is True


def test_options_may_follow_recipients_until_double_dash() -> None:
    assert parse("root", "-oi", "bob") == Invocation(recipients=("root", "bob"), dot_ends=False)
    # After --, even a word starting with - is a recipient.
    assert parse("-i", "--", "-odd@example.com", "-t") == Invocation(
        recipients=("-odd@example.com", "-t"), dot_ends=False)


def test_recipient_words_are_kept_as_given() -> None:
    # Address lists in one word are parsed later (relay.sendmail.addresses), with their quotes and names.
    assert parse('"Ops, Team" <ops@example.com>, root').recipients == ('"Ops, Team" <ops@example.com>, root',)


@pytest.mark.parametrize("argv", [["-bp"], ["-b", "p"]])
def test_bp_lists_the_queue(argv: list[str]) -> None:
    assert parse(*argv).mode == LIST_QUEUE


def test_invoked_as_mailq_lists_the_queue() -> None:
    assert parse(prog="mailq").mode == LIST_QUEUE
    assert parse(prog="sendmail").mode == SEND
    assert parse(prog="opsrelay-sendmail").mode == SEND


@pytest.mark.parametrize(("argv", "words"), [
    (["-bs"], "SMTP on standard input"),
    (["-bd"], "daemon"),
    (["-bD"], "daemon"),
    (["-bi"], "aliases"),
    (["-bt"], "address test"),
    (["-bv", "root"], "verification"),
    (["-I"], "aliases"),
    (["-q"], "queue"),
    (["-q1h"], "queue"),
    (["-C", "/etc/mail/sendmail.cf"], "OPSRELAY_CONFIG"),
    (["-Z"], "unknown option -Z"),
    (["--help"], "unknown option --help (sendmail has no long options)"),
    (["-f"], "-f needs a value"),
    (["root", "-F"], "-F needs a value"),
])
def test_what_cannot_be_honoured_is_refused_in_one_line(argv: list[str], words: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse(*argv)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_newaliases_is_refused() -> None:
    with pytest.raises(UsageError, match="aliases live in"):
        parse(prog="newaliases")


def test_invocations_compare_by_value() -> None:
    assert parse("-t", "a") == parse("-t", "a")
    assert parse("-t", "a") != parse("a")
    assert hash(parse("-t", "a")) == hash(parse("-t", "a"))
    assert "from_headers=True" in repr(parse("-t"))
