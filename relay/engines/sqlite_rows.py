"""The embedded queue's file: its schema, its pragmas, and the one writer of a message row.

Standard library only and cheap to import, so ``opsrelay-sendmail`` writes its row with
this code rather than a copy of it; :mod:`relay.engines.sqlite_store` builds routing,
leases and TTLs on top. A row is written in one transaction: all of it or nothing.
WAL with ``synchronous=FULL`` makes each commit durable (fsynced) before it returns.
"""

from __future__ import annotations

# _sqlite3, the C module that sqlite3 wraps: the wrapper adds datetime adapters we never use
# and ~2.5 ms to every submission (python -X importtime). Its Connection is sqlite3.Connection.
import _sqlite3 as sqlite3
import json
import os
import time
from contextlib import contextmanager, suppress

from relay.errors import ConfigurationError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from relay.contract.message import HeaderValue

__all__ = [
    "INSERT",
    "SCHEMA_VERSION",
    "Error",
    "connect",
    "decode_headers",
    "encode_headers",
    "enqueue",
    "enqueue_in",
    "immediate",
    "insert",
    "now_ms",
]

# 2: messages.queued_at (for the age of a queue's oldest message); a version-1 file gains it in place.
SCHEMA_VERSION = 2
# What the file's IO raises (SQLITE_BUSY, SQLITE_FULL, I/O errors): sqlite3.Error.
Error = sqlite3.Error

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, alternate TEXT);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY, ttl_ms INTEGER, dead_letter_to TEXT);
CREATE TABLE IF NOT EXISTS bindings (
    exchange TEXT NOT NULL, queue TEXT NOT NULL, pattern TEXT NOT NULL,
    PRIMARY KEY (exchange, queue, pattern));
-- AUTOINCREMENT: ids never come back, so ORDER BY id is arrival order for ever.
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    body BLOB NOT NULL,
    message_id TEXT NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    redelivered INTEGER NOT NULL DEFAULT 0,
    expires_at INTEGER,
    owner TEXT,
    queued_at INTEGER);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, owner, id);
CREATE INDEX IF NOT EXISTS messages_owner ON messages (owner) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_due ON messages (expires_at)
    WHERE expires_at IS NOT NULL AND owner IS NULL;
"""

INSERT = "INSERT INTO messages (queue, body, message_id, content_type, headers, routing_key, expires_at, queued_at)"


def now_ms() -> int:
    # Wall clock, not monotonic: every process on the host must agree on due times.
    return time.time_ns() // 1_000_000


def encode_headers(headers: Mapping[str, HeaderValue]) -> str:
    """The ``headers`` column: one JSON object, UTF-8 as it is."""
    return json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":"))


def decode_headers(column: str) -> dict[str, HeaderValue]:
    decoded: dict[str, HeaderValue] = json.loads(column)
    return decoded


def connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open (creating 0600, and its folder 0700) the database, in WAL mode with fsync on every commit."""
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    # Only a new file is opened here: closing a descriptor of a file drops every POSIX (fcntl)
    # lock this process holds on it, and SQLite's other connections here hold theirs (a lost WAL
    # lock lets another process delete the live -wal file).
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.fchmod(fd, 0o600)  # ours and new: exact mode whatever the umask
        finally:
            os.close(fd)
    # isolation_level=None: no implicit transactions, we open our own.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # persistent in the file; set once
        # WAL + FULL: each commit fsyncs the WAL, so a returned publish survives power loss.
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigurationError(f"{path} was written by a newer opsrelay (schema {version})")
        if version < SCHEMA_VERSION:
            # Not executescript(): it commits first, and the schema must be made under the write lock.
            with immediate(conn):
                # Again under the lock: another process may have just migrated it.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 1:  # before the CREATE INDEX statements: the table exists without the column
                    conn.execute("ALTER TABLE messages ADD COLUMN queued_at INTEGER")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock up front (waiting up to busy_timeout)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # Some errors (SQLITE_FULL, I/O) already rolled back; a second ROLLBACK would hide them.
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def insert(conn: sqlite3.Connection, queue: str, body: bytes, message_id: str, content_type: str,
           headers: str, routing_key: str, expires_at: int | None) -> None:
    """One message row; the caller holds the write transaction."""
    conn.execute(f"{INSERT} VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (queue, body, message_id, content_type, headers, routing_key, expires_at, now_ms()))


def enqueue(conn: sqlite3.Connection, queue: str, body: bytes, message_id: str, content_type: str,
            headers: Mapping[str, HeaderValue]) -> None:
    """Publish to ``queue`` through the default exchange, declaring the queue (no TTL) if it is new.

    What a submission needs, without the routing of :mod:`relay.engines.sqlite_store`.
    """
    with immediate(conn):
        enqueue_in(conn, queue, body, message_id, content_type, headers)


def enqueue_in(conn: sqlite3.Connection, queue: str, body: bytes, message_id: str, content_type: str,
               headers: Mapping[str, HeaderValue]) -> None:
    """:func:`enqueue` inside the caller's write transaction (to commit it with something else)."""
    found = conn.execute("SELECT ttl_ms FROM queues WHERE name = ?", (queue,)).fetchone()
    if found is None:
        conn.execute("INSERT INTO queues VALUES (?, NULL, NULL)", (queue,))
    ttl = None if found is None else found[0]
    insert(conn, queue, body, message_id, content_type, encode_headers(headers), queue,
           None if ttl is None else now_ms() + ttl)
