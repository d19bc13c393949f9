"""relay.delivery.quota: which SMTP replies say our sending quota or rate is used up.

Every reply quoted in the module's docstring (Gmail, Microsoft 365, Amazon SES) must be a
quota reply; the everyday refusals of a recipient or a busy server must not be (they are the
mail's verdict, or an ordinary retry, and a quota reply would hold them instead).
"""

from __future__ import annotations

import pytest

from relay.delivery.quota import QUOTA_REPLIES, is_quota_reply
from relay.errors import ConfigurationError, SMTPQuotaError

# (code, text) as a server sends it after the code; each one quoted in relay/delivery/quota.py.
QUOTA = [
    # Gmail / Google Workspace
    (550, "5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to"
          " https://support.google.com/a/answer/166852"),
    (550, "5.4.5 Daily SMTP relay limit exceeded for user. For more information on SMTP relay sending"
          " limits please contact your administrator"),
    (421, "4.7.0 Try again later, closing connection. Our system has detected an unusual rate of"
          " unsolicited mail originating from your IP address."),
    (421, "4.7.0 Try again later, closing connection: the rate of mail from this account is too high"),
    (421, "4.7.28 Our system has detected an unusual rate of mail originating from your IP address."),
    (421, "4.7.28 Gmail has detected an unusual rate of unsolicited mail"),
    # Microsoft 365 / Exchange Online
    (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
    (554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process"
          " message due to a permanent exception with message"),
    (452, "4.4.2 Message submission rate for this client has exceeded the configured limit"),
    # Amazon SES
    (454, "Throttling failure: Maximum sending rate exceeded."),
    (454, "Throttling failure: Daily message quota exceeded."),
]

ORDINARY = [
    (550, "5.1.1 The email account that you tried to reach does not exist (no such user)"),
    (550, "5.1.1 <nobody@example.test>: Recipient address rejected: no such user"),
    (452, "4.2.2 The email account that you tried to reach is over quota (mailbox full)"),
    (552, "5.2.2 mailbox full"),
    (451, "4.3.0 Temporary server error, try later"),
    (550, "5.7.1 Relaying denied"),
    (250, "2.0.0 OK queued"),
    (250, "OK"),
    # 4.7.0 is Gmail's rate code only with "rate" in the text; alone it is an ordinary 4xx.
    (421, "4.7.0 Try again later, closing connection."),
    (421, "4.7.0 TLS required for this server, closing connection"),
    (421, "4.7.0 Temporary System Problem. Try again later (moderate)"),  # "rate" only inside a word
    # The right enhanced code without its phrase, or the phrase with another code, is not enough.
    (550, "5.4.5 unrelated policy failure"),
    (554, "5.2.0 STOREDRV.Deliver.Exception:StoragePermanentException"),
    (451, "4.3.2 System not accepting network messages"),
    # A quota phrase in a positive reply is no refusal at all.
    (250, "2.0.0 OK: sending limit exceeded warning acknowledged"),
]


@pytest.mark.parametrize(("code", "text"), QUOTA, ids=[f"{c}-{t[:24]}" for c, t in QUOTA])
def test_quota_replies_of_the_providers_are_recognised(code: int, text: str) -> None:
    assert is_quota_reply(code, text) is True


@pytest.mark.parametrize(("code", "text"), ORDINARY, ids=[f"{c}-{t[:24]}" for c, t in ORDINARY])
def test_ordinary_replies_are_not_quota_replies(code: int, text: str) -> None:
    assert is_quota_reply(code, text) is False


@pytest.mark.parametrize(("code", "text"), [
    (550, "5.4.5 DAILY USER SENDING LIMIT EXCEEDED"),
    (554, "5.2.0 storedrv.submission.exception:submissionquotaexceededexception"),
    (454, "THROTTLING FAILURE: Maximum sending rate exceeded."),
])
def test_phrases_match_whatever_their_case(code: int, text: str) -> None:
    assert is_quota_reply(code, text) is True


def test_every_row_of_the_table_is_exercised_by_a_quoted_reply() -> None:
    """Each row of QUOTA_REPLIES matches at least one of the quoted replies (no untested row)."""
    import re

    for status, phrase in QUOTA_REPLIES:
        hits = [(code, text) for code, text in QUOTA
                if (status is None or re.search(rf"\b{re.escape(status)}\b", text))
                and re.search(phrase, text, re.IGNORECASE)]
        assert hits, f"no quoted reply for the row {(status, phrase)}"


def test_a_quota_reply_becomes_a_configuration_error_that_keeps_the_reply() -> None:
    error = SMTPQuotaError(550, "5.4.5 Daily user sending limit exceeded")
    assert isinstance(error, ConfigurationError), "held, never dead-lettered"
    assert (error.code, error.reply) == (550, "5.4.5 Daily user sending limit exceeded")
    assert "550 5.4.5 Daily user sending limit exceeded" in str(error)
