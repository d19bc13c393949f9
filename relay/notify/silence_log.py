"""The silences as the broker keeps them: a log of add and expire records in ``<prefix>.silences``.

Any host that reaches the broker adds or expires a silence by publishing a record (confirmed
durable), so every relay of a fleet honours it on the next event it handles, and it survives
restarts. Readers take the whole log at once (:meth:`~relay.engines.base.Engine.read_all`) and
fold it (:func:`relay.notify.silence.fold`); records of silences that ended more than
:data:`KEEP_ENDED` ago are dropped by the relay now and then.
"""

from __future__ import annotations

import asyncio
import logging
import time

from relay.contract.message import Message
from relay.contract.names import silences_queue
from relay.contract.topology import silence_topology
from relay.engines.base import Engine
from relay.errors import ConfigurationError, MessageDecodeError
from relay.notify.silence import Silence, decode_record, encode_add, encode_expire, fold

__all__ = ["KEEP_ENDED", "SilenceView", "add_silence", "expire_silence", "read_silences"]

log = logging.getLogger("opsrelay.relay")
# `silence list` shows ended silences this long; then their records go.
KEEP_ENDED = 7 * 24 * 3600.0
_CONTENT_TYPE = "application/vnd.opsrelay.silence+json"


async def add_silence(engine: Engine, prefix: str, silence: Silence) -> None:
    await engine.declare(silence_topology(prefix))
    await engine.send(silences_queue(prefix), Message(encode_add(silence), f"silence-{silence.id}", _CONTENT_TYPE))


async def expire_silence(engine: Engine, prefix: str, silence_id: str, now: float) -> Silence:
    """End the silence now; ConfigurationError when there is no such silence or it already ended."""
    found = (await read_silences(engine, prefix)).get(silence_id)
    if found is None:
        raise ConfigurationError(f"no silence {silence_id!r} (opsrelay silence list)")
    if found.ends <= now:
        raise ConfigurationError(f"silence {silence_id} already ended")
    await engine.send(silences_queue(prefix), Message(encode_expire(silence_id, now), f"expire-{silence_id}",
                                                      _CONTENT_TYPE))
    return found


async def read_silences(engine: Engine, prefix: str, *, tidy: bool = False) -> dict[str, Silence]:
    """Every silence by id (ended ones too). ``tidy`` drops the records of long-ended silences and
    records that cannot be read (with a log line), instead of skipping them."""
    now = time.time()

    def old(message: Message) -> bool:
        try:
            record = decode_record(message.body)
        except MessageDecodeError as exc:
            log.error("relay: %s: dropped a record that cannot be read: %s", silences_queue(prefix), exc)
            return True
        when = record.silence.ends if record.silence is not None else record.at
        return when is not None and when + KEEP_ENDED < now

    try:
        messages = await engine.read_all(silences_queue(prefix), drop=old if tidy else None)
    except ConfigurationError:
        return {}  # never declared: no silence was ever added
    records = []
    for message in messages:
        try:
            records.append(decode_record(message.body))
        except MessageDecodeError:
            continue  # said once when tidied
    return fold(records)


class SilenceView:
    """The silences as of no earlier than the call: concurrent callers share one read.

    An event handled after ``silence add`` returned sees that silence (the read it waits for
    began after it was asked for), and a burst of events costs one read, not one each.
    """

    def __init__(self, engine: Engine, prefix: str) -> None:
        self.engine = engine
        self.prefix = prefix
        self._task: asyncio.Task[dict[str, Silence]] | None = None
        self._started = -1.0

    async def current(self) -> dict[str, Silence]:
        asked = time.monotonic()
        while True:
            task = self._task
            if task is not None and self._started >= asked:
                return await asyncio.shield(task)
            if task is not None and not task.done():
                await asyncio.wait([task])  # began before we asked: the next read is ours
                continue
            self._started = time.monotonic()
            self._task = asyncio.create_task(read_silences(self.engine, self.prefix))
