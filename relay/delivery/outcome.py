"""What one SMTP attempt returns, and the Mailer interface the relay delivers through.

Pure value types: the delivery plan (:mod:`relay.delivery.plan`) decides on these
without importing an SMTP library; :mod:`relay.delivery.smtp` makes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from relay.errors import RelayError

if TYPE_CHECKING:
    from relay.config.smarthost import SmarthostConfig

__all__ = ["Budget", "Mailer", "OverBudget", "Reply", "SendResult", "ServerInfo", "SessionFault"]


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class SendResult:
    """One mail transaction: who the server took, who it refused and why.

    ``reply`` is the server's answer to the end of DATA; None when every recipient
    was refused (then no DATA was sent).
    """

    accepted: tuple[str, ...]
    refused: Mapping[str, Reply] = field(default_factory=dict)
    reply: Reply | None = None
    # ``host:port`` of the smarthost that answered ("" when not known); who answered, not what.
    smarthost: str = field(default="", compare=False)
    # The smarthosts tried before it in this attempt that could not take mail: (host:port, why).
    passed_over: tuple[tuple[str, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class ServerInfo:
    """What ``opsrelay check --connect`` learnt about the smarthost."""

    host: str
    port: int
    tls: bool
    authenticated: bool
    extensions: tuple[str, ...]
    # How we authenticated (XOAUTH2, password, none) and, with XOAUTH2, where the token came from.
    mechanism: str = ""
    token_source: str = ""


class Budget(Protocol):
    """The sending budgets of the smarthosts (``max_per_minute``/``max_per_day``), wherever they are counted."""

    async def exhausted(self, smarthost: SmarthostConfig) -> float | None:
        """None while ``smarthost`` may take another mail, else when (unix time) it may again."""

    async def spend(self, smarthost: SmarthostConfig) -> None:
        """Count one mail ``smarthost`` accepted."""


class OverBudget(Exception):
    """Every smarthost that could take the mail has spent its sending budget: the mail waits, in
    order; no attempt is spent and nothing is dead-lettered."""

    def __init__(self, until: float, smarthosts: Sequence[str]) -> None:
        super().__init__(f"waiting for the sending budget of {', '.join(smarthosts)}")
        self.until = until
        self.smarthosts = tuple(smarthosts)


@runtime_checkable
class Mailer(Protocol):
    """What the daemon needs from delivery: SmtpPool, or RecordingMailer in unit tests."""

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes, *,
                   budget: Budget | None = None) -> SendResult:
        """Deliver once; RelayError when the mail failed, OverBudget when every smarthost's budget is spent."""

    async def check(self) -> ServerInfo: ...

    async def close(self) -> None: ...


class SessionFault(Exception):
    """A smarthost could not take mail at all (down, TLS, AUTH, MAIL FROM refused, 421, quota).

    Not a verdict on the mail: the next smarthost may take it within the same attempt.
    ``error`` is what the mail gets when no smarthost can.
    """

    def __init__(self, smarthost: str, error: RelayError) -> None:
        super().__init__(f"{smarthost}: {error}")
        self.smarthost = smarthost
        self.error = error
