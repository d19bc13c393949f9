"""Runtime files of live engines, in ``<db>.run/`` next to the database (mode 0700).

Wake-ups: a consuming engine binds a unix datagram socket ``<token>.sock``.
After a commit that makes messages ready, the committing engine sends one
datagram to every socket there, naming the queues (``*``: everyone re-check,
e.g. a TTL due time changed). Sends never block and never fail a publish: a
full receive buffer means that consumer is awake anyway, and ECONNREFUSED means
its process died, so its file is removed. A missed poke costs at most the
consumer's fallback timer.

Liveness: an engine that leases messages holds ``flock(LOCK_EX)`` on
``<token>.lock`` for its lifetime. The kernel drops the lock when the process
dies, kill -9 included, so whoever can take the lock knows the owner is gone
and may return its leases. Unlike a pid, a lock cannot be confused with a
reused pid or a process of another container. (A child forked without exec
shares the lock until it exits; the descriptor is close-on-exec.) Deleting
``<db>.run/`` under live engines makes their leases look abandoned.
"""

from __future__ import annotations

# _socket, the C module that socket wraps: the wrapper's enums cost the sendmail path ~4 ms
# (python -X importtime) and we use nothing of it but the socket type.
import _socket
import contextlib
import fcntl
import os
from collections.abc import Iterable

__all__ = ["Poker", "RunDir", "WakeSocket", "poke", "run_dir"]

WAKE_ALL = "*"
# sun_path holds 108 bytes on Linux and 104 on the BSDs, NUL included.
_SUN_PATH_MAX = 100
_MAX_PAYLOAD = 2048


class RunDir:
    """The runtime directory, held open so long paths and renames cannot bite."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def address(self, name: str) -> str:
        full = os.path.join(self.path, name)
        if len(os.fsencode(full)) <= _SUN_PATH_MAX:
            return full
        # A deep path does not fit in sun_path; Linux resolves one through our open directory.
        return f"/proc/self/fd/{self.fd}/{name}"

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def hold(self, token: str) -> int:
        """Take this engine's liveness lock; the returned fd must stay open while we hold leases."""
        # 0644: an empty file whose lock is the message; another user's engine (root running
        # `opsrelay queue` beside a relay with its own user) must be able to test it.
        fd = os.open(f"{token}.lock", os.O_RDONLY | os.O_CREAT, 0o644, dir_fd=self.fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def try_hold(self, name: str) -> int | None:
        """Take the lock ``name`` without waiting; None while another process holds it.

        The file is never removed: unlinking a lock file another process is about to
        open would let two processes each hold "the" lock.
        """
        fd = os.open(f"{name}.lock", os.O_RDONLY | os.O_CREAT, 0o644, dir_fd=self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def let_go(self, token: str, fd: int) -> None:
        """Give up the liveness lock, after our leases were returned."""
        self.unlink(f"{token}.lock")
        os.close(fd)

    def is_gone(self, token: str) -> bool:
        """True when the engine ``token`` no longer runs (its lock is free or removed)."""
        try:
            fd = os.open(f"{token}.lock", os.O_RDONLY, dir_fd=self.fd)
        except FileNotFoundError:
            return True
        except PermissionError:
            return False  # not ours to judge: treat as alive rather than steal its leases
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            self.unlink(f"{token}.lock")
            return True
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self.fd)


class WakeSocket:
    """The datagram socket one engine listens on for pokes."""

    def __init__(self, run: RunDir, token: str) -> None:
        self._run = run
        self._name = f"{token}.sock"
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        try:
            self._sock.bind(run.address(self._name))
        except OSError:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> set[str]:
        """Queue names from every waiting datagram (``*`` among them means all)."""
        names: set[str] = set()
        while True:
            try:
                data = self._sock.recv(_MAX_PAYLOAD + 16)
            except (BlockingIOError, InterruptedError):
                return names
            names.update(data.decode("utf-8", "replace").split("\n"))

    def close(self) -> None:
        self._run.unlink(self._name)
        self._sock.close()


class Poker:
    """Sends wake-ups to every consumer's socket; used from the engine's worker thread only."""

    def __init__(self, run: RunDir) -> None:
        self._run = run
        self._sock: _socket.socket | None = None

    def poke(self, queues: Iterable[str]) -> int:
        """Wake every consumer for ``queues``; returns how many sockets took the datagram."""
        names = sorted(set(queues))
        if not names:
            return 0
        payload = "\n".join(names).encode("utf-8")
        if len(payload) > _MAX_PAYLOAD:
            payload = WAKE_ALL.encode()
        try:
            entries = os.listdir(self._run.fd)
            if self._sock is None:
                self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
                self._sock.setblocking(False)
        except OSError:
            return 0  # best effort: consumers fall back to their timer
        poked = 0
        for name in entries:
            if not name.endswith(".sock"):
                continue
            try:
                self._sock.sendto(payload, self._run.address(name))
                poked += 1
            except ConnectionRefusedError:
                # Nobody is bound: its process died (another user's file may not be ours to remove).
                with contextlib.suppress(OSError):
                    self._run.unlink(name)
            except OSError:
                pass  # full buffer (the consumer is awake anyway) or gone meanwhile
        return poked

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def run_dir(db_path: str) -> str:
    """Where the live engines of the queue file ``db_path`` keep their sockets and locks."""
    return os.path.realpath(db_path) + ".run"


def poke(db_path: str, queues: Iterable[str]) -> int:
    """One wake-up from a process that consumes nothing (``opsrelay-sendmail``); best effort.

    Returns the sockets poked: 0 when no engine of this file is running.
    """
    try:
        run = RunDir(run_dir(db_path), create=False)
    except OSError:
        return 0
    poker = Poker(run)
    try:
        return poker.poke(queues)
    finally:
        poker.close()
        run.close()
