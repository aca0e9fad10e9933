"""Read-only queries for operators: what is registered and how much is pending."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, func, select

from batchjobs.registry import FlagJob, Registry


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
