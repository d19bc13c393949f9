"""Blocking calls into asyncio: an event loop in a daemon thread, every call bounded.

The eventlistener loop is synchronous (it owns stdin/stdout) and engines are asyncio; a
:class:`LoopThread` keeps an engine's connection alive between events (heartbeats) and
never lets a call hold supervisord longer than its timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from relay.errors import BrokerUnavailable

__all__ = ["LoopThread"]

_T = TypeVar("_T")


class LoopThread:
    """An asyncio loop in a daemon thread, called from blocking code with a bound on every call."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], *, timeout: float, what: str) -> _T:
        """The coroutine's result; BrokerUnavailable (and the coroutine cancelled) after ``timeout``."""
        if not self._thread.is_alive():
            coro.close()
            raise BrokerUnavailable(f"{what}: the publisher is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BrokerUnavailable(f"{what}: no answer within {timeout:.1f}s") from None
        except concurrent.futures.CancelledError:
            raise BrokerUnavailable(f"{what}: cancelled") from None

    def stop(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=timeout)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
