"""Time in one place: the UTC clock, UTC normalisation, and human durations (``55s``, ``1h30m``)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

from batchjobs.errors import BatchJobsError


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC: every time batchjobs stores or compares."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken as UTC (SQLite hands back naive values)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Return the number of seconds in ``text``, a number with a unit: ``55s``, ``1h30m``, ``250ms``.

    A bare number is refused: ``55`` could mean seconds or minutes. Raises
    :class:`BatchJobsError` with a one-line explanation for anything else.
    """
    cleaned = text.strip().lower()
    if cleaned.startswith("-"):
        raise BatchJobsError(f"invalid duration {text!r}: it cannot be negative")
    parts = _PART.findall(cleaned)
    if not parts or "".join(number + unit for number, unit in parts) != cleaned:
        raise BatchJobsError(f"invalid duration {text!r}: use a number with a unit, e.g. 30s, 10m, 1h30m, 250ms")
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds):
        raise BatchJobsError(f"invalid duration {text!r}: use a finite number, e.g. 30s")
    return seconds


#: The shortest --max-runtime: a run needs some time to connect and claim, and a shorter limit
#: would end it before it handled any row, silently.
MIN_RUNTIME = 1.0


def check_max_runtime(seconds: float | None, option: str = "max_runtime") -> None:
    """Refuse a run time limit too short to handle anything (see :data:`MIN_RUNTIME`)."""
    if seconds is not None and math.isnan(seconds):
        raise BatchJobsError(f"{option or 'the run time limit'} must be a number of seconds, e.g. 55s")
    if seconds is not None and seconds < MIN_RUNTIME:
        label = f"{option}={format_duration(seconds)}" if option else format_duration(seconds)
        raise BatchJobsError(
            f"{label} is too short to handle any row; use at least 1s "
            "(e.g. 55s for a run every minute)"
        )


def check_seconds(seconds: float, what: str, example: str = "5s") -> None:
    """Refuse a wait or interval that is not a finite number of seconds above 0: PostgreSQL reads
    a lock_timeout of 0 as "wait forever", the opposite of what it says, and NaN, neither more
    nor less than anything, would make every deadline one that never comes."""
    if not 0 < seconds < math.inf:
        raise BatchJobsError(f"the {what} must be more than 0, e.g. {example}")


def format_duration(seconds: float) -> str:
    """Render seconds compactly for people: ``850ms``, ``42s``, ``3m05s``, ``2h10m``, ``3d4h``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"
