"""Read-only queries for operators: what is registered, what waits, what failed, what ran.

Everything here is cheap on big tables: pending rows are counted through the partial pending
index (O(pending)), failures and runs are batchjobs' own small tables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine

from batchjobs.db import connection_for
from batchjobs.history import STALE_AFTER, outcome_of
from batchjobs.registry import FlagJob, Registry
from batchjobs.store import Store, store_for
from batchjobs.store.tables import RunRecord
from batchjobs.timeutil import utcnow


@dataclass(frozen=True)
class JobInfo:
    """One line of `batchjobs jobs`."""

    name: str
    model: str
    flag: str
    queue: str
    pending: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def list_jobs(registry: Registry, bind: Engine | Connection) -> list[JobInfo]:
    """Every registered job with its pending count. Reads only."""
    with connection_for(bind) as connection:
        store = store_for(connection.engine)
        return [
            JobInfo(
                name=job.name,
                model=job.model.__name__,
                flag=f"{job.table.name}.{job.flag.name}",
                queue=job.queue,
                pending=store.pending_count(connection, job),
            )
            for job in registry.jobs.values()
        ]


@dataclass(frozen=True)
class JobStatus:
    """How one job is doing."""

    name: str
    queue: str
    pending: int
    #: Seconds the oldest pending row has waited; None without ``pending_since`` or when none waits.
    oldest_pending_age: float | None
    backoff: int
    dead: int
    done_last_hour: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunInfo:
    """One recorded run, with its outcome as of now (running and crashed are derived)."""

    id: int
    host: str
    pid: int
    jobs: list[str]
    started_at: datetime
    heartbeat_at: datetime
    finished_at: datetime | None
    seconds: float
    rows_done: int
    rows_failed: int
    job_stats: dict[str, list[int]]
    outcome: str
    #: "run" (run-pending) or "worker" (`batchjobs worker`).
    kind: str = "run"
    #: The queues it was started for; empty for all.
    queues: list[str] = field(default_factory=list)

    def serves(self, queue: str | None) -> bool:
        """Whether it handles ``queue`` (any queue, for None)."""
        return queue is None or not self.queues or queue in self.queues

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("started_at", "heartbeat_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass(frozen=True)
class Status:
    """Everything `batchjobs status` shows."""

    jobs: list[JobStatus]
    last_run: RunInfo | None
    alive: list[RunInfo] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "jobs": [job.as_json() for job in self.jobs],
            "last_run": self.last_run.as_json() if self.last_run else None,
            "alive": [run.as_json() for run in self.alive],
        }


def _oldest_pending_age(store: Store, connection: Connection, job: FlagJob, now: datetime) -> float | None:
    if job.pending_since is None:
        return None
    oldest = store.oldest_pending(connection, job)
    return max((now - oldest).total_seconds(), 0.0) if oldest is not None else None


def _run_info(run: RunRecord, now: datetime) -> RunInfo:
    end = run.finished_at or run.heartbeat_at
    return RunInfo(
        id=run.id,
        host=run.host,
        pid=run.pid,
        jobs=[name for name in run.jobs.split(",") if name],
        started_at=run.started_at,
        heartbeat_at=run.heartbeat_at,
        finished_at=run.finished_at,
        seconds=(end - run.started_at).total_seconds(),
        rows_done=run.rows_done,
        rows_failed=run.rows_failed,
        job_stats=json.loads(run.job_stats or "{}"),
        outcome=outcome_of(run, now),
        kind=run.kind,
        queues=[name for name in run.queues.split(",") if name],
    )


def last_run(
    registry: Registry, bind: Engine | Connection, job: str | None = None, now: datetime | None = None
) -> RunInfo | None:
    """The latest run (that covered ``job``, when given). Reads only."""
    with connection_for(bind) as connection:
        run = store_for(connection.engine).last_run(connection, job)
    return _run_info(run, now or utcnow()) if run is not None else None


def status(
    registry: Registry, bind: Engine | Connection, *, queues: Sequence[str] = (), now: datetime | None = None
) -> Status:
    """Per job: pending, oldest pending age, backing off, dead, done in the last hour; plus runs. Reads only."""
    now = now or utcnow()
    with connection_for(bind) as connection:
        store = store_for(connection.engine)
        since = now - max(timedelta(hours=1), STALE_AFTER)
        runs = [_run_info(run, now) for run in store.runs_since(connection, since)]
        jobs = []
        for job in registry.select(queues=queues):
            # Only rows that exist and are the job's work count, as for pending.
            backoff, dead = store.job_failure_counts(connection, job)
            jobs.append(
                JobStatus(
                    name=job.name,
                    queue=job.queue,
                    pending=store.pending_count(connection, job),
                    oldest_pending_age=_oldest_pending_age(store, connection, job, now),
                    backoff=backoff,
                    dead=dead,
                    done_last_hour=sum(
                        run.job_stats.get(job.name, [0, 0])[0]
                        for run in runs
                        if run.heartbeat_at >= now - timedelta(hours=1)
                    ),
                )
            )
        latest = store.last_run(connection)
    return Status(
        jobs=jobs,
        last_run=_run_info(latest, now) if latest is not None else None,
        alive=[run for run in runs if run.outcome == "running"],
    )


def run_history(
    registry: Registry, bind: Engine | Connection, *, limit: int = 50, offset: int = 0, now: datetime | None = None
) -> tuple[list[RunInfo], int]:
    """A page of the run history, newest first, and how many runs it holds in all. Reads only."""
    now = now or utcnow()
    with connection_for(bind) as connection:
        store = store_for(connection.engine)
        runs = store.runs_page(connection, limit, offset)
        total = store.run_count(connection)
    return [_run_info(run, now) for run in runs], total
