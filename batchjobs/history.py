"""Run history: a row per `run-pending` invocation, kept fresh by a heartbeat while it runs.

Every write here is a short transaction of its own on its own connection, never part of a
chunk, so history can neither block nor be rolled back with the work. A heartbeat thread
updates the row every few seconds, even while a slow handler runs; a row whose heartbeat is
older than :data:`STALE_AFTER` and that never finished belongs to a crashed run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from batchjobs.store import Store
from batchjobs.store.tables import RunRecord
from batchjobs.summary import RunSummary

HEARTBEAT_EVERY = 5.0
#: A run that has not beaten for this long, and never finished, is taken as crashed.
STALE_AFTER = timedelta(seconds=60)


def outcome_of(run: RunRecord, now: datetime) -> str:
    """finished, max-runtime, interrupted or failed once done; running or crashed before."""
    if run.outcome is not None:
        return run.outcome
    return "crashed" if now - run.heartbeat_at > STALE_AFTER else "running"


def _progress(summary: RunSummary) -> dict[str, object]:
    return {"rows_done": summary.done, "rows_failed": summary.failed, "job_stats": json.dumps(summary.per_job())}


class RunRecorder:
    """Keeps one run's row in ``batchjobs_runs``: opened at the start, beaten, closed at the end."""

    def __init__(
        self,
        store: Store,
        summary: RunSummary,
        queues: Sequence[str],
        clock: Callable[[], datetime],
        keep_for: timedelta = timedelta(days=7),
        heartbeat_every: float = HEARTBEAT_EVERY,
    ) -> None:
        self.store = store
        self.summary = summary
        self.queues = queues
        self.clock = clock
        self.keep_for = keep_for
        self.heartbeat_every = heartbeat_every
        self.run_id: Any = None
        self._stopped = threading.Event()
        self._heart: threading.Thread | None = None

    def open(self) -> None:
        """Prune runs older than ``keep_for`` and record this one as running."""
        now = self.clock()
        values = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "jobs": ",".join(self.summary.jobs),
            "queues": ",".join(self.queues),
            "started_at": now,
            "heartbeat_at": now,
            **_progress(self.summary),
        }
        with self.store.engine.begin() as connection:
            self.run_id = self.store.open_run(connection, values, prune_before=now - self.keep_for)

    def start_heartbeat(self) -> None:
        """Refresh the row every few seconds from a thread, even while a slow handler runs."""

        def beat() -> None:
            while not self._stopped.wait(self.heartbeat_every):
                self._save(heartbeat_at=self.clock(), **_progress(self.summary))

        self._heart = threading.Thread(target=beat, name="batchjobs-heartbeat", daemon=True)
        self._heart.start()

    def close(self, outcome: str) -> None:
        """Stop the heartbeat and record how the run ended, with its final counts."""
        self._stopped.set()
        if self._heart is not None:
            self._heart.join()
        now = self.clock()
        self._save(heartbeat_at=now, finished_at=now, outcome=outcome, **_progress(self.summary))

    def _save(self, **values: object) -> None:
        with self.store.engine.begin() as connection:
            self.store.save_run(connection, self.run_id, values)


@contextmanager
def record_run(
    store: Store,
    summary: RunSummary,
    queues: Sequence[str],
    clock: Callable[[], datetime],
    keep_for: timedelta = timedelta(days=7),
) -> Iterator[RunRecorder]:
    """Record the run whose counts ``summary`` collects, from start to finish; yields the recorder.

    If the block raises, the run is recorded as failed; SIGKILL leaves it unfinished, and its
    stale heartbeat tells the rest.
    """
    recorder = RunRecorder(store, summary, queues, clock, keep_for)
    recorder.open()
    recorder.start_heartbeat()
    outcome = "failed"
    try:
        yield recorder
        outcome = summary.outcome
    finally:
        recorder.close(outcome)
