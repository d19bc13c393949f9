"""Test doubles: the in-memory twin of the SMTP pool (production code never imports this)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiosmtplib import SMTPStatus

from relay.delivery.outcome import Reply, SendResult, ServerInfo
from relay.errors import RelayError

__all__ = ["RecordingMailer", "SentMail"]


@dataclass(frozen=True)
class SentMail:
    sender: str
    recipients: tuple[str, ...]
    raw: bytes


class RecordingMailer:
    """The in-memory twin of :class:`SmtpPool` for unit tests.

    ``send`` takes the next scripted outcome (a SendResult to return or a RelayError to
    raise); with none left it accepts every recipient except those given to ``refuse``.
    Every call is in ``attempts``; mail the "server" took is in ``sent``.
    """

    def __init__(self, outcomes: Iterable[SendResult | RelayError] = ()) -> None:
        self.outcomes: deque[SendResult | RelayError] = deque(outcomes)
        self.refusals: dict[str, Reply] = {}
        self.attempts: list[SentMail] = []
        self.sent: list[SentMail] = []
        self.check_error: RelayError | None = None
        self.checks = 0
        self.closed = False

    def script(self, *outcomes: SendResult | RelayError) -> None:
        self.outcomes.extend(outcomes)

    def refuse(self, recipient: str, code: int, text: str) -> None:
        self.refusals[recipient] = Reply(code, text)

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes, *,
                   budget: object = None) -> SendResult:
        mail = SentMail(sender, tuple(recipients), raw)
        self.attempts.append(mail)
        if self.outcomes:
            outcome = self.outcomes.popleft()
            if isinstance(outcome, RelayError):
                raise outcome
        else:
            refused = {r: self.refusals[r] for r in recipients if r in self.refusals}
            accepted = tuple(r for r in recipients if r not in refused)
            outcome = SendResult(accepted, refused, Reply(SMTPStatus.completed, "OK") if accepted else None)
        if outcome.accepted:
            self.sent.append(SentMail(sender, outcome.accepted, raw))
        return outcome

    async def check(self) -> ServerInfo:
        self.checks += 1
        if self.check_error is not None:
            raise self.check_error
        return ServerInfo("recording", 0, tls=True, authenticated=True, extensions=())

    async def close(self) -> None:
        self.closed = True
