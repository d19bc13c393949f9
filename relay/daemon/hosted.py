"""The relay inside ``opsrelay listen -m``: crashmail's drop-in needs no second program.

With crashmail's ``-m``, the listener also turns the implicit subscription's events
(:mod:`relay.config.crashmail`) into mail and delivers the outbound queue: a thread with its
own event loop runs :func:`relay.daemon.serve.serve_forever` for a copy of the config whose
only subscription is the implicit one. A separate ``opsrelay serve`` may still run for
the config's own subscriptions; both consume outbound as competing consumers.

* Before the first READY the relay's topology is declared, so the first crash already
  has its queue (an event published before its binding exists lands in
  ``<prefix>.unrouted`` and never becomes mail).
* The listener ends (stdin closed) or supervisord sends SIGTERM (``supervisorctl stop``,
  its own shutdown): the relay stops taking work and finishes what is in flight for up
  to ``drain`` seconds (keep the section's ``stopwaitsecs`` above it; supervisord's
  default is 10), then what is left returns to its queue unacked. A second SIGTERM ends
  the process at once.
* The relay thread dies: the listener is ended too (SIGTERM to itself) and exits
  non-zero, so supervisord restarts both.

relay.daemon, aiosmtplib and Jinja2 are imported only when the relay starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING

from relay.config.crashmail import subscription_name
from relay.config.models import Config
from relay.errors import RelayError

if TYPE_CHECKING:
    from relay.render.renderer import Renderer

__all__ = ["DRAIN", "HostedRelay", "RelayFailed", "Terminated", "hosted_relay"]

log = logging.getLogger("opsrelay.listener")
# With the 2 s join after it, below supervisord's default stopwaitsecs (10), after which
# it sends SIGKILL.
DRAIN = 6.0


class Terminated(BaseException):
    """SIGTERM, raised in the main thread out of its blocking read of stdin (a BaseException, as
    KeyboardInterrupt: no ``except Exception`` on the way may swallow it)."""


class RelayFailed(RelayError):
    """The hosted relay stopped on its own."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def hosted_config(config: Config) -> Config:
    """``config`` with the implicit subscription as its only one (the rest is ``opsrelay serve``'s)."""
    name = subscription_name(config)
    return config.model_copy(update={"subscriptions": tuple(s for s in config.subscriptions if s.name == name)})


class HostedRelay:
    """serve_forever in a daemon thread with its own loop, started and stopped from blocking code."""

    def __init__(self, config: Config, *, drain: float = DRAIN) -> None:
        self.config = hosted_config(config)
        if not self.config.subscriptions:
            raise ValueError("this config has no crashmail subscription "
                             "(see relay.config.crashmail.config_with_crashmail)")
        self.drain = drain
        self.ready_timeout = max(5.0, 3 * config.broker.confirm_timeout)
        self.failure: BaseException | None = None
        self._renderer: Renderer | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._running = self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="opsrelay-hosted-relay", daemon=True)

    def start(self) -> None:
        """Return once the topology is declared (or after ``ready_timeout``); ConfigurationError for a bad template."""
        from relay.render.renderer import Renderer

        self._renderer = Renderer(self.config)
        self._thread.start()
        if not self._ready.wait(self.ready_timeout):
            log.warning("crashmail relay: queues not declared after %gs; going on", self.ready_timeout)
        with self._lock:
            # From here a relay that dies ends the listener; before, the failure is raised here.
            self._running = True
            failed = self.failure is not None
        if failed:
            self.raise_failure()  # the thread has ended: failures are recorded as it ends

    def _run(self) -> None:
        # SIGTERM is for the main thread, whose read of stdin it must interrupt.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        failure: BaseException | None = None
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            failure = exc
        with self._lock:
            if self._stopping and isinstance(failure, asyncio.CancelledError):
                failure = None  # stop() cancelled a drain that outlasted its bound
            elif failure is None and not self._stopping:
                failure = RelayFailed("the crashmail relay ended on its own")
            self.failure = failure
            end_listener = failure is not None and self._running and not self._stopping
        self._ready.set()
        if failure is not None:
            log.error("crashmail relay: %s: %s", type(failure).__name__, failure)
        if end_listener:
            log.error("crashmail relay: ending the listener, supervisord restarts it")
            os.kill(os.getpid(), signal.SIGTERM)

    async def _serve(self) -> None:
        from relay.daemon.serve import serve_forever
        from relay.delivery.smarthosts import Smarthosts

        with self._lock:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._main = asyncio.current_task()
            if self._stopping:
                self._stop.set()
        mailer = Smarthosts(self.config.smtp)
        try:
            await self._declare()
            self._ready.set()
            # The relay's own drain ends a second before stop() stops waiting for it.
            await serve_forever(self.config, mailer, self._stop, renderer=self._renderer,
                                grace=max(0.5, self.drain - 1.0))
        finally:
            await mailer.close()

    async def _declare(self) -> None:
        from relay.daemon.relay import relay_topology
        from relay.engines import open_engine

        broker = self.config.broker
        engine = open_engine(broker.url, **broker.engine_options)
        try:
            async with asyncio.timeout(self.ready_timeout):
                await engine.connect()
                await engine.declare(relay_topology(self.config))
        except (RelayError, TimeoutError) as exc:
            # serve_forever declares again once the broker is back; the listener spools meanwhile.
            log.warning("crashmail relay: could not declare its queues yet: %s", exc)
        finally:
            await engine.close()

    def stop(self) -> None:
        """Finish what is in flight (at most ``drain`` s), then cancel what is left (it returns to its queue)."""
        with self._lock:
            self._stopping = True
            loop, stop, main = self._loop, self._stop, self._main
        if self._thread.ident is None:
            return
        began = time.monotonic()
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(self.drain)
        if self._thread.is_alive() and loop is not None and main is not None:
            log.warning("crashmail relay: still busy after %gs; what is in flight returns to its queue", self.drain)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(main.cancel)
            self._thread.join(2.0)
        log.info("crashmail relay: stopped in %.1fs", time.monotonic() - began)

    def raise_failure(self) -> None:
        if self.failure is None:
            return
        if isinstance(self.failure, RelayError):
            raise self.failure
        raise RelayFailed(f"the crashmail relay failed: {self.failure!r}") from self.failure


@contextlib.contextmanager
def hosted_relay(config: Config, *, drain: float = DRAIN) -> Iterator[HostedRelay]:
    """Run the relay while the block runs; SIGTERM ends the block quietly. Main thread only.

    Raises what stopped the relay on its own (RelayError) after the block.
    """
    relay = HostedRelay(config, drain=drain)
    previous = signal.signal(signal.SIGTERM, _terminate) or signal.SIG_DFL
    started = False
    try:
        relay.start()
        log.info("crashmail relay: mailing %s for subscription %s",
                 ", ".join(relay.config.subscriptions[0].to), relay.config.subscriptions[0].name)
        started = True
        yield relay
    except Terminated:
        log.info("SIGTERM: stopping; the crashmail relay finishes what is in flight")
        if not started:
            # Stopped while starting (the broker was slow): nothing was answered yet, end quietly.
            raise SystemExit(0) from None
    finally:
        # A second SIGTERM while draining ends the process at once.
        signal.signal(signal.SIGTERM, previous)
        relay.stop()
    relay.raise_failure()
