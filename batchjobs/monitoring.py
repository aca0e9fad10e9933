"""Read-only queries for operators: what is registered, what waits, what failed, what ran.

Everything here is cheap on big tables: pending rows are counted through the partial pending
index (O(pending)), failures and runs are batchjobs' own small tables.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from sqlalchemy import Connection, false, func, select, true
from sqlalchemy.orm import Session

from batchjobs.failures import utcnow
from batchjobs.history import STALE_AFTER, outcome_of
from batchjobs.registry import FlagJob, Registry
from batchjobs.schema import Failure, RunRecord


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


def pending_count(connection: Connection, job: FlagJob) -> int:
    """Rows waiting for this job (dead and backing-off rows included); rides the partial index."""
    return int(connection.execute(select(func.count()).select_from(job.table).where(job.pending())).scalar_one())


def list_jobs(connection: Connection, registry: Registry) -> list[JobInfo]:
    """Every registered job with its pending count."""
    return [
        JobInfo(
            name=job.name,
            model=job.model.__name__,
            flag=f"{job.table.name}.{job.flag.name}",
            queue=job.queue,
            pending=pending_count(connection, job),
        )
        for job in registry.jobs.values()
    ]


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; batchjobs and CURRENT_TIMESTAMP both mean UTC there.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


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


def oldest_pending_age(connection: Connection, job: FlagJob, now: datetime) -> float | None:
    if job.pending_since is None:
        return None
    oldest = _aware(connection.execute(select(func.min(job.pending_since)).where(job.pending())).scalar())
    return max((now - oldest).total_seconds(), 0.0) if oldest is not None else None


def failure_counts(connection: Connection) -> dict[str, tuple[int, int]]:
    """Per job name: (rows failing and waiting to retry, dead rows)."""
    rows = connection.execute(
        select(
            Failure.job,
            func.count().filter(Failure.dead == false()),
            func.count().filter(Failure.dead == true()),
        ).group_by(Failure.job)
    )
    return {name: (int(backoff), int(dead)) for name, backoff, dead in rows}


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
    )


def recent_runs(connection: Connection, since: datetime, now: datetime) -> list[RunInfo]:
    """Runs that were active at or after ``since``, newest first."""
    with Session(connection) as session:
        runs = session.scalars(
            select(RunRecord).where(RunRecord.heartbeat_at >= since).order_by(RunRecord.started_at.desc())
        )
        return [_run_info(run, now) for run in runs]


def last_run(connection: Connection, now: datetime, job: str | None = None) -> RunInfo | None:
    """The latest run (that covered ``job``, when given)."""
    with Session(connection) as session:
        stmt = select(RunRecord).order_by(RunRecord.started_at.desc(), RunRecord.id.desc())
        if job is not None:
            # Job names are stored comma-separated; match a whole name, not a prefix.
            stmt = stmt.where(("," + RunRecord.jobs + ",").contains(f",{job},"))
        run = session.scalars(stmt.limit(1)).first()
        return _run_info(run, now) if run is not None else None


def status(
    connection: Connection, registry: Registry, queues: Sequence[str] = (), now: datetime | None = None
) -> Status:
    """Per job: pending, oldest pending age, backing off, dead, done in the last hour; plus runs."""
    now = now or utcnow()
    failing = failure_counts(connection)
    runs = recent_runs(connection, now - max(timedelta(hours=1), STALE_AFTER), now)
    jobs = []
    for job in registry.select(queues=queues):
        backoff, dead = failing.get(job.name, (0, 0))
        jobs.append(
            JobStatus(
                name=job.name,
                queue=job.queue,
                pending=pending_count(connection, job),
                oldest_pending_age=oldest_pending_age(connection, job, now),
                backoff=backoff,
                dead=dead,
                done_last_hour=sum(
                    run.job_stats.get(job.name, [0, 0])[0] for run in runs if run.heartbeat_at >= now - timedelta(hours=1)
                ),
            )
        )
    return Status(
        jobs=jobs,
        last_run=last_run(connection, now),
        alive=[run for run in runs if run.outcome == "running"],
    )
