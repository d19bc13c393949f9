"""The relay's side of the maildrop: check each file, queue its mail durably, then remove it.

Layout, all root's, next to each other in the maildrop's parent (``/var/spool/opsrelay``):
``maildrop/`` (mode 1733: anyone creates, nobody lists, the sticky bit keeps each file its
owner's), ``rejected/`` (0700: what was refused, kept for a person to look at),
``maildrop.lock`` (one ingest at a time) and ``ingested.db`` (the ids already queued on a
RabbitMQ broker). Users can create names in ``maildrop/`` only, so nothing the ingest relies
on lives there except the drops and the relay's ``.wake`` socket (removed and bound anew).

A file is read only when it is what a submission makes: opened with ``O_NOFOLLOW`` (no
symlink), a regular file (no FIFO, device or folder), one link (no hard link to another's
file), owned by the uid written inside it (the kernel sets the owner; a user cannot forge it),
and at most ``sendmail.max_size``. Anything else is moved to ``rejected/`` unread, with a log
line. The mail is then composed with the queue path's own rules for that user
(:mod:`relay.sendmail.compose`): aliases, local names, From, ``[sendmail.senders]``; a non-root
user not in ``sendmail.trusted_users`` sends as themselves, their ``-f`` noted in an
X-Authentication-Warning header.

Queued before it is unlinked, and once only: the file's name is the mail's id. On the embedded
queue the id is recorded in the queue file in the same transaction as the mail; on RabbitMQ in
``ingested.db`` right after the broker confirmed (a crash between the two may send that one mail
twice, with the same Message-ID).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from relay.config.fast import FastConfig
from relay.contract.envelope import CONTENT_TYPE
from relay.contract.mail import OutboundMail, to_message
from relay.contract.maildrop import TMP_SUFFIX, Drop, decode_drop, is_drop_name
from relay.contract.names import outbound_queue
from relay.contract.topology import outbound_topology
from relay.contract.urls import is_sqlite, sqlite_path
from relay.engines import sqlite_rows
from relay.engines.base import Engine
from relay.errors import MessageDecodeError, RelayError
from relay.maildrop.drop import WAKE_SOCKET
from relay.sendmail.compose import SubmissionError, compose, sender_of, user_of

__all__ = ["STALE_TMP", "IngestReport", "Maildrop", "ensure_layout", "for_relay", "in_background", "watch"]

log = logging.getLogger("opsrelay.maildrop")
# A drop still named .tmp after this long was abandoned mid-write (its writer died): removed.
STALE_TMP = 86400.0
# Files looked at per pass; the rest wait for the next (a flood must not starve delivery).
BATCH = 500
SOURCE = "sendmail"


def ensure_layout(folder: str) -> None:
    """As root: the maildrop (1733), its parent (0755) and ``rejected/`` (0700), all root's; modes and
    owners put right when they are wrong."""
    parent = os.path.dirname(folder.rstrip("/"))
    for path, mode in ((parent, 0o755), (folder, 0o1733), (os.path.join(parent, "rejected"), 0o700)):
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode)  # mkdir's mode went through the umask
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"{path} is not a folder")
        if st.st_uid != 0 or st.st_gid != 0:
            os.chown(path, 0, 0, follow_symlinks=False)
            log.warning("maildrop: %s was not root's; it is now", path)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode, follow_symlinks=False)
            log.warning("maildrop: %s had mode %o; it is now %o", path, stat.S_IMODE(st.st_mode), mode)


@dataclass
class IngestReport:
    queued: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # ingested before (a crash before the unlink)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    removed_tmp: list[str] = field(default_factory=list)


def for_relay(source: str) -> Maildrop | None:
    """The maildrop ``opsrelay serve`` ingests, for the config read from ``source``: as root it is
    made (or put right) first; as another user only one that exists and is ours to read is taken."""
    from relay.config.fast import load_path

    maildrop = Maildrop(load_path(source))
    if os.geteuid() == 0:
        try:
            ensure_layout(maildrop.folder)
        except OSError as exc:
            log.error("maildrop: cannot set up %s: %s; not ingesting", maildrop.folder, exc.strerror or exc)
            return None
        return maildrop
    return maildrop if os.access(maildrop.folder, os.R_OK | os.W_OK | os.X_OK) else None


class Maildrop:
    """One maildrop and where its mail goes (the config's broker)."""

    def __init__(self, cfg: FastConfig) -> None:
        self.cfg = cfg
        self.folder = cfg.maildrop
        self.parent = os.path.dirname(self.folder.rstrip("/"))
        self.rejected = os.path.join(self.parent, "rejected")
        self._declared: Engine | None = None

    # -- what waits ---------------------------------------------------------------------------

    def waiting(self) -> tuple[int, float | None]:
        """Drops waiting and the oldest one's age in seconds (for ``opsrelay queue``)."""
        now, count, oldest = time.time(), 0, None
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0, None
        for entry in entries:
            if is_drop_name(entry.name):
                count += 1
                with contextlib.suppress(OSError):
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                    oldest = age if oldest is None else max(oldest, age)
        return count, oldest

    # -- one pass -----------------------------------------------------------------------------

    async def ingest(self, engine: Engine | None) -> IngestReport:
        """Every drop there is now, once. ``engine``: the broker's, unless the queue is a sqlite file."""
        report = IngestReport()
        lock = os.open(os.path.join(self.parent, "maildrop.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return report  # another ingest (the listener, opsrelay maildrop) is at it
            folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                for name in sorted(os.listdir(folder))[:BATCH]:
                    await self._one(folder, name, engine, report)
            finally:
                os.close(folder)
        finally:
            os.close(lock)
        return report

    async def _one(self, folder: int, name: str, engine: Engine | None, report: IngestReport) -> None:
        if name == WAKE_SOCKET:
            return
        if name.endswith(TMP_SUFFIX) and is_drop_name(name.removesuffix(TMP_SUFFIX)):
            self._stale(folder, name, report)
            return
        if not is_drop_name(name):
            self._reject(folder, name, "not a drop's name", report)
            return
        try:
            drop = self._read(folder, name)
        except _Refused as why:
            self._reject(folder, name, str(why), report)
            return
        try:
            mail = self._compose(name, drop)
        except SubmissionError as exc:
            self._reject(folder, name, f"uid {drop.uid}: {exc}", report)
            return
        if await self._queue(mail, engine):
            report.queued.append(name)
            log.info("maildrop: %s from uid %d queued as mail to %d recipient(s)", name, drop.uid,
                     len(mail.recipients))
        else:
            report.already.append(name)
            log.info("maildrop: %s was queued before; its file is removed now", name)
        os.unlink(name, dir_fd=folder)

    def _read(self, folder: int, name: str) -> Drop:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=folder)
        except OSError as exc:
            raise _Refused(f"cannot be opened as a plain file ({exc.strerror or exc}): a symlink?") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Refused("not a regular file")
            if st.st_nlink != 1:
                raise _Refused(f"has {st.st_nlink} links: a hard link to someone's file")
            if st.st_size > self.cfg.max_size + 64 * 1024:
                raise _Refused(f"{st.st_size} bytes, over sendmail.max_size")
            chunks, left = [], self.cfg.max_size + 64 * 1024 + 1
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        try:
            drop = decode_drop(b"".join(chunks))
        except MessageDecodeError as exc:
            raise _Refused(str(exc)) from None
        if drop.uid != st.st_uid:
            raise _Refused(f"says uid {drop.uid} but belongs to uid {st.st_uid}")
        return drop

    def _compose(self, name: str, drop: Drop) -> OutboundMail:
        user, gecos = user_of(drop.uid)
        trusted = drop.uid == 0 or user in self.cfg.trusted_users
        sender = sender_of(drop.sender, user, self.cfg, trusted=trusted)
        refused = drop.sender if drop.sender is not None and not trusted else None
        composed = compose(drop.message, sender=sender, user=user, gecos=gecos, full_name=drop.full_name,
                           recipients=drop.recipients, from_headers=drop.from_headers, cfg=self.cfg,
                           now=drop.submitted, unique=f"drop.{name}", refused_flag=refused)
        return OutboundMail(composed.sender, composed.recipients, composed.raw, message_id=name, origin=SOURCE)

    async def _queue(self, mail: OutboundMail, engine: Engine | None) -> bool:
        """Durably on outbound; False when this id was queued before (nothing is queued again)."""
        queue = outbound_queue(self.cfg.prefix)
        if is_sqlite(self.cfg.url):
            path = sqlite_path(self.cfg.url)
            queued = await asyncio.to_thread(_queue_sqlite, path, queue, mail, self.cfg.busy_timeout)
            if queued:
                from relay.engines import sqlite_wake

                sqlite_wake.poke(path, [queue])
            return queued
        if engine is None:
            raise OSError("a RabbitMQ broker needs its engine to ingest into")
        if engine is not self._declared:
            # A fleet member may run no relay: declare outbound (idempotent) as sendmail does.
            await engine.declare(outbound_topology(self.cfg.prefix))
            self._declared = engine
        ledger = os.path.join(self.parent, "ingested.db")
        if await asyncio.to_thread(_seen, ledger, mail.message_id):
            return False
        await engine.send(queue, to_message(mail))
        await asyncio.to_thread(_record, ledger, mail.message_id)
        return True

    # -- refusals and leftovers ---------------------------------------------------------------

    def _reject(self, folder: int, name: str, why: str, report: IngestReport) -> None:
        """Out of the way, unread; a person can look at it in rejected/."""
        rejected = os.open(self.rejected, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            target = base = f"{int(time.time())}-{name[:120]}"
            for n in range(1, 100):  # never over an earlier refusal of the same name
                try:
                    os.lstat(target, dir_fd=rejected)
                except FileNotFoundError:
                    break
                target = f"{base}.{n}"
            os.rename(name, target, src_dir_fd=folder, dst_dir_fd=rejected)
        except OSError as exc:
            log.error("maildrop: %s refused (%s) and could not be moved away: %s", name, why, exc.strerror or exc)
            return
        finally:
            os.close(rejected)
        report.rejected.append((name, why))
        log.error("maildrop: %r refused, moved to %s: %s", name, self.rejected, why)

    def _stale(self, folder: int, name: str, report: IngestReport) -> None:
        with contextlib.suppress(OSError):
            if time.time() - os.lstat(name, dir_fd=folder).st_mtime > STALE_TMP:
                os.unlink(name, dir_fd=folder)
                report.removed_tmp.append(name)
                log.warning("maildrop: removed %s, abandoned mid-write over a day ago", name)


class _Refused(Exception):
    """Why a file is not a drop we may read."""


_LEDGER = "CREATE TABLE IF NOT EXISTS maildrop_ingested (id TEXT PRIMARY KEY, at INTEGER NOT NULL)"
# Ids older than this are forgotten: a drop that old cannot still be waiting to be unlinked.
_FORGET_MS = 30 * 86400 * 1000


def _queue_sqlite(path: str, queue: str, mail: OutboundMail, busy_timeout: float) -> bool:
    """The mail and its id in one transaction of the queue file: exactly once, even across a crash."""
    message = to_message(mail)
    conn = sqlite_rows.connect(path, busy_timeout)
    try:
        with sqlite_rows.immediate(conn):
            conn.execute(_LEDGER)
            if conn.execute("SELECT 1 FROM maildrop_ingested WHERE id = ?", (mail.message_id,)).fetchone():
                return False
            now = sqlite_rows.now_ms()
            conn.execute("DELETE FROM maildrop_ingested WHERE at < ?", (now - _FORGET_MS,))
            conn.execute("INSERT INTO maildrop_ingested VALUES (?, ?)", (mail.message_id, now))
            sqlite_rows.enqueue_in(conn, queue, message.body, message.message_id, CONTENT_TYPE, message.headers)
        return True
    finally:
        conn.close()


def _seen(path: str, mail_id: str) -> bool:
    conn = sqlite_rows.connect(path, 15.0)
    try:
        conn.execute(_LEDGER)
        return conn.execute("SELECT 1 FROM maildrop_ingested WHERE id = ?", (mail_id,)).fetchone() is not None
    finally:
        conn.close()


def _record(path: str, mail_id: str) -> None:
    conn = sqlite_rows.connect(path, 15.0)
    try:
        with sqlite_rows.immediate(conn):
            conn.execute(_LEDGER)
            now = sqlite_rows.now_ms()
            conn.execute("DELETE FROM maildrop_ingested WHERE at < ?", (now - _FORGET_MS,))
            conn.execute("INSERT OR IGNORE INTO maildrop_ingested VALUES (?, ?)", (mail_id, now))
    finally:
        conn.close()



async def watch(maildrop: Maildrop, engine: Engine | None, stop: asyncio.Event, *, interval: float = 5.0) -> None:
    """Ingest at start, whenever ``opsrelay-sendmail`` pokes ``.wake``, and every ``interval`` seconds."""
    poked = asyncio.Event()
    path = os.path.join(maildrop.folder, WAKE_SOCKET)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    loop = asyncio.get_running_loop()
    bound, ours = False, 0
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # ours from before, or a user's squatter: the folder is root's
        sock.bind(path)
        ours = os.lstat(path).st_ino
        # Every user may poke (a datagram socket has nothing to read): S103 is what is meant here.
        os.chmod(path, 0o666)  # noqa: S103
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), _drain, sock, poked)
        bound = True
    except OSError as exc:
        log.warning("maildrop: cannot bind %s (%s); ingesting every %gs only", path, exc.strerror or exc, interval)
    try:
        while not stop.is_set():
            poked.clear()
            try:
                await maildrop.ingest(engine)
            except (OSError, RelayError) as exc:
                # The files stay; the next pass (a poke, or the timer) tries again.
                log.error("maildrop: ingest of %s failed: %s", maildrop.folder,
                          exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
            waits = [asyncio.create_task(poked.wait()), asyncio.create_task(stop.wait())]
            await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
    finally:
        if bound:
            loop.remove_reader(sock.fileno())
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == ours:  # another ingester may have bound it since
                    os.unlink(path)
        sock.close()


def _drain(sock: _socket.socket, poked: asyncio.Event) -> None:
    """Read every waiting poke (they say nothing but "look") and wake the loop once."""
    while True:
        try:
            sock.recv(64)
        except OSError:
            break
    poked.set()


@contextlib.contextmanager
def in_background(source: str, url: str, options: Mapping[str, Any]) -> Iterator[None]:
    """Ingest in a thread of its own while the block runs (``opsrelay listen`` as root), so a fleet
    member that runs only the listener still sends its users' mail."""
    import threading

    maildrop = for_relay(source)
    if maildrop is None:
        yield
        return
    ready: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    started = threading.Event()

    async def main() -> None:
        from relay.engines import open_engine

        stop = asyncio.Event()
        ready.append((asyncio.get_running_loop(), stop))
        started.set()
        engine = None if is_sqlite(url) else open_engine(url, **options)
        try:
            if engine is not None:
                await engine.connect()
            await watch(maildrop, engine, stop)
        except Exception as exc:  # the listener goes on; the relay or opsrelay maildrop ingests too
            log.error("maildrop: the listener's ingest stopped: %s", exc)
        finally:
            if engine is not None:
                await engine.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="opsrelay-maildrop", daemon=True)
    thread.start()
    started.wait(5.0)
    try:
        yield
    finally:
        if ready:
            loop, stop = ready[0]
            loop.call_soon_threadsafe(stop.set)
        thread.join(10.0)
