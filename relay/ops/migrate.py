"""``opsrelay migrate-queues``: make every queue of the layout the type ``broker.queue_type`` names.

RabbitMQ cannot change a queue's type or arguments: a queue made classic stays classic, and a
relay configured for quorum refuses to start on it (one line naming the queue and this command).
For each queue that was made otherwise, with no consumer attached (stop the relays and listeners
first): its messages move to ``<queue>.migrating`` (a queue of the new type), the old queue is
deleted once empty, the queue is made again with the new type and the messages move back; then
the whole layout is declared again, which restores the bindings. Each message is published,
confirmed, before it is acked where it was: a crash half-way loses nothing (it may copy one
message twice), and running the command again finishes the job. Events published meanwhile to a
subscription whose queue is being remade go to ``<prefix>.unrouted`` (``opsrelay unrouted replay``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from relay.contract.topology import QueueSpec, Topology
from relay.engines.amqp import AmqpEngine
from relay.engines.base import Engine
from relay.errors import ConfigurationError

__all__ = ["Migrated", "migrate"]

log = logging.getLogger("opsrelay.migrate")


@dataclass(frozen=True, slots=True)
class Migrated:
    queue: str
    messages: int


def _staging(name: str) -> str:
    return f"{name}.migrating"


async def _conflicts(engine: AmqpEngine, spec: QueueSpec) -> bool:
    """True when ``spec`` exists with other arguments (the declare is refused)."""
    try:
        await engine.declare(Topology(queues=(spec,)))
    except ConfigurationError:
        return True  # (the refusal closed the channel; the engine opens another on its next call)
    return False


async def _move(engine: Engine, source: str, target: str) -> int:
    moved = 0
    while (delivery := await engine.get(source)) is not None:
        await engine.send(target, delivery.message)  # confirmed before the original goes
        await delivery.ack()
        moved += 1
    return moved


async def _declared(engine: AmqpEngine, name: str) -> bool:
    try:
        await engine.consumers(name)
    except ConfigurationError:
        return False
    return True


async def migrate(engine: Engine, topology: Topology) -> list[Migrated]:
    """Remake each queue of ``topology`` that exists with other arguments; returns what moved."""
    if not isinstance(engine, AmqpEngine):
        return []  # the embedded queue has one kind of queue
    done: list[Migrated] = []
    for spec in topology.queues:
        # Plain: quorum queues with a single active consumer refuse basic.get, which the move back uses.
        staging = QueueSpec(_staging(spec.name))
        resumed = await _declared(engine, staging.name)
        if not await _conflicts(engine, spec) and not resumed:
            continue
        if await _declared(engine, spec.name) and (busy := await engine.consumers(spec.name)):
            raise ConfigurationError(f"queue {spec.name} has {busy} consumer(s): stop the relays and listeners "
                                     "that use it, then run migrate-queues again")
        await engine.declare(Topology(queues=(staging,)))
        moved = 0
        if await _conflicts(engine, spec):
            moved = await _move(engine, spec.name, staging.name)
            # A classic queue is deleted only if still empty (the broker checks: an event routed to it
            # meanwhile stops the delete, and a second run moves it); quorum queues cannot be asked that.
            await engine.delete_queue(spec.name, if_empty=engine.queue_type == "quorum")
            log.info("migrate: %s: %d message(s) set aside, old queue deleted", spec.name, moved)
            # RabbitMQ 3.10: a channel that delivered to the old queue keeps it in its cache by name, and
            # a publish to the queue made again under that name crashes the channel (INTERNAL_ERROR).
            await engine.close()
            await engine.connect()
        await engine.declare(Topology(queues=(spec,)))
        back = await _move(engine, staging.name, spec.name)
        if await engine.depth(staging.name) == 0:  # nothing else publishes to it
            await engine.delete_queue(staging.name, if_empty=engine.queue_type != "quorum")
        log.info("migrate: %s is now %s; %d message(s) in it", spec.name, engine.queue_type, back)
        done.append(Migrated(spec.name, back))
    await engine.declare(topology)  # the bindings of remade queues
    return done
