"""Issue 13: ``/metrics`` scrape latency with 10,000 mails waiting, and the relay's throughput with metrics on/off.

1. Scrape latency. ``serve_forever`` runs in this process with a ``PromObserver`` and a ``MetricsServer``
   on a free loopback port, on the embedded engine (``sqlite:///``) and on RabbitMQ. Its outbound queue
   was pre-filled with ``--scrape-waiting`` rendered crash mails (and a tenth as many dead letters), and
   its mailer takes the first mail and never answers: the outbound consumer stalls with its prefetch
   in hand, so the rest wait in outbound, nothing is sent, and nothing moves to retry or dead while the
   scrapes run. Each GET is made from a thread (the relay's loop keeps running), one after the other;
   a scrape's time includes the queue collector's round trip to the relay's loop and the engine.
   Beside them, in the same run: ``generate_latest`` of a fresh ``PromObserver`` registry with no
   sampler (the exposition alone) and a GET from a ``MetricsServer`` with no relay behind it (+ HTTP).
2. Throughput, metrics off against on: ``relay_throughput.full_relay`` (``opsrelay serve`` draining a
   pre-filled ``<prefix>.outbound`` on RabbitMQ into the STARTTLS + AUTH smarthost process), alternately
   without ``[metrics]`` and with ``[metrics] listen`` and a thread here scraping it every 0.5 s.
   Target: on within 5% of off (medians over the rounds).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import (
    AMQP_URL,
    delete_broker_objects,
    percentile,
    print_table,
    unique_prefix,
    wait_for_broker,
)
from bench.relay_throughput import RECIPIENT, SENDER, SmtpChild, crash_mails, full_relay
from relay.contract.mail import OutboundMail
from relay.delivery.outcome import Budget, SendResult, ServerInfo

if TYPE_CHECKING:
    from relay.observe.prom import PromObserver

__all__ = ["run"]

TARGET = 0.95  # metrics on keeps at least 95% of the throughput with them off
SCRAPE_EVERY = 0.5
_GAUGE = re.compile(r'^opsrelay_queue_messages\{queue="([^"]+)"\} (\S+)$', re.MULTILINE)
_AGE = re.compile(r"^opsrelay_queue_sample_age_seconds (\S+)$", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Scrape:
    seconds: float
    size: int
    queues: dict[str, float]  # opsrelay_queue_messages by queue label
    fresh: bool  # the queue gauges were read during this scrape (their age is below its time)


def scrape(url: str) -> Scrape:
    """One GET, timed from before the connect to the last byte read."""
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (our own loopback URL)
        body = response.read()
    seconds = time.perf_counter() - began
    text = body.decode("utf-8")
    age = _AGE.search(text)
    return Scrape(seconds, len(body), {q: float(v) for q, v in _GAUGE.findall(text)},
                  age is not None and float(age.group(1)) <= seconds)


# -- 1. scrape latency ------------------------------------------------------------------------------

class StalledMailer:
    """Takes a mail and never answers: the outbound consumer stops with its prefetch in hand.

    Cancelled on stop (serve_forever's grace), so those mails go back to outbound unacked.
    """

    def __init__(self) -> None:
        self.taken = 0
        self.stalled = asyncio.Event()

    async def send(self, sender: str, recipients: Sequence[str], raw: bytes, *,
                   budget: Budget | None = None) -> SendResult:
        self.taken += 1
        self.stalled.set()
        await asyncio.get_running_loop().create_future()  # never set
        raise AssertionError("unreachable")

    async def check(self) -> ServerInfo:
        raise NotImplementedError("the stalled mailer has no server")

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class LatencyRow:
    name: str
    scrapes: list[Scrape]
    note: str = ""

    def cells(self) -> list[str]:
        times = sorted(s.seconds for s in self.scrapes)
        queues = self.scrapes[-1].queues
        return [self.name, str(len(times)), f"{self.scrapes[0].seconds * 1e3:.1f}",
                f"{percentile(times, 50) * 1e3:.1f}", f"{percentile(times, 95) * 1e3:.1f}", f"{times[-1] * 1e3:.1f}",
                f"{self.scrapes[-1].size:,}",
                _count(queues.get("outbound")), _count(queues.get("dead")),
                "" if not queues else f"{sum(s.fresh for s in self.scrapes)}/{len(self.scrapes)}"]


def _count(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def _subscriptions() -> list[dict[str, object]]:
    return [{"name": "oncall", "to": [RECIPIENT]}]


def bare_exposition(count: int) -> LatencyRow:
    """``generate_latest`` of the same kind of registry, no sampler: what prometheus_client costs alone."""
    from prometheus_client import generate_latest

    from relay.observe.prom import PromObserver

    observer = PromObserver(["oncall"])
    scrapes = []
    for _ in range(count):
        began = time.perf_counter()
        body = generate_latest(observer.registry)
        scrapes.append(Scrape(time.perf_counter() - began, len(body), {}, False))
    return LatencyRow("generate_latest(registry), no sampler", scrapes)


async def http_only(count: int) -> LatencyRow:
    """A GET of /metrics from a MetricsServer whose observer has no relay behind it (no queue collector read)."""
    from relay.observe.prom import PromObserver
    from relay.observe.server import MetricsServer

    server = MetricsServer(PromObserver(["oncall"]), "127.0.0.1", 0)
    server.start()
    try:
        url = "http://{}:{}/metrics".format(*server.address)
        return LatencyRow("GET /metrics, no relay (no sampler)", [await asyncio.to_thread(scrape, url)
                                                               for _ in range(count)])
    finally:
        server.close()


async def _fill(url: str, prefix: str, mails: Sequence[OutboundMail], dead: int) -> tuple[list[str], list[str]]:
    """Declare the relay's topology, put ``mails`` on outbound and ``dead`` of them on dead.

    Returns the queues and exchanges declared, to delete afterwards.
    """
    from relay.config.models import Config
    from relay.contract.mail import dead_letter, to_message
    from relay.contract.names import dead_queue, outbound_queue
    from relay.daemon.relay import relay_topology
    from relay.engines import open_engine

    config = Config.model_validate({"host": "bench", "broker": {"url": url, "prefix": prefix},
                                    "smtp": {"from": SENDER}, "subscriptions": _subscriptions()})
    topology = relay_topology(config)
    engine = open_engine(url)
    await engine.connect()
    try:
        await engine.declare(topology)
        outbound = outbound_queue(prefix)
        for start in range(0, len(mails), 200):  # confirms awaited in batches, not one by one
            await asyncio.gather(*(engine.send(outbound, to_message(m)) for m in mails[start:start + 200]))
        for start in range(0, dead, 200):
            await asyncio.gather(*(engine.send(dead_queue(prefix), dead_letter(
                to_message(m), reason="550 5.1.1 mailbox unavailable", source=outbound, kind="mail"))
                for m in mails[start:min(start + 200, dead)]))
    finally:
        await engine.close()
    return [q.name for q in topology.queues], [e.name for e in reversed(topology.exchanges)]


async def relay_scrapes(engine_name: str, url: str, prefix: str, mails: Sequence[OutboundMail], dead: int,
                        count: int) -> LatencyRow:
    """``serve_forever`` with metrics, its outbound consumer stalled; ``count`` GETs of /metrics."""
    from relay.config.models import Config
    from relay.daemon.serve import serve_forever
    from relay.observe.prom import PromObserver
    from relay.observe.server import MetricsServer

    queues, exchanges = await _fill(url, prefix, mails, dead)
    config = Config.model_validate({"host": "bench", "broker": {"url": url, "prefix": prefix},
                                    "smtp": {"from": SENDER}, "subscriptions": _subscriptions()})
    observer = PromObserver(["oncall"])
    server = MetricsServer(observer, "127.0.0.1", 0)
    server.start()
    mailer, stop = StalledMailer(), asyncio.Event()
    task = asyncio.create_task(serve_forever(config, mailer, stop, observer=observer, grace=0.5))
    try:
        metrics = "http://{}:{}/metrics".format(*server.address)
        await _consuming(observer, mailer, task)
        scrapes = [await asyncio.to_thread(scrape, metrics) for _ in range(count)]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        server.close()
        if url.startswith("amqp"):  # the sqlite file goes with the run's temporary directory
            await delete_broker_objects(url, queues, exchanges)
    last = scrapes[-1].queues
    # The outbound consumer's prefetch (2 x pool_size) is in the relay's hands: unacked, not ready.
    if last.get("dead") != dead or not len(mails) - 2 * config.smtp.pool_size <= last.get("outbound", -1) \
            <= len(mails):
        raise RuntimeError(f"{engine_name}: the scrape shows {last}, not {len(mails):,} on outbound and {dead:,} "
                           "on dead: the work measured is not the work meant")
    return LatencyRow(f"GET /metrics, relay on {engine_name}", scrapes,
                      f"{engine_name}: {len(mails):,} on outbound, {len(mails) - int(last['outbound']):,} of them "
                      f"in the stalled consumer's prefetch (mailer called {mailer.taken}x, never answered); "
                      f"{dead:,} on dead")


async def _consuming(observer: PromObserver, mailer: StalledMailer, task: asyncio.Task[None],
                     within: float = 60.0) -> None:
    """Until the relay is ready and its outbound consumer holds a mail (so the queue stands still)."""
    deadline = time.monotonic() + within
    while observer.not_ready is not None or not mailer.stalled.is_set():
        if task.done():
            task.result()
            raise RuntimeError("the relay stopped before it was consuming")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the relay was not consuming within {within:g}s: {observer.not_ready}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the rest of the prefetch arrives


# -- 2. throughput, metrics off and on ------------------------------------------------------------

class Scraper(threading.Thread):
    """GET /metrics every SCRAPE_EVERY seconds, as Prometheus would (more often); refused until the relay is up."""

    def __init__(self, url: str) -> None:
        super().__init__(name="bench-scraper", daemon=True)
        self.url = url
        self.done = threading.Event()
        self.taken: list[tuple[float, Scrape]] = []  # (monotonic at the end, the scrape)
        self.failed: list[float] = []  # monotonic when a GET failed (refused before the relay is up, after it stops)

    def run(self) -> None:
        while not self.done.wait(SCRAPE_EVERY):
            try:
                taken = scrape(self.url)
            except OSError:
                self.failed.append(time.monotonic())
                continue
            self.taken.append((time.monotonic(), taken))

    def stop(self) -> None:
        self.done.set()
        self.join(15)


@dataclass(frozen=True)
class Turn:
    metrics: bool
    rate: float
    cpu_ms: float  # opsrelay serve's CPU per mail between its first and last mail
    scrapes: list[Scrape]  # those that ended inside the measured window
    failed: int  # GETs that failed inside the measured window


async def turn(server: SmtpChild, mails: Sequence[OutboundMail], work: Path, metrics: bool) -> Turn:
    if not metrics:
        run = await full_relay(server, mails, 1, work)
        return Turn(False, run.row.rate, run.row.client_cpu * 1e3, [], 0)
    port = _free_port()
    scraper = Scraper(f"http://127.0.0.1:{port}/metrics")
    scraper.start()
    try:
        run = await full_relay(server, mails, 1, work, metrics_listen=f"127.0.0.1:{port}")
    finally:
        await asyncio.to_thread(scraper.stop)
    window = run.row.window
    inside = [s for at, s in scraper.taken if window.first <= at <= window.last]
    if not inside:
        raise RuntimeError(f"metrics on: no scrape during the {window.last - window.first:.2f}s of delivery "
                           f"(one every {SCRAPE_EVERY:g}s): more --metrics-mails")
    failed = sum(window.first <= at <= window.last for at in scraper.failed)
    return Turn(True, run.row.rate, run.row.client_cpu * 1e3, inside, failed)


# -- the run ---------------------------------------------------------------------------------------

async def _broker_here() -> str | None:
    try:
        await wait_for_broker(AMQP_URL, patience=10)
    except Exception as exc:
        return f"RabbitMQ at {AMQP_URL} unreachable ({exc!r}): its rows are skipped"
    return None


async def _run(waiting: int, scrapes: int, mails_n: int, rounds: int) -> None:
    mails = crash_mails(max(waiting, mails_n))
    dead = waiting // 10
    absent = await _broker_here()
    with tempfile.TemporaryDirectory(prefix="opsrelay-bench-") as tmp:
        work = Path(tmp)
        load = [os.getloadavg()[0]]
        prefix = unique_prefix("metrics")
        rows = [bare_exposition(scrapes), await http_only(scrapes),
                await relay_scrapes("sqlite", f"sqlite:///{work / prefix}.db", prefix, mails[:waiting], dead, scrapes)]
        if absent is None:
            rows.append(await relay_scrapes("RabbitMQ", AMQP_URL, unique_prefix("metrics"), mails[:waiting], dead,
                                            scrapes))
        load.append(os.getloadavg()[0])
        print_table(
            f"Metrics: /metrics scrape latency, {waiting:,} mails waiting",
            ["row", "scrapes", "first ms", "p50 ms", "p95 ms", "max ms", "bytes", "outbound", "dead", "fresh"],
            [r.cells() for r in rows],
            notes=[
                "one scrape at a time, from a thread of this process (urllib, a new connection each), timed from "
                "connect to the last byte; p50/p95/max are nearest-rank over all scrapes, the first included.",
                "waiting: " + "; ".join(r.note for r in rows if r.note) + ". outbound/dead: the last scrape's "
                "opsrelay_queue_messages (ready messages; the prefetch is unacked, not ready).",
                "fresh: scrapes whose queue gauges were read during that scrape (sample age below the scrape's "
                "time); otherwise the collector gave up after sample_timeout (1 s) and served older values.",
                "generate_latest: a fresh PromObserver(['oncall']) registry, no sampler (the exposition alone); "
                "'no relay': the same over HTTP from a MetricsServer.",
                *([absent] if absent else []),
                f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} CPUs.",
            ],
        )
        if absent is not None:
            print(f"Metrics on/off throughput skipped: {absent}\n", flush=True)
            return
        server = await SmtpChild.start(work / "smtp")
        turns: list[Turn] = []
        try:
            await full_relay(server, mails[:20], 1, work)  # warm-up: page cache, first handshake; not measured
            for i in range(rounds):
                # Alternating which goes first, so drift on the machine falls on both alike.
                for metrics in (False, True) if i % 2 == 0 else (True, False):
                    turns.append(await turn(server, mails[:mails_n], work, metrics))
        finally:
            await server.stop()
        load.append(os.getloadavg()[0])
    _print_throughput(turns, mails_n, rounds, load[1:])


def _print_throughput(turns: list[Turn], mails_n: int, rounds: int, load: list[float]) -> None:
    off = [t for t in turns if not t.metrics]
    on = [t for t in turns if t.metrics]
    off_rate, on_rate = statistics.median(t.rate for t in off), statistics.median(t.rate for t in on)
    ratio = on_rate / off_rate
    during = sorted(s.seconds for t in on for s in t.scrapes)

    def cells(name: str, group: list[Turn]) -> list[str]:
        return [name, f"{len(group)}x{mails_n:,}", f"{statistics.median(t.rate for t in group):,.0f}",
                f"{min(t.rate for t in group):,.0f}", f"{max(t.rate for t in group):,.0f}",
                f"{statistics.median(t.cpu_ms for t in group):.2f}",
                str(sum(len(t.scrapes) for t in group)) if group[0].metrics else "",
                f"{percentile(during, 50) * 1e3:.1f} / {during[-1] * 1e3:.1f}" if group[0].metrics else "",
                "" if not group[0].metrics else f"{ratio:.1%}",
                "" if not group[0].metrics else ("yes" if ratio >= TARGET else "NO")]

    print_table(
        "Metrics: relay throughput, metrics off against on (opsrelay serve, RabbitMQ, pool_size=1)",
        ["row", "mails", "median mails/s", "min", "max", "CPU ms/mail", "scrapes in window", "scrape p50/max ms",
         "on/off", f">= {TARGET:.0%}"],
        [cells("metrics off", off), cells(f"[metrics] listen, scraped every {SCRAPE_EVERY:g}s", on)],
        notes=[
            "each turn is bench/relay_throughput.py's (d) row: opsrelay serve draining a pre-filled <prefix>.outbound "
            "into the STARTTLS + AUTH smarthost process; mails/s is (N-1) / (last - first mail at the server).",
            f"rounds: {rounds}, off and on alternating which goes first; on/off is the ratio of the medians.",
            "scrapes in window: GETs of /metrics (from a thread of this process) that ended between the first and the "
            f"last mail, over all 'on' turns; {sum(t.failed for t in on)} failed in that time.",
            "CPU ms/mail: opsrelay serve's CPU between its first and last mail (the metrics thread included).",
            f"1-minute load average {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} CPUs.",
        ],
    )


def run(waiting: int = 10_000, scrapes: int = 50, mails: int = 2000, rounds: int = 5) -> None:
    asyncio.run(_run(waiting, scrapes, mails, rounds))
