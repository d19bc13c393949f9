"""``opsrelay-sendmail``: read one message on stdin, queue it durably, exit 0; the relay delivers it.

Also ``opsrelay sendmail``, any symlink named ``sendmail`` (or ``mailq``: the queue listing).
Exit codes are sysexits.h: 64 usage, 65 bad message, 75 temporary failure (nothing was
queued: the caller still has the message, e.g. cron logs it, mailx keeps dead.letter),
78 configuration.

The queue path is the one every cron job and alert pays for, so on the embedded engine it
imports the standard library and cheap modules of ours only (no pydantic, typer, aio-pika,
aiosmtplib, jinja2; see ``python -X importtime -m relay.sendmail``): the config's sendmail
view (:mod:`relay.config.fast`), the envelope headers (:mod:`relay.contract.envelope`), and the
queue file's own writer (:mod:`relay.engines.sqlite_rows`) and wake-up
(:mod:`relay.engines.sqlite_wake`); see :mod:`relay.sendmail.outbound`. An AMQP broker,
``sendmail.mode = "direct"`` and ``-bp`` take the slower paths through the engines.
"""

from __future__ import annotations

import os
import sys

from relay.errors import ConfigurationError, RelayError
from relay.sendmail.addresses import AddressError, envelope_sender, parse_address_list, qualify, resolve_recipient
from relay.sendmail.args import LIST_QUEUE, UsageError, parse_argv
from relay.sendmail.exits import EX_CONFIG, EX_DATAERR, EX_OK, EX_TEMPFAIL, EX_USAGE, reason
from relay.sendmail.prep import MessageError, prepare, read_message

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import BinaryIO, TextIO

    from relay.config.fast import FastConfig
    from relay.sendmail.args import Invocation

    Say = Callable[[str], None]

__all__ = ["main", "run"]


class _Fail(Exception):
    """Ends the run with this exit code and one line on stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _user() -> tuple[str, str]:
    """The invoking user's login name and the first field of its GECOS (the full name)."""
    import pwd

    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return os.environ.get("LOGNAME") or os.environ.get("USER") or str(os.getuid()), ""
    return entry.pw_name, entry.pw_gecos.split(",")[0]


def _recipients(words: Sequence[str], found: Sequence[str], cfg: FastConfig, from_headers: bool) -> tuple[str, ...]:
    addresses: list[str] = []
    for word in words:
        try:
            addresses += parse_address_list(word)
        except AddressError as exc:
            raise _Fail(EX_USAGE, f"recipient {exc}") from None
    addresses += found
    resolved = dict.fromkeys(resolve_recipient(a, cfg.aliases, cfg.domain) for a in addresses)
    if not resolved:
        if from_headers:
            raise _Fail(EX_DATAERR, "no recipients: the message has no To, Cc or Bcc and none was named")
        raise _Fail(EX_USAGE, "no recipients: name them on the command line, or use -t to read To/Cc/Bcc")
    return tuple(resolved)


def run(argv: Sequence[str], stdin: BinaryIO | None, stderr: TextIO,
        env: dict[str, str] | None = None) -> int:
    """One submission; returns the exit status. ``argv[0]`` decides sendmail or mailq."""
    prog = os.path.basename(argv[0]) if argv else "opsrelay-sendmail"

    def say(message: str) -> None:
        stderr.write(f"{prog}: {message}\n")
        stderr.flush()

    try:
        invocation = parse_argv(argv[1:], prog)
    except UsageError as exc:
        say(str(exc))
        return EX_USAGE
    from relay.config import fast as fastconfig

    try:
        cfg = fastconfig.load(os.environ if env is None else env)
    except ConfigurationError as exc:
        say(f"config error: {exc}")
        return EX_CONFIG
    if invocation.mode == LIST_QUEUE:
        from relay.sendmail.mailq import list_queue

        return list_queue(cfg, sys.stdout, say)
    try:
        return _submit(invocation, cfg, stdin, say)
    except _Fail as exc:
        say(str(exc))
        return exc.code
    except KeyboardInterrupt:
        say("interrupted; nothing was queued")
        return EX_TEMPFAIL


def _submit(invocation: Invocation, cfg: FastConfig, stdin: BinaryIO | None, say: Say) -> int:
    import time

    user, gecos = _user()
    try:
        sender = envelope_sender(invocation.sender, user, cfg.senders, cfg.smtp_from, cfg.domain)
    except AddressError as exc:
        raise _Fail(EX_USAGE, f"sender {exc}") from None
    try:
        # sys.stdin.buffer is a BufferedReader: read1 returns what is there, so "." can end the input.
        data = read_message(stdin, dot_ends=invocation.dot_ends, max_size=cfg.max_size) if stdin else b""  # type: ignore[arg-type]
    except OSError as exc:
        raise _Fail(EX_TEMPFAIL, f"cannot read the message: {exc.strerror or exc}") from None
    except MessageError as exc:
        raise _Fail(EX_DATAERR, str(exc)) from None
    from_address = sender or qualify(user, cfg.domain)
    now = time.time()
    try:
        prepared = prepare(data, from_address=from_address,
                           full_name=invocation.full_name if invocation.full_name is not None else gecos,
                           extract_recipients=invocation.from_headers, from_line_override=cfg.from_line_override,
                           now=now, unique=f"{os.getpid()}.{os.urandom(5).hex()}",
                           domain=from_address.rpartition("@")[2] or cfg.domain)
    except MessageError as exc:
        raise _Fail(EX_DATAERR, str(exc)) from None
    recipients = _recipients(invocation.recipients, prepared.header_recipients, cfg, invocation.from_headers)
    from relay.contract.envelope import new_mail_id

    message_id = new_mail_id()
    if cfg.mode == "direct":
        from relay.sendmail.direct import deliver_now

        return deliver_now(sender, recipients, prepared.raw, message_id, say, verbose=invocation.verbose)
    from relay.sendmail.outbound import queue_mail

    try:
        queue, poked = queue_mail(cfg, sender, recipients, prepared.raw, message_id)
    except ConfigurationError as exc:
        raise _Fail(EX_CONFIG, f"config error: {exc}") from None
    except (OSError, RelayError) as exc:
        raise _Fail(EX_TEMPFAIL, f"cannot queue the mail ({reason(exc)}); nothing was queued") from None
    if invocation.verbose:
        say(f"queued {message_id} ({len(prepared.raw)} bytes) from <{sender}> to {', '.join(recipients)} "
            f"in {queue}" + (f"; relay woken ({poked})" if poked else "; no relay is listening right now"))
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The console script (and a symlink named sendmail or mailq to it)."""
    return run(sys.argv if argv is None else argv, sys.stdin.buffer if sys.stdin else None, sys.stderr)
