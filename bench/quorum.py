"""Classic against quorum queues on the three-node test cluster: what ``broker.queue_type = "quorum"`` costs.

Both parts run in one run on one cluster (tests/cluster.py: c1, c2, c3 on 127.0.0.1:5681-5683), with all
three nodes in ``broker.urls`` and ``shuffle_urls = false``: every connection goes to c1, and RabbitMQ puts
a classic queue, and a quorum queue's leader, on the node of the client that declared it (its default
leader locator, client-local), so both types live on c1 and the difference measured is the replication
(a quorum queue confirms a message once a majority of its three members wrote it), not a hop between nodes.
Each queue type gets a fresh ``broker.prefix``, so every queue is declared new with that type.

1. Listener ack latency: the listener's own publisher (``listeners.factory.make_publisher(config)``, a
   ``SpoolingPublisher`` over the broker) in this process; ``publish(event)`` returns once RabbitMQ
   confirmed the event persistent. One publisher per queue type, taking turns event by event, so load
   from elsewhere on the machine falls on both alike. Each one's first event (connect, declare) is shown
   apart; the percentiles are over the events after it.
2. Relay throughput: ``relay_throughput.full_relay`` (``opsrelay serve`` draining a pre-filled
   ``<prefix>.outbound`` into the STARTTLS + AUTH smarthost process), classic and quorum alternating which
   goes first, median over the rounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import delete_broker_objects, percentile, print_table, queue_depths, unique_prefix, wait_for_broker
from bench.relay_throughput import RelayRun, SmtpChild, crash_mails, full_relay
from relay.contract.event import Event
from relay.contract.names import unrouted_queue
from relay.contract.topology import event_topology
from tests.cluster import NODES, Cluster

if TYPE_CHECKING:
    from listeners.publish import ListenerPublisher

__all__ = ["run"]

QUEUE_TYPES = ("classic", "quorum")
POOL_SIZE = 2  # smtp.pool_size's default


def _broker_keys(queue_type: str, urls: Sequence[str]) -> dict[str, object]:
    """``[broker]`` of both parts, besides prefix (and the listener's spool)."""
    return {"urls": list(urls), "shuffle_urls": False, "queue_type": queue_type}


class _SpoolWatch(logging.Handler):
    """Counts the listener publisher's "broker unavailable ... spooling events in PATH" lines per spool file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "broker unavailable" in (message := record.getMessage()):
            self.lines.append(message)


@dataclass
class Side:
    """One queue type of part 1: its publisher and what was measured of it."""

    queue_type: str
    prefix: str
    spool: Path
    latencies_ns: list[int] = field(default_factory=list)
    publisher: ListenerPublisher | None = None
    stored: int = 0  # in <prefix>.unrouted afterwards
    left: int = 0  # still in the spool at close

    def open(self, urls: Sequence[str]) -> None:
        from listeners.factory import make_publisher
        from relay.config.models import Config

        broker = {**_broker_keys(self.queue_type, urls), "prefix": self.prefix, "spool": f"sqlite:///{self.spool}"}
        self.publisher = make_publisher(Config.model_validate({"host": "bench", "broker": broker}))

    def publish(self, event: Event) -> None:
        assert self.publisher is not None
        t0 = time.perf_counter_ns()
        self.publisher.publish(event)
        self.latencies_ns.append(time.perf_counter_ns() - t0)

    def close(self) -> None:
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            publisher.close()
            self.left = getattr(publisher, "pending", 0)  # a SpoolingPublisher's: events it could not forward

    def cells(self) -> list[str]:
        first, ordered = self.latencies_ns[0], sorted(self.latencies_ns[1:])
        return [self.queue_type, f"{len(ordered):,}", _ms(first),
                *(_ms(percentile(ordered, p)) for p in (50, 95)), _ms(ordered[-1]),
                f"{len(ordered) / (sum(ordered) / 1e9):,.0f}"]


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def _ratio_row(classic: list[str], quorum: list[str], numeric: range) -> list[str]:
    """quorum / classic of the columns in ``numeric`` (their cells parsed back: what was printed is compared)."""
    def value(cell: str) -> float:
        return float(cell.replace(",", ""))

    return ["quorum / classic", *("" if i not in numeric else f"{value(quorum[i]) / value(classic[i]):.2f}x"
                                  for i in range(1, len(classic)))]


def _placement(cluster: Cluster, queues: Sequence[str]) -> str:
    """Where ``queues`` live: a quorum queue's leader and members as RabbitMQ lists them; a classic queue's
    node is the one whose ``list_queues --local`` has it (RabbitMQ 3.10 lists no leader for classic queues)."""
    def listing(*args: str, node: str | None = None) -> dict[str, dict[str, object]]:
        rows = json.loads(cluster.ctl("list_queues", *args, "--formatter", "json", node=node))
        return {str(r["name"]): r for r in rows if r["name"] in queues}

    def short(value: object) -> str:
        return str(value).split("@")[0]

    found = listing("name", "type", "leader", "members")
    local = {name: n for n in NODES for name in listing("--local", "name", node=n)}
    out = []
    for name in queues:
        row = found.get(name, {})
        members = row.get("members")
        if row.get("type") == "quorum" and isinstance(members, list):
            out.append(f"{name}: quorum, leader {short(row.get('leader'))}, members "
                       f"{', '.join(sorted(short(m) for m in members))}")
        else:
            out.append(f"{name}: {row.get('type', 'not listed')} on {local.get(name, '?')}")
    return "; ".join(out)


def _events(count: int) -> list[Event]:
    return [Event(host="web1", group="workers", process="worker_03", event="PROCESS_STATE_EXITED", state="EXITED",
                  from_state="RUNNING", expected=False, pid=20000 + i) for i in range(count)]


def ack_latency(count: int, urls: Sequence[str], cluster: Cluster, work: Path) -> None:
    sides = [Side(t, unique_prefix(f"quorum-{t}"), work / f"spool-{t}.db") for t in QUEUE_TYPES]
    watch = _SpoolWatch()
    listener_log = logging.getLogger("opsrelay.listener")
    listener_log.addHandler(watch)
    load_before = os.getloadavg()[0]
    try:
        try:
            for side in sides:
                side.open(urls)
            for i, event in enumerate(_events(count + 1)):
                for side in sides if i % 2 == 0 else sides[::-1]:  # each goes first every other event
                    side.publish(event)
        finally:
            for side in sides:
                side.close()
        for side in sides:
            queue = unrouted_queue(side.prefix)
            side.stored = asyncio.run(queue_depths(urls[0], [queue]))[queue]
        placement = _placement(cluster, [unrouted_queue(s.prefix) for s in sides])
    finally:
        listener_log.removeHandler(watch)
        for side in sides:
            topology = event_topology(side.prefix)
            asyncio.run(delete_broker_objects(urls[0], [q.name for q in topology.queues],
                                              [e.name for e in reversed(topology.exchanges)]))
    load_after = os.getloadavg()[0]
    for side in sides:
        if side.stored + side.left != count + 1:
            raise RuntimeError(f"{side.queue_type}: {count + 1} events answered, but RabbitMQ held {side.stored} "
                               f"and the spool {side.left}")
    spooled = {s.queue_type: sum(s.spool.name in line for line in watch.lines) for s in sides}
    classic, quorum = (s.cells() for s in sides)
    print_table(
        f"Quorum: listener publish -> broker confirm, in ms ({count:,} events per queue type, 3-node cluster)",
        ["queue_type", "events", "first", "p50", "p95", "max", "events/s"],
        [classic, quorum, _ratio_row(classic, quorum, range(2, 7))],
        notes=[
            "listeners.factory.make_publisher(config).publish(event), timed in this process: it returns once "
            "RabbitMQ confirmed the event persistent (publisher confirms, persistent message, durable queue); no "
            "subscription is bound, so each event lands in <prefix>.unrouted.",
            "broker.urls = the three nodes, shuffle_urls = false: both publishers connect to c1. Where the queues "
            f"were: {placement}.",
            "first: the first event, with the connection and the declaration of the exchanges and the unrouted "
            "queue; p50/p95/max (nearest-rank) and events/s (events / their summed latency) are over the events "
            "after it. The two publishers took turns event by event, each first every other event.",
            f"checked afterwards: RabbitMQ held {', '.join(f'{s.stored:,} ({s.queue_type})' for s in sides)} of "
            f"{count + 1:,} each; 'broker unavailable' (spooling) lines: "
            f"{', '.join(f'{n} ({t})' for t, n in spooled.items())}.",
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs.",
        ],
    )


async def _throughput(mails_n: int, rounds: int, urls: Sequence[str], work: Path) -> dict[str, list[RelayRun]]:
    mails = crash_mails(mails_n)
    runs: dict[str, list[RelayRun]] = {t: [] for t in QUEUE_TYPES}
    server = await SmtpChild.start(work / "smtp")
    try:
        # Warm-up: page cache, the server's first handshake; not measured.
        await full_relay(server, mails[:20], POOL_SIZE, work, broker=_broker_keys("classic", urls))
        for turn in range(rounds):
            for queue_type in QUEUE_TYPES if turn % 2 == 0 else QUEUE_TYPES[::-1]:
                runs[queue_type].append(await full_relay(server, mails, POOL_SIZE, work,
                                                         broker=_broker_keys(queue_type, urls)))
    finally:
        await server.stop()
    return runs


def relay_throughput(mails_n: int, rounds: int, urls: Sequence[str], work: Path) -> None:
    load_before = os.getloadavg()[0]
    runs = asyncio.run(_throughput(mails_n, rounds, urls, work))
    load_after = os.getloadavg()[0]

    def cells(queue_type: str) -> list[str]:
        rows = [r.row for r in runs[queue_type]]
        rates = [r.rate for r in rows]
        return [queue_type, f"{rounds}x{mails_n:,}", f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}",
                f"{max(rates):,.0f}", f"{statistics.median(r.rate_from_start for r in rows):,.0f}",
                f"{statistics.median(r.window.first - r.started for r in rows):.2f}",
                f"{statistics.median(r.client_cpu for r in rows) * 1e3:.2f}"]

    classic, quorum = cells("classic"), cells("quorum")
    every = [r for group in runs.values() for r in group]
    print_table(
        f"Quorum: opsrelay serve mails/s into a STARTTLS + AUTH smarthost (pool_size={POOL_SIZE}, 3-node cluster)",
        ["queue_type", "mails", "median mails/s", "min", "max", "incl. start", "start->1st s", "relay CPU ms/mail"],
        [classic, quorum, _ratio_row(classic, quorum, range(2, 8))],
        notes=[
            "each turn is bench/relay_throughput.py's (d) row: opsrelay serve (a fresh prefix, its queues declared "
            "with that queue_type) draining a pre-filled <prefix>.outbound; mails/s is (N-1) / (last - first mail "
            "at the server), incl. start N / (last mail - spawn).",
            f"rounds: {rounds}, classic and quorum alternating which goes first; median, min and max over the "
            "rounds (incl. start, start->1st and CPU: medians). The warm-up turn (20 mails, classic) is not shown.",
            "broker.urls = the three nodes, shuffle_urls = false: the relay, its pre-fill and its queues are on c1.",
            "relay CPU ms/mail: opsrelay serve's between its first and last mail (the cluster's own CPU is not "
            "counted).",
            f"over all turns: {sum(r.row.window.duplicates for r in every)} mails delivered twice (counted once), "
            f"{sum(r.outbound_left for r in every)} messages left on outbound at stop, "
            f"{sum(r.dead for r in every)} dead letters.",
            f"1-minute load average {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs.",
        ],
    )


def run(events: int = 2000, mails: int = 1000, rounds: int = 5) -> None:
    cluster = Cluster()
    down = [n for n in NODES if n not in cluster.running()]
    if down:
        raise RuntimeError(f"the RabbitMQ test cluster is not running (nodes {down} down; "
                           "scripts/ensure-rabbitmq-cluster.sh starts it)")
    urls = cluster.urls()
    for url in urls:
        asyncio.run(wait_for_broker(url))
    with tempfile.TemporaryDirectory(prefix="opsrelay-bench-") as tmp:
        work = Path(tmp)
        ack_latency(events, urls, cluster, work)
        relay_throughput(mails, rounds, urls, work)
