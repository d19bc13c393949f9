"""What one SMTP attempt returns, and the Mailer interface the relay delivers through.

Pure value types: the delivery plan (:mod:`relay.delivery.plan`) decides on these
without importing an SMTP library; :mod:`relay.delivery.smtp` makes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["Mailer", "Reply", "SendResult", "ServerInfo"]


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


@dataclass(frozen=True)
class ServerInfo:
    """What ``opsrelay check --connect`` learnt about the smarthost."""

    host: str
    port: int
    tls: bool
    authenticated: bool
    extensions: tuple[str, ...]


@runtime_checkable
class Mailer(Protocol):
    """What the daemon needs from delivery: SmtpPool, or RecordingMailer in unit tests."""

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes) -> SendResult: ...

    async def check(self) -> ServerInfo: ...

    async def close(self) -> None: ...
