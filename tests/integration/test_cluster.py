"""A fleet on a real three-node RabbitMQ cluster (quorum queues) that loses a node to SIGKILL mid-burst.

Two ``opsrelay serve`` processes, each preferring another node (``shuffle_urls = false``), and the
listener's real publisher (spool included) send 500 crash events through a real SMTP server. One run
kills the node that leads the outbound queue, the other the node the listener publishes to. Every
event must be mailed, nothing may end in dead, and duplicates stay within what was in flight on the
dead node: each relay's unacked deliveries (outbound pool + prefetch, subscription prefetch) and the
one event the listener had not had confirmed.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from listeners.factory import make_publisher
from relay.config.models import Config
from relay.contract.event import Event
from relay.contract.names import dead_queue, outbound_queue
from relay.daemon.relay import relay_topology
from relay.engines import open_engine
from tests.brokers import delete_topology
from tests.cluster import Cluster, require_cluster
from tests.integration.faults import write_toml
from tests.processes import RelayProcess
from tests.smtp_server import SmtpServer
from tests.waiting import wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.cluster, pytest.mark.timeout(240)]

EVENTS = 500
POOL_SIZE = 2
# Per relay on the dead node: outbound deliveries in flight (pool) and prefetched (2 x pool), and the
# subscription consumer's prefetch (8); plus the listener's one unconfirmed publish.
BOUND = 2 * (POOL_SIZE + 2 * POOL_SIZE + 8) + 1


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    made = require_cluster()
    yield made
    made.restore()


def settings(prefix: str, urls: list[str], server: SmtpServer, tmp_path: Path, name: str) -> dict[str, Any]:
    return {
        "host": "fleet1",
        "broker": {"urls": urls, "shuffle_urls": False, "prefix": prefix, "queue_type": "quorum",
                   "confirm_timeout": 2.0, "spool": f"sqlite:///{tmp_path / f'spool-{name}.db'}"},
        "smtp": {k: (str(v) if isinstance(v, Path) else v) for k, v in server.client_settings().items()
                 if v is not None} | {"pool_size": POOL_SIZE},
        "retry": {"backoff": ["200ms"]},
        "subscriptions": [{"name": "ops", "to": ["oncall@example.test"]}],
    }


def crash(n: int) -> Event:
    return Event(host="fleet1", group="web", process=f"web_{n % 7}", event="PROCESS_STATE_EXITED", state="EXITED",
                 from_state="RUNNING", expected=False, pid=10_000 + n, id=str(uuid.uuid4()))


def mailed(server: SmtpServer) -> Counter[str]:
    ids: Counter[str] = Counter()
    for mail in server.received:
        message = email.message_from_bytes(mail.content, policy=email.policy.default)
        ids[str(message["X-Opsrelay-Event"])] += 1
    return ids


@pytest.mark.parametrize("victim", ["outbound-leader", "listener-node"])
async def test_losing_a_node_mid_burst_loses_no_event(
        victim: str, cluster: Cluster, prefix: str, smtp_server: SmtpServer, tmp_path: Path) -> None:
    first, second = (write_toml(settings(prefix, cluster.urls(*order), smtp_server, tmp_path, name),
                                tmp_path / f"{name}.toml")
                     for name, order in (("a", ("c1", "c2", "c3")), ("b", ("c2", "c3", "c1"))))
    listener_config = Config.model_validate(settings(prefix, cluster.urls("c3", "c1", "c2"), smtp_server,
                                                     tmp_path, "listener"))
    try:
        with RelayProcess(first, tmp_path / "a.log") as a, RelayProcess(second, tmp_path / "b.log") as b:
            for relay in (a, b):
                await wait_until(lambda r=relay: (r.alive(), "relay: consuming" in r.text())[1], 30,
                                 what="the relay to consume", diagnostics=relay.log)
            publisher = make_publisher(listener_config)
            events = [crash(n) for n in range(EVENTS)]
            killed: list[str] = []

            def burst() -> None:
                for n, event in enumerate(events):
                    if n == EVENTS // 3:
                        node = cluster.leader(outbound_queue(prefix)) if victim == "outbound-leader" else "c3"
                        cluster.kill(node)
                        killed.append(node)
                    publisher.publish(event)

            began = time.monotonic()
            worker = threading.Thread(target=burst)
            worker.start()
            await asyncio.to_thread(worker.join, 180)
            assert not worker.is_alive(), "the listener's publishes did not return"

            def all_mailed() -> bool:
                a.alive()
                b.alive()
                return set(mailed(smtp_server)) >= {e.id for e in events}

            await wait_until(all_mailed, 120, what=f"all {EVENTS} events mailed",
                             diagnostics=lambda: f"{len(set(mailed(smtp_server)))} mailed\n{a.log()}\n{b.log()}",
                             interval=0.2)
            took = time.monotonic() - began
            # The relay whose node died connected to another one and consumed again. (The other may
            # have too: a quorum queue whose leader is electing can close a connection on another node.)
            for relay, preferred in ((a, "c1"), (b, "c2")):
                if preferred == killed[0]:
                    assert relay.text().count("relay: consuming") >= 2, relay.log()
            publisher.close()
            for relay in (a, b):
                code, _ = await relay.terminate(20)
                assert code == 0, relay.log()
        counts = mailed(smtp_server)
        duplicates = sum(counts.values()) - len(counts)
        assert set(counts) == {e.id for e in events}
        engine = open_engine(listener_config.broker.url, **listener_config.broker.engine_options)
        async with engine:
            assert await engine.depth(dead_queue(prefix)) == 0
            assert await engine.depth(outbound_queue(prefix)) == 0
        print(f"\n{victim}: killed {killed[0]} after {EVENTS // 3} events; {EVENTS} mailed in {took:.1f}s, "
              f"{duplicates} duplicate(s) (bound {BOUND})")
        assert duplicates <= BOUND
    finally:
        cluster.restore()
        config = Config.model_validate(settings(prefix, cluster.urls(), smtp_server, tmp_path, "cleanup"))
        await delete_topology(cluster.url("c1"), relay_topology(config))
