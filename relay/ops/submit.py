"""Queue one mail on outbound through any engine: ``opsrelay send-test`` and sendmail on RabbitMQ."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from relay.contract.mail import OutboundMail, to_message
from relay.contract.names import outbound_queue, submit_exchange
from relay.contract.topology import outbound_topology
from relay.engines import open_engine

__all__ = ["submit"]


async def submit(url: str, prefix: str, mail: OutboundMail, *, options: Mapping[str, Any]) -> None:
    """Declare outbound (idempotent; a login that may not configure uses what a relay declared) and
    publish ``mail`` through the submit exchange, confirmed durable.

    ``options``: the broker's engine options (confirm_timeout, queue_type, delivery_limit).
    """
    async with open_engine(url, **options) as engine:
        await engine.declare(outbound_topology(prefix), use_existing=True)
        await engine.publish(submit_exchange(prefix), outbound_queue(prefix), to_message(mail))
