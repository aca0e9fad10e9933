"""The 24-hour chart: pending rows per job from the backlog history, rows done from the run history.

Both come from batchjobs' own small tables (samples every few minutes, one row per run), never
from the app's tables, so the chart costs the same on a table of a thousand rows or a billion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection

from batchjobs.history import BACKLOG_EVERY
from batchjobs.store import store_for

#: The chart's width in time, and the width of one of its points.
SPAN = timedelta(hours=24)
BUCKET = BACKLOG_EVERY


@dataclass(frozen=True)
class Chart:
    """Per job: pending rows (None where no sample was taken) and rows done, per bucket."""

    #: Start of each bucket, in seconds since the epoch.
    times: list[int]
    pending: dict[str, list[int | None]]
    done: dict[str, list[float]]

    def as_json(self, jobs: list[str] | None = None) -> dict[str, Any]:
        names = list(self.pending) if jobs is None else jobs
        return {
            "times": self.times,
            "jobs": names,
            "pending": [self.pending[name] for name in names],
            "done": [self.done[name] for name in names],
            "bucket_seconds": int(BUCKET.total_seconds()),
        }


def _bucket_start(moment: datetime) -> datetime:
    seconds = int(BUCKET.total_seconds())
    epoch = int(moment.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, timezone.utc)


def day_chart(connection: Connection, jobs: list[str], now: datetime) -> Chart:
    """The last :data:`SPAN` of ``jobs``, in :data:`BUCKET` steps ending with the one holding ``now``."""
    store = store_for(connection.engine)
    count = int(SPAN / BUCKET)
    first = _bucket_start(now) - BUCKET * (count - 1)
    times = [first + BUCKET * i for i in range(count)]
    pending: dict[str, list[int | None]] = {name: [None] * count for name in jobs}
    done: dict[str, list[float]] = {name: [0.0] * count for name in jobs}

    for name, sampled_at, rows in store.backlog_since(connection, first):
        if name in pending:
            # Oldest first: a later sample in the same bucket wins.
            pending[name][min(int((sampled_at - first) / BUCKET), count - 1)] = rows

    for run in store.runs_since(connection, first):
        stats: dict[str, list[int]] = json.loads(run.job_stats or "{}")
        _spread(run.started_at, run.finished_at or run.heartbeat_at, stats, done, first, count)

    return Chart(
        times=[int(moment.timestamp()) for moment in times],
        pending=pending,
        done={name: [round(value, 1) for value in values] for name, values in done.items()},
    )


def _spread(
    start: datetime, end: datetime, stats: dict[str, list[int]], done: dict[str, list[float]], first: datetime, count: int
) -> None:
    """Share a run's rows out over the buckets it ran in, in proportion to its time in each.

    A run's history keeps its totals, not when each row was done: for cron runs of a minute that
    is exact to the bucket; a long-running worker's rows are shown at its average rate.
    """
    end = max(end, start)
    length = (end - start).total_seconds()
    for name, (rows, *_failed) in stats.items():
        if name not in done or not rows:
            continue
        if length == 0:
            index = int((start - first) / BUCKET)
            if 0 <= index < count:
                done[name][index] += rows
            continue
        index = max(int((start - first) / BUCKET), 0)
        while index < count:
            low = max(start, first + BUCKET * index)
            high = min(end, first + BUCKET * (index + 1))
            if high <= low and low >= end:
                break
            if high > low:
                done[name][index] += rows * (high - low).total_seconds() / length
            index += 1
