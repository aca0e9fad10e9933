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
from typing import TYPE_CHECKING

from sqlalchemy import Engine, delete, insert, update

from batchjobs.schema import RunRecord

if TYPE_CHECKING:
    from batchjobs.runner import RunSummary

HEARTBEAT_EVERY = 5.0
#: A run that has not beaten for this long, and never finished, is taken as crashed.
STALE_AFTER = timedelta(seconds=60)


def outcome_of(run: RunRecord, now: datetime) -> str:
    """finished, max-runtime, interrupted or failed once done; running or crashed before."""
    if run.outcome is not None:
        return run.outcome
    return "crashed" if now - run.heartbeat_at > STALE_AFTER else "running"


def _progress(summary: RunSummary) -> dict[str, object]:
    return {
        "rows_done": summary.done,
        "rows_failed": summary.failed,
        "job_stats": json.dumps({name: [s.done, s.failed] for name, s in summary.jobs.items()}),
    }


@contextmanager
def record_run(
    engine: Engine,
    summary: RunSummary,
    queues: Sequence[str],
    clock: Callable[[], datetime],
    keep_for: timedelta = timedelta(days=7),
    heartbeat_every: float = HEARTBEAT_EVERY,
) -> Iterator[None]:
    """Record the run whose counts ``summary`` collects, from start to finish.

    Also prunes runs that started more than ``keep_for`` ago. If the block raises, the run is
    recorded as failed; SIGKILL leaves it unfinished, and its stale heartbeat tells the rest.
    """
    now = clock()
    runs = RunRecord.__table__
    # Core statements rather than the ORM's unit of work: an idle cron tick pays for every
    # statement compiled in a fresh process, and these run in every tick.
    with engine.begin() as connection:
        connection.execute(delete(runs).where(runs.c.started_at < now - keep_for))
        created = connection.execute(
            insert(runs).values(
                host=socket.gethostname(),
                pid=os.getpid(),
                jobs=",".join(summary.jobs),
                queues=",".join(queues),
                started_at=now,
                heartbeat_at=now,
                **_progress(summary),
            )
        )
        run_id = created.inserted_primary_key[0]

    def save(**values: object) -> None:
        with engine.begin() as connection:
            connection.execute(update(runs).where(runs.c.id == run_id).values(**values))

    stopped = threading.Event()

    def beat() -> None:
        while not stopped.wait(heartbeat_every):
            save(heartbeat_at=clock(), **_progress(summary))

    heart = threading.Thread(target=beat, name="batchjobs-heartbeat", daemon=True)
    heart.start()
    outcome = "failed"
    try:
        yield
        outcome = {None: "finished", "max-runtime": "max-runtime"}.get(summary.stopped_by, "interrupted")
    finally:
        stopped.set()
        heart.join()
        now = clock()
        save(heartbeat_at=now, finished_at=now, outcome=outcome, **_progress(summary))
