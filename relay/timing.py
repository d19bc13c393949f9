"""Time as opsrelay reasons about it, all pure: durations as people write them in config
(``"500ms"``, ``"30s"``, ``"2m"``, ``"1h"``, ``"1d"`` or seconds), and the two backoffs.

- :func:`backoff`: a mail's delay after failed attempt N, from ``retry.backoff``'s steps;
- :func:`doubling`: how long a process waits after N failures in a row to reach something it
  needs (the listener's READY after a FAIL, its spool forwarder, the relay's reconnect).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = ["backoff", "doubling", "format_duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: str | float) -> float:
    """Seconds; raises ValueError naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '2m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _PATTERN.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. '500ms', '30s', '2m', '1h', '1d')")
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds (not nan or inf)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def backoff(attempt: int, steps: Sequence[float]) -> float:
    """The delay after failed attempt number ``attempt`` (1-based); the last step repeats."""
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    if not steps:
        raise ValueError("backoff needs at least one step")
    return steps[min(attempt, len(steps)) - 1]


def doubling(failures: int, *, first: float, cap: float) -> float:
    """0 after a success, then ``first``, twice that, ... up to ``cap`` after ``failures`` in a row."""
    if failures <= 0:
        return 0.0
    # 2**64 * first is past any cap: bound the exponent so a long outage cannot overflow a float.
    return float(min(cap, first * 2 ** min(failures - 1, 64)))
