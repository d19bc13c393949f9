"""What every benchmark shares: percentiles, plain-text tables, broker names and cleanup.

Benchmarks measure and print; they never assert timings. They do fail loudly
when the thing measured did not happen (a mail not received, a RESULT missing),
because a figure for work that was not done would be a lie.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aio_pika.abc import AbstractConnection

__all__ = [
    "AMQP_URL",
    "REPO",
    "broker_pid",
    "child_env",
    "delete_broker_objects",
    "format_table",
    "percentile",
    "print_table",
    "process_cpu",
    "queue_depths",
    "tail",
    "unique_prefix",
    "wait_for_broker",
]

AMQP_URL = os.environ.get("OPSRELAY_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REPO = Path(__file__).resolve().parent.parent


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (p in 0..100): a value that occurred."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right."""
    body = [list(row) for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *body, strict=False)]

    def line(cells: Sequence[str]) -> str:
        padded = [str(cells[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:],
                                                                                      strict=True)]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in body)])


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[str]],
                notes: Sequence[str] = ()) -> None:
    print(f"\n{title}\n{'=' * len(title)}")
    print(format_table(headers, rows))
    for note in notes:
        print(f"  * {note}")
    print(flush=True)


def unique_prefix(kind: str) -> str:
    """A broker.prefix no other run shares (queues and exchanges are named after it)."""
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: ours without OPSRELAY_* overrides, which would change its config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSRELAY_")}
    env.update(extra)
    return env


def process_cpu(pid: int, *, children: bool = False) -> float:
    """User + system CPU seconds of a live process, from /proc/PID/stat (Linux).

    ``children`` adds what its waited-for children used (cutime, cstime): crashmail's
    sendmail pipes are its children, and their cost is its cost.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
        stat = handle.read()
    # Fields after "(comm)", which may hold spaces: state is field 3, utime 14 ... cstime 17.
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = sum(int(f) for f in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The local RabbitMQ node (Erlang's beam.smp running rabbit), to read its CPU; None if not here."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            erlang = (entry / "comm").read_text().startswith("beam")
            if erlang and b"rabbit" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _connect(url: str, patience: float) -> AbstractConnection:
    """A connection to the broker, waiting up to ``patience`` seconds for it to come (back).

    Other suites on this machine restart RabbitMQ (``rabbitmqctl stop_app``) to test outages.
    """
    import aio_pika
    import aio_pika.exceptions

    deadline = time.monotonic() + patience
    while True:
        try:
            return await aio_pika.connect(url, timeout=5)
        except (ConnectionError, aio_pika.exceptions.AMQPConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def wait_for_broker(url: str, patience: float = 60.0) -> None:
    """Return once the broker takes a connection (or raise after ``patience`` seconds)."""
    connection = await _connect(url, patience)
    await connection.close()


async def delete_broker_objects(url: str, queues: Iterable[str], exchanges: Iterable[str], *,
                                patience: float = 60.0) -> None:
    """Delete what a run declared (queue.delete and exchange.delete succeed on missing names).

    A broker still away after ``patience`` gets a warning naming what is left, not an exception
    that would hide the figures.
    """
    queues, exchanges = list(queues), list(exchanges)
    try:
        connection = await _connect(url, patience)
        async with connection:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
            for exchange in exchanges:
                await channel.exchange_delete(exchange)
    except Exception as exc:
        print(f"warning: could not delete {', '.join(queues + exchanges)} from the broker: {exc!r}",
              file=sys.stderr)


async def queue_depths(url: str, queues: Iterable[str], *, patience: float = 60.0) -> dict[str, int]:
    """Ready messages per queue, read with passive declares (a missing queue raises)."""
    connection = await _connect(url, patience)
    async with connection:
        channel = await connection.channel()
        depths = {}
        for name in queues:
            queue = await channel.declare_queue(name, passive=True)
            depths[name] = int(queue.declaration_result.message_count or 0)
        return depths
