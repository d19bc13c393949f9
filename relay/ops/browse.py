"""What waits where, and the operator's hands on it: browse, dead letters, unrouted events.

Engine-neutral: everything here goes through :class:`~relay.engines.base.Engine`
(``depth``, ``get``, ``publish``, ack/reject), so the same code serves RabbitMQ
and the embedded queue.

Browsing takes every ready message of a queue unsettled, then settles each one:
a kept message is rejected with requeue. Both engines put a requeued message
back where it was, not at the tail (the SQLite engine keeps the row and its id;
RabbitMQ classic queues keep publication order across requeues, since 2.7), so
a browse leaves the queue in its order; the messages come back marked
``redelivered``. While a browse holds them they are not ready: ``depth`` and a
consumer do not see them, and a retry queue's TTL cannot expire them (they
expire on return if due). Only queues nobody consumes are browsed (retry, dead,
unrouted), and all of a queue is held in memory for the moment.

Taking the whole queue before acting is also what keeps ``replay`` and
``replay_unrouted`` from looping: a copy that lands in the same queue again
(an event still no subscription matches, a replayed event that fails again)
arrives after the snapshot and is left alone.

Nothing is lost on the way: a copy is published (confirmed durable) before
the original is acked; a failure on the way returns whatever is not settled.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from relay.contract.message import Message
from relay.engines.base import Delivery, Engine
from relay.errors import ConfigurationError, RelayError

__all__ = ["browse", "exists", "holding"]


@contextlib.asynccontextmanager
async def holding(engine: Engine, queue: str) -> AsyncIterator[list[Delivery]]:
    """Every ready message of ``queue``, taken unsettled, oldest first.

    The caller removes from the list what it settled; the rest is requeued on exit,
    whatever happened (and the broker returns it anyway if the connection is gone).
    """
    held: list[Delivery] = []
    try:
        while (delivery := await engine.get(queue)) is not None:
            held.append(delivery)
        yield held
    finally:
        for delivery in held:
            with contextlib.suppress(RelayError):
                await delivery.reject(requeue=True)


async def exists(engine: Engine, queue: str) -> bool:
    # ``depth`` first: on RabbitMQ a passive declare of a missing queue closes the channel it
    # runs on, and the AMQP engine's ``get`` would run it on its publishing channel.
    try:
        await engine.depth(queue)
    except ConfigurationError:
        return False
    return True


async def browse(engine: Engine, queue: str) -> list[Message]:
    """The ready messages of ``queue``, oldest first, left in place (see the module docstring)."""
    if not await exists(engine, queue):
        return []
    async with holding(engine, queue) as held:
        return [d.message for d in held]
