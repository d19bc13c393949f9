"""The permissions of each role (relay.ops.roles) against the names each role's code touches (relay.contract)."""

from __future__ import annotations

import re

import pytest

from relay.contract.names import budget_queue, events_exchange, outbound_queue, submit_exchange
from relay.contract.topology import event_topology, full_topology, outbound_topology
from relay.contract.urls import url_user
from relay.ops.roles import ROLES, permissions

PREFIXES = ["opsrelay", "t0a1b2c3d4", "ops.relay+x"]  # a dot and a plus must not widen a pattern


def names(topology_prefix: str) -> list[str]:
    budget = budget_queue(topology_prefix, "smtp.example:587", "minute")
    top = full_topology(topology_prefix, [("ops", ["proc.#"])], [30000], ["ops"], [(budget, 60000)])
    return [e.name for e in top.exchanges] + [q.name for q in top.queues]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_publishers_may_write_one_exchange_and_nothing_else(prefix: str) -> None:
    for role, target in (("listener", events_exchange(prefix)), ("sendmail", submit_exchange(prefix))):
        granted = permissions(role, prefix)
        assert granted.configure == granted.read == "^$"
        write = re.compile(granted.write)
        assert [n for n in [*names(prefix), "amq.default", f"{prefix}x.events"] if write.fullmatch(n)] == [target]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_relay_owns_its_prefix_and_no_other(prefix: str) -> None:
    granted = permissions("relay", prefix)
    for pattern in (granted.configure, granted.read, granted.write):
        assert all(re.match(pattern, n) for n in names(prefix)), pattern
        assert not re.match(pattern, f"{prefix}x.outbound") and not re.match(pattern, "other.outbound")
    assert re.match(granted.write, "amq.default") and not re.match(granted.configure, "amq.default")


def test_publisher_topologies_hold_what_they_publish_to() -> None:
    assert events_exchange("p") in [e.name for e in event_topology("p").exchanges]
    outbound = outbound_topology("p")
    assert [e.name for e in outbound.exchanges] == [submit_exchange("p")]
    assert [(b.queue, b.exchange) for b in outbound.bindings] == [(outbound_queue("p"), submit_exchange("p"))]
    assert set(outbound.queues) <= set(full_topology("p", [], []).queues)


def test_the_grant_line_quotes_its_patterns() -> None:
    line = permissions("listener", "opsrelay").rabbitmqctl("web1")
    assert line == "rabbitmqctl set_permissions -p / web1 '^$' '^opsrelay\\.events$' '^$'"
    assert ROLES == ("listener", "relay", "sendmail")


@pytest.mark.parametrize(("url", "user"), [("amqps://web1:s3cret@n1.example/", "web1"), ("amqp://n1/", ""),
                                           ("amqps://x509@n1:5671/", "x509"), ("sqlite:////q.db", "")])
def test_url_user(url: str, user: str) -> None:
    assert url_user(url) == user
