"""How a submission ends: sysexits.h codes, and an error as the one line we report."""

from __future__ import annotations

__all__ = ["EX_CONFIG", "EX_DATAERR", "EX_OK", "EX_TEMPFAIL", "EX_USAGE", "reason"]

# sysexits.h. 75: nothing was queued, the caller still has the message (cron logs it, mailx
# keeps dead.letter).
EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 0, 64, 65, 75, 78


def reason(exc: BaseException) -> str:
    """An error as one short line for our report."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__
