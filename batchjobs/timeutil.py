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
    """Return the number of seconds in ``text``; a bare number means seconds.

    Raises :class:`BatchJobsError` with a one-line explanation for anything else.
    """
    cleaned = text.strip().lower()
    try:
        seconds = float(cleaned)
    except ValueError:
        if cleaned.startswith("-"):
            raise BatchJobsError(f"invalid duration {text!r}: it cannot be negative") from None
        parts = _PART.findall(cleaned)
        if not parts or "".join(number + unit for number, unit in parts) != cleaned:
            raise BatchJobsError(
                f"invalid duration {text!r}: use a number with a unit, e.g. 30s, 10m, 1h30m, 250ms"
            ) from None
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds < 0 or cleaned.startswith("-"):
        raise BatchJobsError(f"invalid duration {text!r}: it cannot be negative")
    if not math.isfinite(seconds):
        raise BatchJobsError(f"invalid duration {text!r}: use a finite number, e.g. 30s")
    return seconds


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
