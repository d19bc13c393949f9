"""Silences in the running relay: events they match wait in ``<prefix>.silenced``; when one ends,
the relay that owns ``<prefix>.silences.owner`` mails one summary per subscription.

Ownership is a stateful subscription's (:class:`~relay.notify.keeper.StateKeeper` on a
single-active queue): one relay of a fleet at a time summarizes, the others stand by and take
over when it goes. The owner looks at the silences every :data:`POLL` seconds and reads the
silenced events only when a silence has ended (or every :data:`SWEEP` seconds while some wait),
queues the summaries, then removes their events: a crash in between sends a summary again, with
the same Message-ID. Records of long-ended silences are tidied once an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from relay.contract.event import decode_event
from relay.contract.message import Message
from relay.contract.names import silence_owner_queue, silenced_queue
from relay.errors import ConfigurationError, MessageDecodeError
from relay.notify.keeper import StateKeeper
from relay.notify.silence import Silence, read_silenced, summary_notice
from relay.notify.silence_log import read_silences

if TYPE_CHECKING:
    from relay.contract.event import Event
    from relay.daemon.relay import Relay

__all__ = ["POLL", "SWEEP", "SilenceOwner"]

log = logging.getLogger("opsrelay.relay")
POLL, SWEEP, TIDY = 2.0, 60.0, 3600.0


class SilenceOwner:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.queue = silenced_queue(relay.prefix)
        self._summarized: set[str] = set()
        self._swept = self._tidied = -float("inf")

    async def run(self) -> None:
        relay = self.relay
        keeper = StateKeeper(relay.engine, silence_owner_queue(relay.prefix))
        keeping = asyncio.create_task(keeper.run(), name="silences-owner")
        loaded = asyncio.create_task(keeper.loaded.wait())
        try:
            done, _ = await asyncio.wait([keeping, loaded], return_when=asyncio.FIRST_COMPLETED)
            if loaded not in done:
                keeping.result()
                return
            log.info("relay: this relay sends the summaries of silences that end")
            while not relay.stop_requested.is_set():
                await self.turn(time.time())
                if keeper.stale():
                    await keeper.save()  # RabbitMQ's consumer_timeout: the held copy is renewed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(relay.stop_requested.wait(), POLL)
        finally:
            loaded.cancel()
            keeping.cancel()
            await asyncio.gather(keeping, loaded, return_exceptions=True)

    async def turn(self, now: float) -> None:
        """Summarize the silences that ended since the last turn (all of them after a takeover)."""
        relay = self.relay
        tidy = time.monotonic() - self._tidied >= TIDY
        silences = await read_silences(relay.engine, relay.prefix, tidy=tidy)
        if tidy:
            self._tidied = time.monotonic()
        ended = {sid for sid, s in silences.items() if s.ends <= now}
        new_ends = ended - self._summarized
        if not new_ends and time.monotonic() - self._swept < SWEEP:
            return
        self._swept = time.monotonic()
        try:
            if not new_ends and not await relay.engine.depth(self.queue):
                return  # a sweep, and nothing waits
            await self._summarize(silences, now)
        except ConfigurationError:
            return  # not declared yet
        self._summarized |= ended

    async def _summarize(self, silences: Mapping[str, Silence], now: float) -> None:
        relay = self.relay
        groups: dict[tuple[str, str], list[Message]] = {}
        for message in await relay.engine.read_all(self.queue):
            key = read_silenced(message.headers)
            if key is None:
                continue  # dropped below
            silence = silences.get(key[0])
            if silence is None or silence.ends <= now:
                groups.setdefault(key, []).append(message)
        subscriptions = {sub.name: sub for sub in relay.config.subscriptions}
        done: set[tuple[str, str, str]] = set()
        for (sid, name), messages in groups.items():
            silence = silences.get(sid)
            events: list[Event] = []
            for message in messages:
                with contextlib.suppress(MessageDecodeError):  # the relay decoded it before silencing it
                    events.append(decode_event(message.body))
            sub = subscriptions.get(name)
            quiet = silence is not None and silence.quiet_summary
            if sub is None:
                log.warning("relay: silence %s: %d event(s) of subscription %s, which is gone, dropped",
                            sid, len(messages), name)
            elif events and not quiet:
                await relay.queue_or_dead_letter(sub, summary_notice(sid, silence, name, events, now))
            log.info("relay: silence %s ended: %s: %d event(s) it held %s", sid, name, len(events),
                     "not summarized (--quiet-summary)" if quiet else "summarized")
            done |= {(m.message_id, sid, name) for m in messages}

        def summarized(message: Message) -> bool:
            key = read_silenced(message.headers)
            return key is None or (message.message_id, *key) in done

        await relay.engine.read_all(self.queue, drop=summarized)
