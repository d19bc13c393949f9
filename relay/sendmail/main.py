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

from relay.config.rules import DEFAULT_MAX_SIZE
from relay.errors import ConfigUnreadable, ConfigurationError, RelayError
from relay.sendmail.args import LIST_QUEUE, UsageError, parse_argv
from relay.sendmail.compose import SubmissionError, compose, sender_of, user_of
from relay.sendmail.exits import EX_CONFIG, EX_DATAERR, EX_OK, EX_TEMPFAIL, EX_USAGE, reason
from relay.sendmail.prep import MessageError, read_message

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import BinaryIO, TextIO

    from relay.config.fast import FastConfig
    from relay.sendmail.args import Invocation

    Say = Callable[[str], None]

__all__ = ["main", "run"]


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

    environ = os.environ if env is None else env
    cfg: FastConfig | None = None
    try:
        cfg = fastconfig.load(environ)
        maildrop = cfg.maildrop
    except ConfigUnreadable:
        if invocation.mode == LIST_QUEUE:
            say("the queue is not yours to list (the config cannot be read)")
            return EX_CONFIG
        maildrop = fastconfig.maildrop_of(environ)
    except ConfigurationError as exc:
        say(f"config error: {exc}")
        return EX_CONFIG
    if invocation.mode == LIST_QUEUE and cfg is not None:
        from relay.sendmail.mailq import list_queue

        return list_queue(cfg, sys.stdout, say)
    try:
        return _submit(invocation, cfg, maildrop, stdin, say)
    except SubmissionError as exc:
        say(str(exc))
        return exc.code
    except KeyboardInterrupt:
        say("interrupted; nothing was queued")
        return EX_TEMPFAIL


def _submit(invocation: Invocation, cfg: FastConfig | None, maildrop: str, stdin: BinaryIO | None,
            say: Say) -> int:
    import time

    from relay.contract.envelope import new_mail_id

    uid = os.getuid()
    user, gecos = user_of(uid)
    sender = sender_of(invocation.sender, user, cfg) if cfg is not None else ""
    try:
        # sys.stdin.buffer is a BufferedReader: read1 returns what is there, so "." can end the input.
        data = read_message(stdin, dot_ends=invocation.dot_ends,  # type: ignore[arg-type]
                            max_size=cfg.max_size if cfg is not None else DEFAULT_MAX_SIZE) if stdin else b""
    except OSError as exc:
        raise SubmissionError(EX_TEMPFAIL, f"cannot read the message: {exc.strerror or exc}") from None
    except MessageError as exc:
        raise SubmissionError(EX_DATAERR, str(exc)) from None
    now = time.time()
    message_id = new_mail_id()
    if cfg is None:
        # The config is not ours to read (it holds the relay's secrets): the relay applies it on ingest.
        return _drop(invocation, uid, data, now, message_id, maildrop, say)
    composed = compose(data, sender=sender, user=user, gecos=gecos, full_name=invocation.full_name,
                       recipients=invocation.recipients, from_headers=invocation.from_headers, cfg=cfg, now=now,
                       unique=f"{os.getpid()}.{os.urandom(5).hex()}")
    if cfg.mode == "direct":
        from relay.sendmail.direct import deliver_now

        return deliver_now(composed.sender, composed.recipients, composed.raw, message_id, say,
                           verbose=invocation.verbose)
    from relay.sendmail.outbound import queue_mail

    try:
        queue, poked = queue_mail(cfg, composed.sender, composed.recipients, composed.raw, message_id)
    except ConfigurationError as exc:
        raise SubmissionError(EX_CONFIG, f"config error: {exc}") from None
    except PermissionError:
        # The queue is root's: leave the submission in the maildrop, for the relay to ingest.
        return _drop(invocation, uid, data, now, message_id, cfg.maildrop, say)
    except (OSError, RelayError) as exc:
        raise SubmissionError(EX_TEMPFAIL, f"cannot queue the mail ({reason(exc)}); nothing was queued") from None
    if invocation.verbose:
        say(f"queued {message_id} ({len(composed.raw)} bytes) from <{composed.sender}> to "
            f"{', '.join(composed.recipients)} in {queue}"
            + (f"; relay woken ({poked})" if poked else "; no relay is listening right now"))
    return EX_OK


def _drop(invocation: Invocation, uid: int, data: bytes, now: float, message_id: str, maildrop: str,
          say: Say) -> int:
    from relay.contract.maildrop import Drop
    from relay.maildrop.drop import poke_ingest, write_drop

    drop = Drop(uid=uid, recipients=invocation.recipients, from_headers=invocation.from_headers,
                sender=invocation.sender, full_name=invocation.full_name, submitted=now, message=data)
    try:
        write_drop(maildrop, message_id, drop)
    except OSError as exc:
        raise SubmissionError(EX_TEMPFAIL, f"cannot leave the mail in the maildrop {maildrop} ({reason(exc)}); "
                              "nothing was queued") from None
    woken = poke_ingest(maildrop)
    if invocation.verbose:
        say(f"left {message_id} ({len(data)} bytes) in the maildrop {maildrop} for the relay"
            + ("; relay woken" if woken else "; no relay is listening right now"))
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The console script (and a symlink named sendmail or mailq to it)."""
    return run(sys.argv if argv is None else argv, sys.stdin.buffer if sys.stdin else None, sys.stderr)
