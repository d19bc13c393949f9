"""relay.delivery: the pure decisions, table by table; and the RecordingMailer twin."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config.models import RetryConfig, SmtpConfig
from relay.delivery.outcome import Mailer, Reply, SendResult
from relay.delivery.plan import (
    DeadLetter,
    Decision,
    Delivered,
    Fault,
    Hold,
    ReplyClass,
    Retry,
    backoff,
    classify,
    decide,
)
from relay.delivery.smtp import SmtpPool
from relay.errors import (
    BrokerUnavailable,
    ConfigError,
    MessageDecodeError,
    ProtocolError,
    RelayError,
    SMTPConnectError,
    SMTPPermanentError,
    SMTPSecurityError,
    SMTPTemporaryError,
    SMTPTimeoutError,
)
from tests.doubles import RecordingMailer

STEPS = (30.0, 120.0, 600.0)
RETRY = RetryConfig(max_attempts=3, backoff=STEPS)
OK = Reply(250, "2.0.0 OK queued")
NO_USER = Reply(550, "5.1.1 no such user")
LATER = Reply(451, "4.3.0 try later")
FULL = Reply(452, "4.2.2 mailbox full")


@pytest.mark.parametrize(("attempt", "delay"), [(1, 30.0), (2, 120.0), (3, 600.0), (4, 600.0), (50, 600.0)])
def test_backoff_last_step_repeats(attempt: int, delay: float) -> None:
    assert backoff(attempt, STEPS) == delay


@pytest.mark.parametrize(("attempt", "steps"), [(0, STEPS), (-1, STEPS), (1, ())])
def test_backoff_rejects_nonsense(attempt: int, steps: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        backoff(attempt, steps)


@pytest.mark.parametrize(("code", "expected"), [
    (250, ReplyClass.POSITIVE),
    (251, ReplyClass.POSITIVE),
    (421, ReplyClass.TRANSIENT),
    (450, ReplyClass.TRANSIENT),
    (451, ReplyClass.TRANSIENT),
    (452, ReplyClass.TRANSIENT),
    (454, ReplyClass.TRANSIENT),
    (500, ReplyClass.PERMANENT),
    (530, ReplyClass.PERMANENT),
    (550, ReplyClass.PERMANENT),
    (554, ReplyClass.PERMANENT),
    (-1, ReplyClass.TRANSIENT),   # aiosmtplib's SMTPStatus.invalid_response: a garbled reply
    (354, ReplyClass.TRANSIENT),  # an intermediate reply where a final one belongs
    (199, ReplyClass.TRANSIENT),
    (0, ReplyClass.TRANSIENT),
])
def test_classify(code: int, expected: ReplyClass) -> None:
    assert classify(code) is expected


ABC = ("a@x.test", "b@x.test", "c@x.test")


@pytest.mark.parametrize(("outcome", "attempt", "holds", "plan"), [
    pytest.param(SendResult(ABC, {}, OK), 1, 0, (Delivered(ABC, "250 2.0.0 OK queued"),), id="all delivered"),
    pytest.param(SendResult(("a@x.test",), {"b@x.test": NO_USER, "c@x.test": LATER}, OK), 1, 0, (
        Delivered(("a@x.test",), "250 2.0.0 OK queued"),
        DeadLetter(("b@x.test",), "550 5.1.1 no such user"),
        Retry(("c@x.test",), 30.0, "451 4.3.0 try later"),
    ), id="mixed: each recipient its own fate"),
    pytest.param(SendResult(("a@x.test",), {"c@x.test": LATER}, OK), 2, 0, (
        Delivered(("a@x.test",), "250 2.0.0 OK queued"),
        Retry(("c@x.test",), 120.0, "451 4.3.0 try later"),
    ), id="second attempt waits the second step"),
    pytest.param(SendResult((), {"b@x.test": LATER, "c@x.test": LATER}), 1, 0, (
        Retry(("b@x.test", "c@x.test"), 30.0, "451 4.3.0 try later"),
    ), id="same refusal: one group"),
    pytest.param(SendResult((), {"b@x.test": LATER, "c@x.test": FULL}), 1, 0, (
        Retry(("b@x.test",), 30.0, "451 4.3.0 try later"),
        Retry(("c@x.test",), 30.0, "452 4.2.2 mailbox full"),
    ), id="different temporary refusals"),
    pytest.param(SendResult((), {"b@x.test": NO_USER, "c@x.test": Reply(553, "5.1.3 bad address")}), 1, 0, (
        DeadLetter(("b@x.test",), "550 5.1.1 no such user"),
        DeadLetter(("c@x.test",), "553 5.1.3 bad address"),
    ), id="all refused for good"),
    pytest.param(SendResult(("a@x.test",), {"c@x.test": LATER}, OK), 3, 0, (
        Delivered(("a@x.test",), "250 2.0.0 OK queued"),
        DeadLetter(("c@x.test",), "gave up after 3 attempts: 451 4.3.0 try later", exhausted=True),
    ), id="temporary refusal on the last attempt"),
    pytest.param(SMTPTemporaryError(451, "4.3.0 queue full"), 1, 0, (
        Retry(ABC, 30.0, "451 4.3.0 queue full"),
    ), id="4xx on DATA: all retry"),
    pytest.param(SMTPConnectError("connection refused"), 2, 0, (
        Retry(ABC, 120.0, "connection refused"),
    ), id="smarthost down"),
    pytest.param(SMTPTimeoutError("no answer"), 3, 0, (
        DeadLetter(ABC, "gave up after 3 attempts: no answer", exhausted=True),
    ), id="timeouts until attempts run out"),
    pytest.param(BrokerUnavailable("broker gone"), 1, 0, (Retry(ABC, 30.0, "broker gone"),), id="transient"),
    pytest.param(ProtocolError("garbled"), 1, 0, (Retry(ABC, 30.0, "garbled"),), id="unforeseen: retried"),
    pytest.param(SMTPPermanentError(554, "5.6.0 rejected"), 1, 0, (
        DeadLetter(ABC, "554 5.6.0 rejected"),
    ), id="5xx on DATA: dead at once"),
    pytest.param(MessageDecodeError("not JSON"), 1, 0, (DeadLetter(ABC, "not JSON"),), id="undecodable"),
    pytest.param(SMTPSecurityError("STARTTLS not offered"), 1, 0, (
        Hold(ABC, "STARTTLS not offered", 30.0, Fault.SECURITY),
    ), id="smarthost fault: held"),
    pytest.param(SMTPSecurityError("AUTH rejected: 535"), 3, 0, (
        Hold(ABC, "AUTH rejected: 535", 30.0, Fault.SECURITY),
    ), id="held even after max attempts: never dead-lettered"),
    pytest.param(SMTPSecurityError("certificate"), 1, 1, (Hold(ABC, "certificate", 120.0, Fault.SECURITY),),
                 id="hold backs off"),
    pytest.param(ConfigError("bad", key="smtp.host"), 1, 9, (Hold(ABC, "smtp.host: bad", 600.0),),
                 id="config fault, last step repeats"),
])
def test_decide(outcome: SendResult | RelayError, attempt: int, holds: int,
                plan: tuple[Decision, ...]) -> None:
    assert decide(outcome, ABC, attempt, RETRY, holds=holds) == plan


@given(
    replies=st.dictionaries(st.sampled_from([f"r{n}@x.test" for n in range(8)]),
                            st.sampled_from([None, 250, 421, 450, 451, 452, 550, 551, 553, 554])),
    attempt=st.integers(1, 5),
)
def test_every_recipient_gets_exactly_one_fate(replies: dict[str, int | None], attempt: int) -> None:
    accepted = tuple(r for r, code in replies.items() if code is None)
    refused = {r: Reply(code, "text") for r, code in replies.items() if code is not None}
    plan = decide(SendResult(accepted, refused, OK if accepted else None), (), attempt, RETRY)

    fates = [(r, d) for d in plan for r in d.recipients]
    assert sorted(r for r, _ in fates) == sorted(replies)
    for rcpt, fate in fates:
        if rcpt in accepted:
            assert isinstance(fate, Delivered)  # accepted recipients are never mailed again
        elif isinstance(fate, Retry):
            assert attempt < RETRY.max_attempts and refused[rcpt].code // 100 == 4


# -- the in-memory twin ---------------------------------------------------------------------


async def test_recording_mailer_accepts_and_records() -> None:
    mailer = RecordingMailer()
    mailer.refuse("bad@x.test", 550, "5.1.1 no such user")

    result = await mailer.send("s@x.test", ["a@x.test", "bad@x.test"], b"raw")

    assert result.accepted == ("a@x.test",)
    assert result.refused == {"bad@x.test": NO_USER}
    assert [m.recipients for m in mailer.sent] == [("a@x.test",)]
    assert [m.recipients for m in mailer.attempts] == [("a@x.test", "bad@x.test")]


async def test_recording_mailer_plays_its_script_then_accepts() -> None:
    mailer = RecordingMailer([SMTPTemporaryError(451, "later")])
    mailer.script(SendResult((), {"a@x.test": LATER}))
    plans = []
    for attempt in (1, 2, 3):
        try:
            outcome: SendResult | RelayError = await mailer.send("s@x.test", ["a@x.test"], b"raw")
        except RelayError as exc:
            outcome = exc
        plans.append(decide(outcome, ["a@x.test"], attempt, RETRY))

    assert plans == [
        (Retry(("a@x.test",), 30.0, "451 later"),),
        (Retry(("a@x.test",), 120.0, "451 4.3.0 try later"),),
        (Delivered(("a@x.test",), "250 OK"),),
    ]
    assert len(mailer.attempts) == 3 and len(mailer.sent) == 1


async def test_recording_mailer_check_and_close() -> None:
    mailer = RecordingMailer()
    assert (await mailer.check()).tls is True
    mailer.check_error = SMTPSecurityError("STARTTLS not offered")
    with pytest.raises(SMTPSecurityError):
        await mailer.check()
    await mailer.close()
    assert (mailer.checks, mailer.closed) == (2, True)


def test_both_mailers_are_mailers() -> None:
    mailers: list[Mailer] = [RecordingMailer(), SmtpPool(SmtpConfig(host="127.0.0.1", username=""))]
    assert all(isinstance(m, Mailer) for m in mailers)
    assert not isinstance(object(), Mailer)
