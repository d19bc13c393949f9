"""Write one submission into the maildrop: ``O_EXCL``, 0600, a temporary name, fsync, rename, fsync
the folder, then poke the relay. Standard library only: ``opsrelay-sendmail`` runs this.

A failure at any step leaves no file behind (the temporary one is removed) and raises OSError,
so the caller exits 75 with the message still in hand.
"""

from __future__ import annotations

import os
import stat

from relay.contract.maildrop import TMP_SUFFIX, Drop, encode_drop

__all__ = ["WAKE_SOCKET", "MaildropError", "poke_ingest", "write_drop"]

# The relay's datagram socket in the maildrop: a poke makes it ingest at once.
WAKE_SOCKET = ".wake"


class MaildropError(OSError):
    """The maildrop is not one we may write to (missing, not root's, not mode 1733)."""


def _check_folder(fd: int, path: str) -> None:
    """Root's (or ours), sticky, not listable by others: else another user could read or swap our file."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, os.geteuid()):
        raise MaildropError(f"maildrop {path} is not a folder owned by root")
    if st.st_uid != os.geteuid() and (not st.st_mode & stat.S_ISVTX or st.st_mode & 0o044):
        raise MaildropError(f"maildrop {path} is not mode 1733 (sticky, not listable)")


def write_drop(folder: str, name: str, drop: Drop) -> None:
    """``folder/name`` holds ``drop`` completely and durably on return; OSError and no file otherwise.

    The folder is opened with O_PATH: mode 1733 lets others create and rename in it, not read it.
    Its fsync needs read access, so a user who has none relies on the file's own fsync and on the
    filesystem to keep the rename (ext4 and xfs commit a rename over a fsynced file in order).
    """
    dir_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        _check_folder(dir_fd, folder)
        tmp = name + TMP_SUFFIX
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            data = memoryview(encode_drop(drop))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _remove(tmp, dir_fd)
            raise
        os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            _remove(tmp, dir_fd)
            raise
        _sync_folder(folder)
    finally:
        os.close(dir_fd)


def _sync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        return  # not listable by us (1733): see write_drop
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(name: str, dir_fd: int) -> None:
    try:  # noqa: SIM105 - contextlib is not imported on this path
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def poke_ingest(folder: str) -> bool:
    """Tell a relay that ingests ``folder`` to look now (best effort; it also looks every few seconds)."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.sendto(b"ingest", os.path.join(folder, WAKE_SOCKET))
        return True
    except OSError:
        return False
    finally:
        sock.close()
