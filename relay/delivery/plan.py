"""Pure delivery decisions: what happens to each recipient after one attempt.

``decide`` turns the outcome of one SMTP attempt (a :class:`relay.delivery.outcome.SendResult`
or the :class:`relay.errors.RelayError` it raised) into a plan, one decision per
group of recipients with the same fate:

- :class:`Delivered`: the server took the mail for them (ack; never mailed again);
- :class:`Retry`: a temporary failure (4xx, timeout, lost connection) while attempts remain;
- :class:`DeadLetter`: a permanent failure (5xx), or temporary ones until ``max_attempts`` ran out;
- :class:`Hold`: a fault of the smarthost or of our configuration (STARTTLS missing, certificate,
  AUTH): never dead-lettered and not counted as an attempt, retried with backoff until fixed.

No IO here; the daemon applies the plan to the broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum, StrEnum

from relay.delivery.quota import is_quota_reply
from relay.errors import (
    ConfigurationError,
    PermanentError,
    RelayError,
    SMTPQuotaError,
    SMTPSecurityError,
    TokenError,
)
from relay.timing import backoff

TYPE_CHECKING = False
if TYPE_CHECKING:
    from relay.config.models import RetryConfig
    from relay.delivery.outcome import SendResult

__all__ = [
    "DeadLetter",
    "Decision",
    "Delivered",
    "Fault",
    "Hold",
    "Plan",
    "ReplyClass",
    "Retry",
    "classify",
    "decide",
    "fault_of",
]


class ReplyClass(Enum):
    POSITIVE = "positive"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


# RFC 5321 §4.2.1: the first digit of a reply says whether the command succeeded (2),
# failed for now (4) or failed for good (5).
_BY_FIRST_DIGIT = {2: ReplyClass.POSITIVE, 4: ReplyClass.TRANSIENT, 5: ReplyClass.PERMANENT}


def classify(code: int) -> ReplyClass:
    """2xx positive, 4xx transient, 5xx permanent.

    Anything else where a final reply belongs (``SMTPStatus.invalid_response``, a
    1xx or 3xx) is a garbled exchange, not a verdict on the mail: transient.
    """
    return _BY_FIRST_DIGIT.get(code // 100, ReplyClass.TRANSIENT) if code > 0 else ReplyClass.TRANSIENT


@dataclass(frozen=True)
class Delivered:
    recipients: tuple[str, ...]
    reply: str


@dataclass(frozen=True)
class Retry:
    recipients: tuple[str, ...]
    delay: float
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    recipients: tuple[str, ...]
    reason: str
    # True when temporary failures used up max_attempts; False for a permanent refusal.
    exhausted: bool = False


class Fault(StrEnum):
    """What kind of fault holds delivery: the ``fault`` label of ``opsrelay_held`` (few values, no text)."""

    SECURITY = "security"  # STARTTLS, certificate, AUTH or XOAUTH2 refused
    TOKEN = "token"  # noqa: S105 (a fault kind, not a secret): the OAuth2 token endpoint or token_command
    QUOTA = "quota"  # the provider's sending quota or rate
    CONFIG = "config"  # anything else of our configuration


@dataclass(frozen=True)
class Hold:
    recipients: tuple[str, ...]
    fault: str
    delay: float
    kind: Fault = Fault.CONFIG


def fault_of(error: ConfigurationError) -> Fault:
    if isinstance(error, SMTPSecurityError):
        return Fault.SECURITY
    if isinstance(error, TokenError):
        return Fault.TOKEN
    return Fault.QUOTA if isinstance(error, SMTPQuotaError) else Fault.CONFIG


Decision = Delivered | Retry | DeadLetter | Hold
# One decision per group of recipients with the same fate.
Plan = tuple[Decision, ...]


def _temporary(reason: str, attempt: int, retry: RetryConfig) -> Decision:
    if attempt >= retry.max_attempts:
        return DeadLetter((), f"gave up after {attempt} attempts: {reason}", exhausted=True)
    return Retry((), backoff(attempt, retry.backoff), reason)


def _by_reply(code: int, reply: str, attempt: int, retry: RetryConfig, holds: int) -> Decision:
    if is_quota_reply(code, reply):
        # The provider's sending limit, not this recipient: held, never dead-lettered.
        return Hold((), f"sending quota or rate exceeded: {reply}", backoff(holds + 1, retry.backoff), Fault.QUOTA)
    verdict = classify(code)
    if verdict is ReplyClass.POSITIVE:
        return Delivered((), reply)
    if verdict is ReplyClass.PERMANENT:
        return DeadLetter((), reply)
    return _temporary(reply, attempt, retry)


def decide(outcome: SendResult | RelayError, recipients: Sequence[str], attempt: int,
           retry: RetryConfig, *, holds: int = 0) -> Plan:
    """The plan after attempt number ``attempt`` (1-based) to mail ``recipients``.

    ``recipients`` matters only when the attempt raised: a SendResult names its own.
    ``holds`` is how many times this mail was already held for a configuration fault;
    it drives the Hold delay, since a held attempt does not count against ``max_attempts``.
    Recipients with the same fate share one decision, in the order they were first seen.
    """
    fates: list[tuple[str, Decision]]
    if isinstance(outcome, ConfigurationError):
        hold = Hold((), str(outcome), backoff(holds + 1, retry.backoff), fault_of(outcome))
        fates = [(rcpt, hold) for rcpt in recipients]
    elif isinstance(outcome, PermanentError):
        fates = [(rcpt, DeadLetter((), str(outcome))) for rcpt in recipients]
    elif isinstance(outcome, RelayError):
        # Transient, and anything unforeseen: the mail is not known to be at fault.
        temporary = _temporary(str(outcome), attempt, retry)
        fates = [(rcpt, temporary) for rcpt in recipients]
    else:
        delivered = Delivered((), str(outcome.reply) if outcome.reply else "")
        fates = [(rcpt, delivered) for rcpt in outcome.accepted]
        fates += [(rcpt, _by_reply(refusal.code, str(refusal), attempt, retry, holds))
                  for rcpt, refusal in outcome.refused.items()]
    groups: dict[Decision, list[str]] = {}
    for rcpt, fate in fates:
        groups.setdefault(fate, []).append(rcpt)
    return tuple(replace(fate, recipients=tuple(rcpts)) for fate, rcpts in groups.items())
