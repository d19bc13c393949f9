"""A maildrop file: one submission of a user who cannot write the queue, as ``opsrelay-sendmail``
leaves it for the relay to ingest. Standard library only (the sendmail path writes it).

Format 1: a magic line, one line of JSON with the submission's metadata, then the message
exactly as it was read (after sendmail's ``.`` rule), unprepared: the relay applies the
config's rules for the submitting user when it ingests, as the queue path does at once.

``uid`` is the submitter's uid; the ingest trusts it only when it equals the file's owner,
which the kernel sets at creation and a user cannot forge. The file's name is the mail's id.
"""

from __future__ import annotations

import json

from relay.errors import MessageDecodeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["MAGIC", "TMP_SUFFIX", "Drop", "decode_drop", "encode_drop", "is_drop_name"]

MAGIC = b"opsrelay-maildrop 1\n"
# A drop being written; renamed to its id once complete and fsynced.
TMP_SUFFIX = ".tmp"
_ID_CHARS = frozenset("0123456789abcdef")


class Drop:
    """What a submission said: who, to whom, which of sendmail's flags, when, and the message."""

    __slots__ = ("from_headers", "full_name", "message", "recipients", "sender", "submitted", "uid")

    def __init__(self, *, uid: int, recipients: Sequence[str], from_headers: bool, sender: str | None,
                 full_name: str | None, submitted: float, message: bytes) -> None:
        self.uid = uid
        self.recipients = tuple(recipients)
        self.from_headers = from_headers  # -t
        self.sender = sender  # -f / -r, as given
        self.full_name = full_name  # -F
        self.submitted = submitted  # unix time
        self.message = message


def encode_drop(drop: Drop) -> bytes:
    meta = {"uid": drop.uid, "recipients": list(drop.recipients), "t": drop.from_headers, "f": drop.sender,
            "F": drop.full_name, "submitted": drop.submitted}
    return MAGIC + json.dumps(meta, ensure_ascii=True).encode("ascii") + b"\n" + drop.message


def decode_drop(data: bytes) -> Drop:
    """The drop in ``data``; MessageDecodeError for anything else (it is rejected, never mailed)."""
    if not data.startswith(MAGIC):
        raise MessageDecodeError("not an opsrelay maildrop file")
    line, newline, message = data[len(MAGIC):].partition(b"\n")
    try:
        meta: dict[str, Any] = json.loads(line) if newline else None  # type: ignore[assignment]
    except ValueError:
        meta = None  # type: ignore[assignment]
    if not isinstance(meta, dict):
        raise MessageDecodeError("maildrop file: no metadata line")
    uid, recipients, sender, name, submitted = (meta.get(k) for k in ("uid", "recipients", "f", "F", "submitted"))
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise MessageDecodeError("maildrop file: no uid")
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise MessageDecodeError("maildrop file: recipients are not a list of strings")
    if not (sender is None or isinstance(sender, str)) or not (name is None or isinstance(name, str)):
        raise MessageDecodeError("maildrop file: -f or -F is not a string")
    if not isinstance(submitted, int | float) or isinstance(submitted, bool):
        raise MessageDecodeError("maildrop file: no submission time")
    return Drop(uid=uid, recipients=recipients, from_headers=meta.get("t") is True, sender=sender,
                full_name=name, submitted=float(submitted), message=message)


def is_drop_name(name: str) -> bool:
    """A finished drop's name: the mail id (hex), not a temporary or hidden file."""
    return 16 <= len(name) <= 64 and set(name) <= _ID_CHARS
