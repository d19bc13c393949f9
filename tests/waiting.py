"""Waiting in tests: poll a condition until it holds, or fail saying what was awaited (no pytest here).

A fixed sleep before a positive assert is too long on a quiet machine and too short on a busy
one: wait for the condition instead. :func:`wait_until` is for a test on an event loop (its
predicate may be a coroutine function), :func:`wait_for` for a thread or a subprocess test;
both return the predicate's first truthy value, so ``[mail] = wait_for(lambda: server.received,
...)`` takes what it waited for. :func:`settle` is for an assert that should show the value
found: it returns the last value when time runs out, and the caller asserts it.

A fixed sleep stays only where no condition can be waited for: a peer that must stay down for
a while, pacing, a simulated slow peer, or a negative check ("nothing more arrives within X"),
and then a comment at the sleep says which.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["WaitTimeout", "settle", "wait_for", "wait_until"]

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The awaited condition did not hold in time (an assertion failure of the test)."""


def _timed_out(within: float, what: str, diagnostics: Callable[[], str] | None) -> WaitTimeout:
    detail = f"\n{diagnostics()}" if diagnostics is not None else ""
    return WaitTimeout(f"waited {within:g}s for {what}{detail}")


@overload
async def wait_until(predicate: Callable[[], Awaitable[T]], within: float, *, what: str,
                     diagnostics: Callable[[], str] | None = None, interval: float = 0.02) -> T: ...


@overload
async def wait_until(predicate: Callable[[], T], within: float, *, what: str,
                     diagnostics: Callable[[], str] | None = None, interval: float = 0.02) -> T: ...


async def wait_until(predicate: Callable[[], Any], within: float, *, what: str,
                     diagnostics: Callable[[], str] | None = None, interval: float = 0.02) -> Any:
    """Call ``predicate`` (awaiting its result if it is awaitable) until it is truthy; return that value.

    Raises :class:`WaitTimeout` after ``within`` seconds, with ``what`` and ``diagnostics()`` in
    the message. An exception from the predicate ends the wait at once (a relay that died, say).
    """
    deadline = time.monotonic() + within
    while True:
        value: Any = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(within, what, diagnostics)
        await asyncio.sleep(interval)  # the poll interval: there is no event to wait on


def wait_for(predicate: Callable[[], T], within: float, *, what: str,
             diagnostics: Callable[[], str] | None = None, interval: float = 0.05) -> T:
    """:func:`wait_until` for code without an event loop (threads, subprocesses): blocks while it polls."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(within, what, diagnostics)
        time.sleep(interval)  # the poll interval: there is no event to wait on


async def settle(probe: Callable[[], Awaitable[T]], expected: T, within: float = 5.0, *,
                 interval: float = 0.02) -> T:
    """``await probe()`` until it equals ``expected`` or ``within`` passed; the last value either way.

    For counts a broker applies asynchronously (RabbitMQ settles an ack or a reject after it
    returned): ``assert await settle(lambda: engine.depth(q), 0) == 0`` shows the count found.
    """
    deadline = time.monotonic() + within
    # Polling is the only way: AMQP has no "tell me when the count changes".
    while (found := await probe()) != expected and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(interval)  # the poll interval
    return found
