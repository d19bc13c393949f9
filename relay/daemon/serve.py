"""``opsrelay serve``: run the relay until stopped, reconnecting to a broker that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from relay.config.models import Config
from relay.daemon.relay import Relay
from relay.delivery.outcome import Mailer
from relay.engines import open_engine
from relay.errors import BrokerUnavailable
from relay.maildrop.ingest import Maildrop
from relay.observe.health import Health
from relay.observe.observer import Observer
from relay.render.renderer import Renderer
from relay.timing import doubling

__all__ = ["serve_forever"]

log = logging.getLogger("opsrelay.relay")
# The first wait before connecting again; it doubles while the broker stays away.
RECONNECT_FIRST = 0.5


async def serve_forever(config: Config, mailer: Mailer, stop: asyncio.Event, *,
                        renderer: Renderer | None = None, max_delay: float = 30.0, grace: float = 30.0,
                        maildrop: Maildrop | None = None, observer: Observer | None = None) -> None:
    """Run the relay until ``stop``; a broker that is down or goes away is waited for with backoff.

    A lost connection ends the running :class:`Relay` (its unacked deliveries return to the
    broker), then a fresh engine is connected and the relay starts again.
    """
    renderer = renderer or Renderer(config)
    observer = observer or Observer()
    health = Health()  # outlives each connection: status and the alerts see across reconnects
    failures = 0
    while not stop.is_set():
        engine = open_engine(config.broker.url, **config.broker.engine_options)
        try:
            await engine.connect()
            failures = 0
            await Relay(config, engine, mailer, renderer=renderer, grace=grace, maildrop=maildrop,
                        observer=observer, health=health).run(stop)
        except BrokerUnavailable as exc:
            failures += 1
            observer.ready(f"broker unavailable: {exc}")
            log.warning("relay: broker unavailable (%s); reconnecting in %.1fs", exc,
                        doubling(failures, first=RECONNECT_FIRST, cap=max_delay))
        finally:
            await engine.close()
        if stop.is_set():
            break
        pause = doubling(max(failures, 1), first=RECONNECT_FIRST, cap=max_delay)
        # The loop runs while the broker is away: /-/healthy stays 200, /-/ready says why not.
        waited = 0.0
        while waited < pause and not stop.is_set():
            observer.heartbeat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, pause - waited))
            waited += 1.0
