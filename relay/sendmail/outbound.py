"""Put a submission on the outbound queue: the embedded queue's fast path, or through the engine.

On the embedded queue the row is written by :mod:`relay.engines.sqlite_rows` (the one writer
of the file's rows) with the headers of :mod:`relay.contract.envelope`, in one transaction
that is fsynced before we return; then the relay's consumers are poked
(:func:`relay.engines.sqlite_wake.poke`) so delivery starts within milliseconds. Nothing here
imports an engine until the broker is RabbitMQ.
"""

from __future__ import annotations

from relay.contract.envelope import CONTENT_TYPE, mail_headers
from relay.contract.names import outbound_queue
from relay.contract.urls import is_sqlite, sqlite_path
from relay.errors import BrokerUnavailable, ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from relay.config.fast import FastConfig
    from relay.contract.message import HeaderValue

__all__ = ["LOCK_WAIT", "queue_mail", "quiet_logging", "write_row"]

# Seconds a submission waits for the queue's write lock: longer than a publisher's confirm
# bound, since a burst of cron mail at the top of the hour is better queued a little late
# than refused with 75.
LOCK_WAIT = 15.0
ORIGIN = "sendmail"


def queue_mail(cfg: FastConfig, sender: str, recipients: Sequence[str], raw: bytes,
               message_id: str) -> tuple[str, int]:
    """Queue durably; returns the queue and how many relays were woken. RelayError or OSError otherwise."""
    queue = outbound_queue(cfg.prefix)
    if not is_sqlite(cfg.url):
        _through_engine(cfg, sender, recipients, raw, message_id)
        return queue, 0
    try:
        path = sqlite_path(cfg.url)
    except ValueError as exc:
        raise ConfigError(str(exc), key="broker.url") from None
    write_row(path, queue, raw, message_id, mail_headers(sender, recipients, origin=ORIGIN),
               max(cfg.busy_timeout, LOCK_WAIT))
    from relay.engines import sqlite_wake

    try:
        return queue, sqlite_wake.poke(path, [queue])
    except KeyboardInterrupt:  # queued already: only the wake-up is lost (the relay's timer finds it)
        return queue, 0


def write_row(path: str, queue: str, raw: bytes, message_id: str, headers: Mapping[str, HeaderValue],
              busy_timeout: float) -> None:
    """One mail row in the queue file at ``path``, fsynced; BrokerUnavailable when the file refuses it."""
    from relay.engines import sqlite_rows

    try:
        conn = sqlite_rows.connect(path, busy_timeout)
        try:
            sqlite_rows.enqueue(conn, queue, raw, message_id, CONTENT_TYPE, headers)
        finally:
            conn.close()
    except sqlite_rows.Error as exc:
        raise BrokerUnavailable(str(exc)) from None


def quiet_logging() -> None:
    """Our one line is the report: keep library and relay log records (aiormq's connection
    errors, the relay's delivery lines) from Python's last-resort stderr handler."""
    import logging

    logging.getLogger().addHandler(logging.NullHandler())


def _through_engine(cfg: FastConfig, sender: str, recipients: Sequence[str], raw: bytes, message_id: str) -> None:
    """RabbitMQ: publisher confirms, persistent, durable queue (declared as the relay declares it)."""
    import asyncio

    from relay.contract.mail import OutboundMail
    from relay.ops.submit import submit

    quiet_logging()
    mail = OutboundMail(sender=sender, recipients=tuple(recipients), raw=raw, message_id=message_id, origin=ORIGIN)
    asyncio.run(submit(cfg.url, cfg.prefix, mail, options=cfg.engine_options))
