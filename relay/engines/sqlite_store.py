"""The SQL of the embedded engine: schema, routing, leases and TTL, all synchronous.

Every function takes the engine's connection and runs in its worker thread.
Writers open ``BEGIN IMMEDIATE`` so that two processes never both read and then
both take the same row; WAL readers never block them. A message row is written
and deleted in one transaction, so a killed process leaves whole rows or none.

A row is *ready* when ``owner`` is NULL; taking it writes the taker's token into
``owner`` (the lease); ack deletes it, requeue clears ``owner`` again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from relay.contract.keys import topic_matches
from relay.contract.message import Message
from relay.contract.topology import ExchangeKind, Topology
from relay.engines.sqlite_rows import INSERT, decode_headers, encode_headers, immediate, insert, now_ms
from relay.errors import ConfigurationError

__all__ = [
    "Row",
    "Settle",
    "declare",
    "depth",
    "expire",
    "foreign_owners",
    "next_due",
    "oldest",
    "publish",
    "read_all",
    "release",
    "require_queue",
    "settle",
    "take",
]

# Expired rows moved per pass; the rest go on the next pass (their due time is already past).
_EXPIRE_BATCH = 500
_COLUMNS = "id, body, message_id, content_type, headers, routing_key, redelivered"
_EXCHANGE = "SELECT kind, alternate FROM exchanges WHERE name = ?"


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    message: Message
    redelivered: bool


def declare(conn: sqlite3.Connection, topology: Topology) -> None:
    with immediate(conn):
        for ex in topology.exchanges:
            if ex.name == "":
                raise ConfigurationError("the default exchange cannot be declared")
            found = conn.execute(_EXCHANGE, (ex.name,)).fetchone()
            if found is None:
                conn.execute("INSERT INTO exchanges VALUES (?, ?, ?)", (ex.name, ex.kind.value, ex.alternate))
            elif tuple(found) != (ex.kind.value, ex.alternate):
                # RabbitMQ answers PRECONDITION_FAILED here; so do we.
                raise ConfigurationError(
                    f"exchange {ex.name!r} exists as {found[0]} (alternate {found[1]!r}), "
                    f"declared as {ex.kind.value} (alternate {ex.alternate!r})"
                )
        for q in topology.queues:
            found = conn.execute(
                "SELECT ttl_ms, dead_letter_to FROM queues WHERE name = ?", (q.name,)
            ).fetchone()
            if found is None:
                conn.execute("INSERT INTO queues VALUES (?, ?, ?)", (q.name, q.ttl_ms, q.dead_letter_to))
            elif q.ttl_added_later and tuple(found) == (None, q.dead_letter_to):
                # Rows already there keep no expiry; the TTL counts for what arrives from now on.
                conn.execute("UPDATE queues SET ttl_ms = ? WHERE name = ?", (q.ttl_ms, q.name))
            elif tuple(found) != (q.ttl_ms, q.dead_letter_to):
                raise ConfigurationError(
                    f"queue {q.name!r} exists with ttl_ms={found[0]} dead_letter_to={found[1]!r}, "
                    f"declared with ttl_ms={q.ttl_ms} dead_letter_to={q.dead_letter_to!r}"
                )
        for b in topology.bindings:
            if not _exists(conn, "exchanges", b.exchange):
                raise ConfigurationError(f"cannot bind {b.queue!r}: no exchange {b.exchange!r}")
            require_queue(conn, b.queue)
            conn.execute("INSERT OR IGNORE INTO bindings VALUES (?, ?, ?)", (b.exchange, b.queue, b.pattern))


def _exists(conn: sqlite3.Connection, table: str, name: str) -> bool:
    return conn.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone() is not None  # noqa: S608


def require_queue(conn: sqlite3.Connection, queue: str) -> None:
    if not _exists(conn, "queues", queue):
        raise ConfigurationError(f"no queue {queue!r} (declare the topology first)")


def _route(conn: sqlite3.Connection, exchange: str, key: str) -> list[str]:
    """Queues an exchange delivers ``key`` to, following alternate exchanges like RabbitMQ."""
    if exchange == "":
        require_queue(conn, key)
        return [key]
    found = conn.execute(_EXCHANGE, (exchange,)).fetchone()
    if found is None:
        raise ConfigurationError(f"no exchange {exchange!r} (declare the topology first)")
    seen = {exchange}
    while True:
        kind, alternate = found
        bound = conn.execute("SELECT queue, pattern FROM bindings WHERE exchange = ?", (exchange,)).fetchall()
        queues = [q for q, p in bound if kind == ExchangeKind.FANOUT or topic_matches(p, key)]
        if queues:
            return list(dict.fromkeys(queues))
        # An alternate exchange receives what no binding matched; a missing one drops it.
        if alternate is None or alternate in seen:
            return []
        exchange = alternate
        seen.add(exchange)
        found = conn.execute(_EXCHANGE, (exchange,)).fetchone()
        if found is None:
            return []


def publish(conn: sqlite3.Connection, exchange: str, key: str, message: Message) -> tuple[list[str], int | None]:
    """Store one row per destination queue; returns the queues and the shortest TTL among them."""
    headers = encode_headers(message.headers)
    now = now_ms()
    with immediate(conn):
        queues = _route(conn, exchange, key)
        if not queues:
            # Like the AMQP engine's mandatory publish: never let a message vanish silently.
            raise ConfigurationError(f"exchange {exchange!r} routes {key!r} to no queue")
        shortest: int | None = None
        for queue in queues:
            ttl = conn.execute("SELECT ttl_ms FROM queues WHERE name = ?", (queue,)).fetchone()[0]
            if ttl is not None:
                shortest = ttl if shortest is None else min(shortest, ttl)
            insert(conn, queue, message.body, message.message_id, message.content_type, headers, key,
                   None if ttl is None else now + ttl)
    return queues, shortest


def _row(values: tuple[int, bytes, str, str, str, str, int]) -> Row:
    row_id, body, message_id, content_type, headers, routing_key, redelivered = values
    return Row(row_id, Message(body, message_id, content_type, decode_headers(headers), routing_key),
               bool(redelivered))


def take(conn: sqlite3.Connection, queue: str, owner: str, limit: int) -> tuple[list[Row], list[str]]:
    """Lease up to ``limit`` ready rows of ``queue``, oldest first, after expiring due rows.

    Returns the rows and the queues that expired rows moved into (to wake their consumers).
    """
    now = now_ms()
    # Read first, without the write lock: an idle consumer's check must not block publishers.
    busy = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM messages WHERE queue = ? AND owner IS NULL)"
        " OR EXISTS (SELECT 1 FROM messages WHERE owner IS NULL AND expires_at <= ?)",
        (queue, now),
    ).fetchone()[0]
    if not busy:
        return [], []
    with immediate(conn):
        moved = _expire(conn, now)
        values = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? AND owner IS NULL ORDER BY id LIMIT ?",  # noqa: S608
            (queue, limit),
        ).fetchall()
        conn.executemany("UPDATE messages SET owner = ? WHERE id = ?", [(owner, v[0]) for v in values])
    return [_row(v) for v in values], moved


def expire(conn: sqlite3.Connection) -> list[str]:
    """Dead-letter every ready row whose queue TTL has passed; returns the target queues."""
    now = now_ms()
    due = conn.execute(
        "SELECT 1 FROM messages WHERE owner IS NULL AND expires_at <= ? LIMIT 1", (now,)
    ).fetchone()
    if due is None:
        return []
    with immediate(conn):
        return _expire(conn, now)


def _expire(conn: sqlite3.Connection, now: int) -> list[str]:
    ids = [r[0] for r in conn.execute(
        "SELECT id FROM messages WHERE owner IS NULL AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
        (now, _EXPIRE_BATCH),
    )]
    return _dead_letter(conn, ids, now)


def _dead_letter(conn: sqlite3.Connection, ids: Sequence[int], now: int) -> list[str]:
    """Move rows to their queue's ``dead_letter_to`` (or drop them when it has none).

    As RabbitMQ with ``x-dead-letter-routing-key``: the row joins the tail of the
    target queue, its routing key becomes the target's name, headers and
    message_id stay, and the target's own TTL starts counting.
    """
    targets: dict[str, None] = {}
    for row_id in ids:
        target, ttl = conn.execute(
            "SELECT t.name, t.ttl_ms FROM messages m JOIN queues q ON q.name = m.queue"
            " LEFT JOIN queues t ON t.name = q.dead_letter_to WHERE m.id = ?",
            (row_id,),
        ).fetchone() or (None, None)
        if target is not None:
            conn.execute(
                # queued_at stays: as RabbitMQ's timestamp property, the age counts from the first publish.
                f"{INSERT} SELECT ?, body, message_id, content_type, headers, ?, ?, queued_at"  # noqa: S608
                " FROM messages WHERE id = ?",
                (target, target, None if ttl is None else now + ttl, row_id),
            )
            targets[target] = None
        conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
    return list(targets)


class Settle(Enum):
    ACK = "ack"
    REQUEUE = "requeue"
    REJECT = "reject"


def settle(conn: sqlite3.Connection, row_id: int, owner: str, how: Settle) -> list[str] | None:
    """Apply ack or reject to a leased row: the queues to wake, or None if the lease is not ours."""
    with immediate(conn):
        found = conn.execute("SELECT queue FROM messages WHERE id = ? AND owner = ?", (row_id, owner)).fetchone()
        if found is None:
            return None
        if how is Settle.ACK:
            conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))
            return []
        if how is Settle.REQUEUE:
            conn.execute("UPDATE messages SET owner = NULL, redelivered = 1 WHERE id = ?", (row_id,))
            return [str(found[0])]
        # RabbitMQ dead-letters a message rejected without requeue when its queue has a target.
        return _dead_letter(conn, [row_id], now_ms())


def release(
    conn: sqlite3.Connection, owners: Sequence[str], ids: Sequence[int] | None = None, *, redelivered: bool
) -> list[str]:
    """Return leased rows (all of ``owners``', or just ``ids``) to their queues; returns those queues."""
    with immediate(conn):
        params: list[str | int]
        if ids is None:
            where, params = f"owner IN ({','.join('?' * len(owners))})", list(owners)
        else:
            where, params = f"owner = ? AND id IN ({','.join('?' * len(ids))})", [owners[0], *ids]
        queues = [r[0] for r in conn.execute(f"SELECT DISTINCT queue FROM messages WHERE {where}", params)]  # noqa: S608
        conn.execute(
            f"UPDATE messages SET owner = NULL, redelivered = redelivered OR ? WHERE {where}",  # noqa: S608
            [int(redelivered), *params],
        )
    return queues


def foreign_owners(conn: sqlite3.Connection, me: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT owner FROM messages WHERE owner IS NOT NULL AND owner != ?", (me,)
    )]


def next_due(conn: sqlite3.Connection) -> int | None:
    """Earliest TTL due time (unix ms) of a ready row, to sleep exactly until then."""
    value = conn.execute(
        "SELECT MIN(expires_at) FROM messages WHERE expires_at IS NOT NULL AND owner IS NULL"
    ).fetchone()[0]
    return None if value is None else int(value)


def depth(conn: sqlite3.Connection, queue: str) -> int:
    require_queue(conn, queue)
    return int(conn.execute(
        "SELECT COUNT(*) FROM messages WHERE queue = ? AND owner IS NULL", (queue,)
    ).fetchone()[0])


def oldest(conn: sqlite3.Connection, queue: str) -> int | None:
    """When (unix ms) the oldest ready row of ``queue`` was queued (None: empty, or rows of schema 1)."""
    require_queue(conn, queue)
    value = conn.execute(
        "SELECT queued_at FROM messages WHERE queue = ? AND owner IS NULL ORDER BY id LIMIT 1", (queue,)
    ).fetchone()
    return None if value is None or value[0] is None else int(value[0])


def read_all(conn: sqlite3.Connection, queue: str, drop: Callable[[Message], bool] | None) -> list[Message]:
    """Every row of ``queue`` (leased ones too), oldest first; rows ``drop`` picks are deleted in the same
    transaction, so two readers never see a half-dropped queue."""
    require_queue(conn, queue)
    with immediate(conn):
        rows = [_row(v) for v in conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE queue = ? ORDER BY id", (queue,))]  # noqa: S608
        gone = [r.id for r in rows if drop is not None and drop(r.message)]
        conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in gone])
    return [r.message for r in rows if r.id not in set(gone)]


def waiting(conn: sqlite3.Connection, queues: Sequence[str],
            queue_prefix: str = "\0") -> list[tuple[str, Message, bool, int | None]]:
    """Every row of ``queues`` or of a queue named ``queue_prefix…``, leased ones included, in order:
    (queue, message, leased, expires_at). For ``mailq``, which shows what is being delivered too."""
    rows = conn.execute(
        f"SELECT queue, {_COLUMNS}, owner IS NOT NULL, expires_at FROM messages"  # noqa: S608
        f" WHERE queue IN ({','.join('?' * len(queues))}) OR substr(queue, 1, ?) = ? ORDER BY id",
        (*queues, len(queue_prefix), queue_prefix)).fetchall()
    return [(r[0], _row(r[1:8]).message, bool(r[8]), r[9]) for r in rows]
