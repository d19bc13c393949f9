"""Replies that say our sending quota or rate is used up, not that the mail or a recipient is wrong.

Such a reply holds delivery on that smarthost (the next one is tried first), instead of spending
the mail's attempts or dead-lettering it: a crash storm must not turn into dead letters, nor keep
hammering an account that the provider is about to block. A 5xx about a recipient
(``550 5.1.1 no such user``) is not in this table and stays a dead letter.

Matched on the enhanced status code (RFC 3463) together with a phrase, or on a phrase that only
quota replies use. Sources:

- Gmail / Google Workspace, "SMTP errors and codes" (support.google.com/a/answer/3726730):
  ``550 5.4.5 Daily user sending limit exceeded``, ``550 5.4.5 Daily SMTP relay limit exceeded``,
  ``421 4.7.0 Try again later, closing connection`` with "rate", ``421 4.7.28`` (unusual rate).
- Microsoft 365 / Exchange Online, "Sending limits" and NDR reference (learn.microsoft.com):
  ``432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded``,
  ``554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException``,
  ``4.4.2 Message submission rate for this client has exceeded the configured limit``.
- Amazon SES, "SMTP response codes": ``454 Throttling failure: Maximum sending rate exceeded``,
  ``454 Throttling failure: Daily message quota exceeded``.
"""

from __future__ import annotations

import re

__all__ = ["QUOTA_REPLIES", "is_quota_reply"]

# (enhanced status code, or None for any; phrase, case-insensitive), with the source above.
QUOTA_REPLIES: tuple[tuple[str | None, str], ...] = (
    ("5.4.5", r"sending limit|relay limit"),  # Gmail daily limits
    ("4.7.0", r"\brate\b"),  # Gmail rate limiting
    ("4.7.28", r""),  # Gmail: unusual rate of mail from this account
    ("4.3.2", r"thread limit"),  # Microsoft 365: concurrent submissions
    ("5.2.0", r"SubmissionQuotaExceeded"),  # Microsoft 365: recipient/message quota of the mailbox
    (None, r"SubmissionQuotaExceededException|submission rate .* exceeded|throttling failure"
           r"|sending (?:quota|limit) (?:exceeded|reached)"),  # Microsoft 365, SES, generic wording
)

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_TABLE = tuple((status, re.compile(phrase, re.IGNORECASE)) for status, phrase in QUOTA_REPLIES)


def is_quota_reply(code: int, text: str) -> bool:
    """True when reply ``code text`` says a sending quota or rate of ours is exceeded."""
    if code // 100 not in (4, 5):
        return False
    found = _ENHANCED.search(text)
    status = ".".join(found.groups()) if found else None
    return any((wanted is None or wanted == status) and phrase.search(text) for wanted, phrase in _TABLE)
