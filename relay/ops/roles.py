"""Least privilege on RabbitMQ: the permissions each role's login needs, and a check that it has them.

RabbitMQ grants a login three regular expressions per vhost, matched against exchange and queue
names: configure (declare, delete), write (publish to an exchange, bind a queue) and read (consume,
get, bind from an exchange). A listener host publishes events, a sendmail host publishes mail for
outbound: neither configures nor reads anything; what they publish to was declared by a relay. A relay
(and the operator commands: status, silence, dlq, queue, migrate-queues) owns the prefix's objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.contract.names import events_exchange, outbound_queue, silences_queue, submit_exchange
from relay.contract.topology import event_topology, outbound_topology

if TYPE_CHECKING:
    from relay.config.models import Config
    from relay.engines.base import Engine

__all__ = ["ROLES", "Permissions", "check_role", "permissions"]

ROLES = ("listener", "relay", "sendmail")
_NOTHING = "^$"


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str

    def rabbitmqctl(self, user: str, vhost: str = "/") -> str:
        """The command that grants them (single quotes: the patterns hold $ and \\)."""
        return f"rabbitmqctl set_permissions -p {vhost} {user} '{self.configure}' '{self.write}' '{self.read}'"


def permissions(role: str, prefix: str) -> Permissions:
    """The least a login of ``role`` needs under ``broker.prefix``."""
    p = re.escape(prefix)
    if role == "listener":
        return Permissions(_NOTHING, f"^{p}\\.events$", _NOTHING)
    if role == "sendmail":
        return Permissions(_NOTHING, f"^{p}\\.submit$", _NOTHING)
    if role == "relay":
        # amq.default: the relay moves mail between its own queues (retry steps, outbound, dead) by name.
        return Permissions(f"^{p}\\..*", f"^({p}\\..*|amq\\.default)$", f"^{p}\\..*")
    raise ValueError(f"no such role: {role!r} (one of {', '.join(ROLES)})")


async def check_role(engine: Engine, role: str, config: Config) -> str:
    """Do what ``role`` does at its start, without delivering anything; PermissionRefused names what is missing.

    A listener or sendmail login: the objects it publishes to exist (a relay declared them) and a publish
    to them is allowed (inside a transaction, rolled back). A relay login: it declares the whole layout
    (configure, bind), may publish to its queues by name, and may read (a silences read, as every relay
    does). What a login may do beyond its role is not checked.
    """
    prefix = config.broker.prefix
    if role == "listener":
        await engine.declare(event_topology(prefix), use_existing=True)
        await engine.check_publish(events_exchange(prefix), "opsrelay.check")
        return f"may publish to {events_exchange(prefix)}"
    if role == "sendmail":
        await engine.declare(outbound_topology(prefix), use_existing=True)
        await engine.check_publish(submit_exchange(prefix), outbound_queue(prefix))
        return f"may publish to {submit_exchange(prefix)}"
    if role == "relay":
        from relay.daemon.relay import relay_topology

        await engine.declare(relay_topology(config))
        await engine.check_publish("", outbound_queue(prefix))
        await engine.read_all(silences_queue(prefix))
        return f"may configure, write and read the {prefix}.* objects"
    raise ValueError(f"no such role: {role!r} (one of {', '.join(ROLES)})")
