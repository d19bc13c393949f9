"""A submission made into a mail: envelope sender, recipients, the prepared message.

The one place where sendmail's rules apply (``-f`` and ``[sendmail.senders]``, aliases and the
qualification of local names, ``-t``, From/Date/Message-ID): the queue path runs it at once,
and the relay runs it again when it ingests a maildrop file, for the user who submitted it.
Standard library only.
"""

from __future__ import annotations

import os

from relay.sendmail.addresses import AddressError, envelope_sender, parse_address_list, qualify, resolve_recipient
from relay.sendmail.exits import EX_DATAERR, EX_USAGE
from relay.sendmail.prep import MessageError, prepare

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from relay.config.fast import FastConfig

__all__ = ["Composed", "SubmissionError", "compose", "sender_of", "user_of"]


class SubmissionError(Exception):
    """The submission cannot be queued: this exit code (sysexits.h) and one line."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Composed:
    __slots__ = ("raw", "recipients", "sender")

    def __init__(self, sender: str, recipients: tuple[str, ...], raw: bytes) -> None:
        self.sender, self.recipients, self.raw = sender, recipients, raw


def user_of(uid: int) -> tuple[str, str]:
    """The login name of ``uid`` and the first field of its GECOS (the full name)."""
    import pwd

    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        if uid == os.getuid():
            return os.environ.get("LOGNAME") or os.environ.get("USER") or str(uid), ""
        return str(uid), ""
    return entry.pw_name, entry.pw_gecos.split(",")[0]


def sender_of(flag: str | None, user: str, cfg: FastConfig, *, trusted: bool = True) -> str:
    """The envelope sender. An untrusted user's ``-f`` is not taken (sendmail's rule): theirs is used."""
    try:
        return envelope_sender(flag if trusted else None, user, cfg.senders, "" if not trusted else cfg.smtp_from,
                               cfg.domain)
    except AddressError as exc:
        raise SubmissionError(EX_USAGE, f"sender {exc}") from None


def _recipients(words: Sequence[str], found: Sequence[str], cfg: FastConfig, from_headers: bool) -> tuple[str, ...]:
    addresses: list[str] = []
    for word in words:
        try:
            addresses += parse_address_list(word)
        except AddressError as exc:
            raise SubmissionError(EX_USAGE, f"recipient {exc}") from None
    addresses += found
    resolved = dict.fromkeys(resolve_recipient(a, cfg.aliases, cfg.domain) for a in addresses)
    if not resolved:
        if from_headers:
            raise SubmissionError(EX_DATAERR, "no recipients: the message has no To, Cc or Bcc and none was named")
        raise SubmissionError(EX_USAGE, "no recipients: name them on the command line, or use -t to read To/Cc/Bcc")
    return tuple(resolved)


def compose(data: bytes, *, sender: str, user: str, gecos: str, full_name: str | None, recipients: Sequence[str],
            from_headers: bool, cfg: FastConfig, now: float, unique: str,
            refused_flag: str | None = None) -> Composed:
    """The mail for ``data`` as ``user`` submitted it. ``refused_flag``: a ``-f`` that was not taken,
    noted in an X-Authentication-Warning header as sendmail does."""
    from_address = sender or qualify(user, cfg.domain)
    try:
        prepared = prepare(data, from_address=from_address, full_name=full_name if full_name is not None else gecos,
                           extract_recipients=from_headers, from_line_override=cfg.from_line_override,
                           now=now, unique=unique, domain=from_address.rpartition("@")[2] or cfg.domain)
    except MessageError as exc:
        raise SubmissionError(EX_DATAERR, str(exc)) from None
    rcpts = _recipients(recipients, prepared.header_recipients, cfg, from_headers)
    raw = prepared.raw
    if refused_flag is not None:
        flag = " ".join(refused_flag.split())[:200]
        raw = f"X-Authentication-Warning: {cfg.host}: {user} set sender to {flag} using -f\r\n".encode() + raw
    return Composed(sender, rcpts, raw)
