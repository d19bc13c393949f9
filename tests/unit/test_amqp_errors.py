"""The one place aio-pika's errors become ours: a connection closed under us is the broker gone, a bug is a bug."""

from __future__ import annotations

import pytest

from relay.contract.topology import QueueSpec
from relay.engines.amqp import _translated, queue_arguments
from relay.errors import BrokerUnavailable


@pytest.mark.parametrize("text", ['<Connection: "amqp://guest:******@127.0.0.1:5681/" at 0x7f> closed',
                                  "Connection was not opened"])
def test_a_connection_closed_under_us_is_broker_unavailable(text: str) -> None:
    with pytest.raises(BrokerUnavailable, match="unavailable"), _translated("publish", "amqp://u:secret@h/"):
        raise RuntimeError(text)


def test_any_other_runtime_error_is_not_hidden() -> None:
    with pytest.raises(RuntimeError, match="a bug"), _translated("publish", "amqp://h/"):
        raise RuntimeError("a bug of ours")


def test_quorum_arguments() -> None:
    work = queue_arguments(QueueSpec("p.outbound", poison_to="p.dead"), "quorum", 20)
    assert work == {"x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "p.dead",
                    "x-delivery-limit": 20, "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    retry = queue_arguments(QueueSpec("p.retry.30000ms", ttl_ms=30000, dead_letter_to="p.outbound"), "quorum", 20)
    assert retry["x-dead-letter-routing-key"] == "p.outbound" and retry["x-delivery-limit"] == 2**31 - 1
    assert queue_arguments(QueueSpec("p.outbound", poison_to="p.dead"), "classic", 20) == {}


def _access_refused(text: str) -> BaseException:
    import aiormq.exceptions

    return aiormq.exceptions.ChannelAccessRefused(text)


def test_a_refused_permission_is_one_line_naming_the_permission_the_operation_needs() -> None:
    from relay.engines.amqp import BIND, CONFIGURE, WRITE
    from relay.errors import PermissionRefused

    text = "ACCESS_REFUSED - access to exchange 'p.events' in vhost '/' refused for user 'web1'"
    for needs, word in ((WRITE, "write"), (CONFIGURE, "configure"), (BIND, "read")):
        with pytest.raises(PermissionRefused) as refused, _translated("publish to p.events", "amqp://web1:pw@h/",
                                                                      needs):
            raise _access_refused(text)
        line = str(refused.value)
        assert line.startswith(f"publish to p.events: user 'web1' has no {word} permission on exchange 'p.events' in "
                               "vhost '/'") and "\n" not in line and "pw" not in line


def test_an_access_refused_that_is_not_a_permission_stays_broker_unavailable() -> None:
    text = "ACCESS_REFUSED - queue 'p.silences.lock' in vhost '/' in exclusive use"
    with pytest.raises(BrokerUnavailable, match="exclusive use"), _translated("read p.silences", "amqp://h/"):
        raise _access_refused(text)
