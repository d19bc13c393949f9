"""Events no subscription matched, kept in ``<prefix>.unrouted``: list and replay."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from relay.contract.event import decode_event
from relay.contract.message import HeaderValue, Message
from relay.contract.names import (
    events_exchange,
    unrouted_queue,
)
from relay.engines.base import Engine
from relay.errors import MessageDecodeError
from relay.ops.browse import exists, holding

__all__ = ["UnroutedReport", "replay_unrouted", "unrouted_summary"]



@dataclass(frozen=True, slots=True)
class UnroutedReport:
    replayed: int
    # Ready in the unrouted queue afterwards: what still matches no binding (and any
    # event that arrived unmatched meanwhile).
    remaining: int
    keys: Mapping[str, int] = field(default_factory=dict)  # routing key -> events replayed


async def replay_unrouted(engine: Engine, prefix: str) -> UnroutedReport:
    """Publish every event kept in ``<prefix>.unrouted`` to the events exchange again, with its key.

    It reaches the subscriptions bound now; one that still matches nothing comes back
    to unrouted once (through the alternate exchange), after the snapshot, so it is not
    taken again. Each original is acked only after its copy was confirmed.
    """
    queue = unrouted_queue(prefix)
    if not await exists(engine, queue):
        return UnroutedReport(0, 0)
    keys: dict[str, int] = {}
    async with holding(engine, queue) as held:
        for delivery in list(held):
            original = delivery.message
            # Through an alternate exchange a message keeps the key it was published with.
            await engine.publish(events_exchange(prefix), original.routing_key, replace(original, routing_key=""))
            await delivery.ack()
            held.remove(delivery)
            keys[original.routing_key] = keys.get(original.routing_key, 0) + 1
    return UnroutedReport(sum(keys.values()), await engine.depth(queue), keys)


def unrouted_summary(message: Message) -> dict[str, HeaderValue]:
    """One kept event, for ``opsrelay unrouted list``."""
    try:
        event = decode_event(message.body)
    except MessageDecodeError as exc:
        return {"id": message.message_id, "key": message.routing_key, "event": None, "error": str(exc)}
    return {"id": message.message_id, "key": message.routing_key,
            "event": f"{event.program} {event.state} on {event.host}", "at": event.at}
