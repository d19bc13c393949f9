"""Queue one mail on outbound through any engine: ``opsrelay send-test`` and sendmail on RabbitMQ."""

from __future__ import annotations

from relay.contract.mail import OutboundMail, to_message
from relay.contract.names import outbound_queue
from relay.contract.topology import full_topology
from relay.engines import open_engine

__all__ = ["submit"]


async def submit(url: str, prefix: str, mail: OutboundMail, *, confirm_timeout: float) -> None:
    """Declare the relay's outbound layout (idempotent) and publish ``mail``, confirmed durable."""
    async with open_engine(url, confirm_timeout=confirm_timeout) as engine:
        await engine.declare(full_topology(prefix, [], []))
        await engine.send(outbound_queue(prefix), to_message(mail))
