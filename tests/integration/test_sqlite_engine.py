"""What only the embedded engine has to prove: files, processes, crashes.

Other processes are real ones (this interpreter with ``-c``), killed with
SIGKILL where the test is about crashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path

import pytest

from relay.contract.message import Message
from relay.contract.topology import BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec, Topology
from relay.engines.sqlite import SqliteEngine, db_path
from relay.errors import BrokerUnavailable, ConfigError, ConfigurationError
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)

CONSUMER = """
import asyncio, sys, time
from relay.engines.sqlite import SqliteEngine

async def main(url, queue, count, hold):
    # A 30 s fallback timer: only a poke can wake this consumer in time.
    async with SqliteEngine(url, wake_interval=30.0) as engine:
        seen = 0
        async for delivery in engine.consume(queue, prefetch=4):
            sent = float(delivery.message.headers.get("sent") or "nan")
            print(delivery.message.message_id, time.time() - sent, flush=True)
            seen += 1
            if not hold:
                await delivery.ack()
            if seen == count:
                if hold:  # inside the loop: leaving it would return the deliveries
                    print("holding", flush=True)
                    await asyncio.sleep(3600)  # hold the leases until the test kills this process
                break

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "hold"))
"""

PUBLISHER = """
import asyncio, hashlib, sys
from relay.contract.message import Message
from relay.engines.sqlite import SqliteEngine

def body(n):
    return hashlib.sha256(str(n).encode()).digest() * (n % 2000 + 1)

async def main(url, exchange, name, count):
    async with SqliteEngine(url) as engine:
        for n in range(count):
            await engine.publish(exchange, "k", Message(body(n), f"{name}-{n}"))
            if n == 0:
                print("started", flush=True)
    print("done", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def payload(n: int) -> bytes:
    """The PUBLISHER's body for message n: up to 64 KiB, so a kill can land inside a write."""
    return hashlib.sha256(str(n).encode()).digest() * (n % 2000 + 1)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/queue.db"


@asynccontextmanager
async def opened(url: str, **options: float) -> AsyncIterator[SqliteEngine]:
    engine = SqliteEngine(url, **options)
    await engine.connect()
    try:
        yield engine
    finally:
        await engine.close()


@asynccontextmanager
async def child(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process running ``script``; killed and reaped on the way out."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    raw = await asyncio.wait_for(proc.stdout.readline(), 15)
    assert raw, f"child exited early with {await proc.wait()}"
    return raw.decode().strip()


async def wait_for_socket(run_dir: Path, within: float = 15.0) -> None:
    """Until a consumer has bound its wake socket (so the next publish must poke it)."""
    await wait_until(lambda: any(run_dir.glob("*.sock")), within, what="the consumer to listen for wake-ups")


async def more_than(engine: SqliteEngine, queue: str, count: int) -> bool:
    return await engine.depth(queue) > count


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def test_database_is_0600_and_a_new_directory_0700(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "state"
    # With umask 0 the engine's own modes are all that keeps other users out.
    with umask(0):
        async with opened(f"sqlite:///{directory}/queue.db") as engine:
            await engine.declare(Topology(queues=(QueueSpec("q"),)))
            await engine.send("q", Message(b"secret", "m1"))

            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
            assert stat.S_IMODE((directory / "queue.db.run").stat().st_mode) == 0o700
            for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
                assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name


async def test_publish_is_committed_in_wal_mode_with_full_sync(url: str) -> None:
    async with opened(url) as engine:
        await engine.declare(Topology(queues=(QueueSpec("q"),)))
        await engine.send("q", Message(b"durable", "m1"))
        # Another connection (as another process would) sees the row at once.
        with closing(sqlite3.connect(db_path(url))) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("SELECT body FROM messages").fetchall() == [(b"durable",)]


async def test_a_consumer_in_another_process_is_woken_promptly(url: str, tmp_path: Path) -> None:
    async with opened(url) as engine:
        await engine.declare(Topology(queues=(QueueSpec("jobs"),)))
        async with child(CONSUMER, url, "jobs", "5", "ack") as proc:
            await wait_for_socket(tmp_path / "queue.db.run")
            # Let it go to sleep on its socket (not observable from here): a publish then has to wake it.
            await asyncio.sleep(0.2)
            latencies = []
            for n in range(5):
                await engine.send("jobs", Message(b"", f"m{n}", headers={"sent": repr(time.time())}))
                message_id, latency = (await line(proc)).split()
                assert message_id == f"m{n}"
                latencies.append(float(latency))
                await asyncio.sleep(0.05)  # pacing: it goes back to sleep before the next publish
            assert await proc.wait() == 0
    assert max(latencies) < 0.5, latencies
    with closing(sqlite3.connect(db_path(url))) as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


async def test_deliveries_of_a_killed_consumer_come_back(url: str) -> None:
    async with opened(url) as engine:
        await engine.declare(Topology(queues=(QueueSpec("jobs"),)))
        for n in range(10):
            await engine.send("jobs", Message(f"job {n}".encode(), f"m{n}"))

        async with child(CONSUMER, url, "jobs", "3", "hold") as proc:
            held = [(await line(proc)).split()[0] for _ in range(3)]
            assert await line(proc) == "holding"
            assert held == ["m0", "m1", "m2"]
            # Alive, its leases (prefetch 4) are its own: we see only the six others.
            assert await engine.depth("jobs") == 6
            other = await engine.get("jobs")
            assert other is not None
            assert other.message.message_id == "m4"
            await other.reject(requeue=True)

            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL

        async with opened(url) as successor:
            got = {}
            while (delivery := await successor.get("jobs")) is not None:
                got[delivery.message.message_id] = delivery.redelivered
                await delivery.ack()
    assert sorted(got, key=lambda m: int(m[1:])) == [f"m{n}" for n in range(10)]
    redelivered = {m for m, again in got.items() if again}
    # The three it saw and the one it had prefetched; m4 was requeued by us.
    assert redelivered == {"m0", "m1", "m2", "m3", "m4"}


async def test_a_killed_publisher_leaves_only_whole_messages(url: str) -> None:
    both = Topology(
        exchanges=(ExchangeSpec("fan", ExchangeKind.FANOUT),),
        queues=(QueueSpec("left"), QueueSpec("right")),
        bindings=(BindingSpec("left", "fan", "#"), BindingSpec("right", "fan", "#")),
    )
    async with opened(url) as engine:
        await engine.declare(both)
        async with child(PUBLISHER, url, "fan", "p", "1000000") as proc:
            assert await line(proc) == "started"
            # Killed while it writes, once it has written more than a handful (asserted below).
            await wait_until(lambda: more_than(engine, "left", 5), 15, what="the publisher to write some messages")
            proc.send_signal(signal.SIGKILL)
            assert await proc.wait() == -signal.SIGKILL

        sides = {}
        for queue in ("left", "right"):
            numbers = []
            while (delivery := await engine.get(queue)) is not None:
                n = int(delivery.message.message_id.removeprefix("p-"))
                assert delivery.message.body == payload(n), f"message {n} in {queue} is damaged"
                numbers.append(n)
                await delivery.ack()
            sides[queue] = numbers
    assert len(sides["left"]) > 5
    # Each publish committed whole before the next began: no gaps, and a fanout
    # publish reached both queues or neither.
    assert sides["left"] == list(range(len(sides["left"])))
    assert sides["right"] == sides["left"]
    with closing(sqlite3.connect(db_path(url))) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_concurrent_publishers_each_message_is_consumed_once(url: str) -> None:
    processes, per_process = 4, 200
    expected = {f"p{i}-{n}" for i in range(processes) for n in range(per_process)}
    async with opened(url) as first, opened(url) as second:
        await first.declare(Topology(
            exchanges=(ExchangeSpec("in", ExchangeKind.TOPIC),),
            queues=(QueueSpec("work"),),
            bindings=(BindingSpec("work", "in", "#"),),
        ))
        consumed: list[str] = []
        done = asyncio.Event()

        async def consume(engine: SqliteEngine) -> None:
            async for delivery in engine.consume("work", prefetch=10):
                consumed.append(delivery.message.message_id)
                await delivery.ack()
                if len(consumed) >= len(expected):
                    done.set()

        consumers = [asyncio.create_task(consume(e)) for e in (first, second)]
        try:
            procs = [
                await asyncio.create_subprocess_exec(
                    sys.executable, "-c", PUBLISHER, url, "in", f"p{i}", str(per_process),
                    stdout=asyncio.subprocess.PIPE,
                )
                for i in range(processes)
            ]
            outputs = [(await p.communicate())[0].decode().split() for p in procs]
            assert [p.returncode for p in procs] == [0] * processes
            assert outputs == [["started", "done"]] * processes
            await asyncio.wait_for(done.wait(), 30)
        finally:
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
        assert len(consumed) == len(expected)
        assert set(consumed) == expected
        assert await first.depth("work") == 0


async def test_a_deep_directory_still_gets_wake_ups(tmp_path: Path) -> None:
    # Longer than sun_path (108 bytes): the socket is reached through the open directory.
    deep = tmp_path / ("d" * 100) / ("e" * 100)
    async with opened(f"sqlite:///{deep}/queue.db", wake_interval=30.0) as engine:
        await engine.declare(Topology(queues=(QueueSpec("q"),)))
        deliveries = engine.consume("q")
        waiting = asyncio.ensure_future(anext(deliveries))
        await asyncio.sleep(0.1)  # a negative check, and it goes to sleep on its socket meanwhile
        assert not waiting.done()
        async with opened(f"sqlite:///{deep}/queue.db") as publisher:
            started = time.monotonic()
            await publisher.send("q", Message(b"deep", "m1"))
            delivery = await asyncio.wait_for(waiting, 5)
            assert time.monotonic() - started < 0.5
        assert delivery.message.body == b"deep"
        await delivery.ack()
        await deliveries.aclose()  # type: ignore[attr-defined]


async def test_a_sleeping_consumer_takes_a_dead_letter_when_its_ttl_ends(url: str) -> None:
    topology = Topology(queues=(QueueSpec("out"), QueueSpec("retry", ttl_ms=200, dead_letter_to="out")))
    # The consumer's fallback timer is far away: only the TTL due time can wake it.
    async with opened(url, wake_interval=30.0) as consumer, opened(url) as publisher:
        await publisher.declare(topology)
        deliveries = consumer.consume("out")
        waiting = asyncio.ensure_future(anext(deliveries))
        await asyncio.sleep(0.1)  # let it go to sleep first (not observable): only the TTL may wake it
        started = time.monotonic()
        await publisher.send("retry", Message(b"later", "m1"))
        delivery = await asyncio.wait_for(waiting, 5)
        waited = time.monotonic() - started
        await delivery.ack()
        await deliveries.aclose()  # type: ignore[attr-defined]
    assert 0.19 <= waited < 0.6, waited


async def test_sqlite_errors_become_broker_unavailable(tmp_path: Path) -> None:
    garbage = tmp_path / "queue.db"
    garbage.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(BrokerUnavailable, match=r"queue\.db: file is not a database$") as caught:
        await SqliteEngine(f"sqlite:///{garbage}").connect()
    assert "\n" not in str(caught.value)

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(BrokerUnavailable, match="Not a directory"):
        await SqliteEngine(f"sqlite:///{blocked}/sub/queue.db").connect()


async def test_unknown_queue_or_closed_engine_is_reported(url: str) -> None:
    engine = SqliteEngine(url)
    with pytest.raises(BrokerUnavailable, match="not connected"):
        await engine.depth("q")
    async with opened(url) as engine:
        with pytest.raises(ConfigurationError, match="no queue 'missing'"):
            await engine.get("missing")
        with pytest.raises(ConfigurationError, match="no queue 'missing'"):
            await anext(engine.consume("missing"))


def test_url_names_the_file() -> None:
    assert db_path("sqlite:////var/lib/opsrelay/queue.db") == "/var/lib/opsrelay/queue.db"
    assert db_path("sqlite:///relative.db") == os.path.abspath("relative.db")
    for bad in ("amqp://localhost/", "sqlite://", "sqlite:///:memory:", "sqlite:/x.db"):
        with pytest.raises(ConfigError, match=r"broker\.url"):
            db_path(bad)
    with pytest.raises(ConfigError, match="busy_timout"):
        SqliteEngine(f"sqlite:////tmp/{uuid.uuid4()}.db", busy_timout=3.0)
