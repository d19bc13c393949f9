"""``opsrelay-sendmail -bp`` / ``mailq``: what waits for delivery, one mail per entry, as sendmail lists it."""

from __future__ import annotations

import os
import time
from typing import TextIO

from relay.config.fast import FastConfig
from relay.contract.envelope import held_fault, read_history, read_recipients
from relay.contract.names import RETRY_INFIX, dead_queue, outbound_queue
from relay.contract.urls import is_sqlite, mask_url, sqlite_path
from relay.errors import MessageDecodeError, RelayError
from relay.sendmail.exits import EX_OK, EX_TEMPFAIL, reason
from relay.sendmail.outbound import quiet_logging

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from relay.contract.message import Message

__all__ = ["list_queue"]


def list_queue(cfg: FastConfig, out: TextIO, say: Callable[[str], None]) -> int:
    """Outbound and retry queues; on the embedded queue each mail, with its state."""
    if not is_sqlite(cfg.url):
        return _list_engine(cfg, out, say)
    import sqlite3

    from relay.engines.sqlite_store import waiting

    path = sqlite_path(cfg.url)
    if not os.path.exists(path):
        out.write("Mail queue is empty\n")
        return EX_OK
    retry = f"{cfg.prefix}{RETRY_INFIX}"
    try:
        conn = sqlite3.connect(path, timeout=cfg.busy_timeout)
        try:
            rows = waiting(conn, [outbound_queue(cfg.prefix)], retry)
            dead = len(waiting(conn, [dead_queue(cfg.prefix)]))
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        say(f"cannot read the queue {path}: {reason(exc)}")
        return EX_TEMPFAIL
    now = time.time()
    for queue, message, leased, expires in rows:
        out.write(f"{message.message_id}  {len(message.body)} bytes  <{message.headers.get('x-sender', '')}>  "
                  f"{_state(message, queue.startswith(retry), leased, expires, now)}\n")
        out.write(f"        -> {', '.join(_recipients(message))}\n")
    out.write(f"{len(rows)} mail(s) waiting in {path}\n" if rows else "Mail queue is empty\n")
    if dead:
        out.write(f"{dead} dead letter(s): opsrelay dlq list\n")
    return EX_OK


def _state(message: Message, retrying: bool, leased: bool, expires: int | None, now: float) -> str:
    if leased:
        return "being delivered"
    if not retrying:
        return "waiting"
    wait = max(0, round((expires or 0) / 1000 - now))
    try:
        last = read_history(message.headers)[-1:] or (("", "", ()),)
    except MessageDecodeError:
        last = (("", "", ()),)
    held = "held" if held_fault(message.headers) else "retry"
    return f"{held} in {wait}s (attempt {message.headers.get('x-attempts')}: {last[0][1]})"


def _recipients(message: Message) -> tuple[str, ...]:
    try:
        return read_recipients(message.headers)
    except MessageDecodeError:
        return ()


def _list_engine(cfg: FastConfig, out: TextIO, say: Callable[[str], None]) -> int:
    import asyncio

    from relay.engines import open_engine

    quiet_logging()

    async def depth() -> int:
        async with open_engine(cfg.url, **cfg.engine_options) as engine:
            return await engine.depth(outbound_queue(cfg.prefix))

    try:
        waiting = asyncio.run(depth())
    except RelayError as exc:
        say(f"cannot read the queue: {exc}")
        return EX_TEMPFAIL
    out.write(f"{waiting} mail(s) waiting in {outbound_queue(cfg.prefix)} on {mask_url(cfg.url)} "
              "(retries and dead letters: opsrelay queue)\n" if waiting else "Mail queue is empty\n")
    return EX_OK
