"""Failures and the retry policy: backoff, dead rows, and the operator's view of them.

A failing row keeps its flag pending; what went wrong is kept in ``batchjobs_failures``, keyed by
(job, row key). The claim query skips rows that are dead or whose next attempt is still in the
future. Every write here happens in the chunk's own transaction, so a crash can neither record a
failure for work that was rolled back nor lose one that was committed.
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Sequence

from sqlalchemy import Connection, case, delete, func, select
from sqlalchemy.orm import Session

from batchjobs.dialects import KEYS
from batchjobs.errors import BatchJobsError
from batchjobs.schema import Failure

if TYPE_CHECKING:
    from batchjobs.dialects import Dialect
    from batchjobs.registry import FlagJob, Registry

#: Tracebacks are cut to their last this-many characters: the end is where the cause is.
TRACEBACK_LIMIT = 20_000


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, capped, times a random factor.

    With the defaults the waits after failures 1, 2, 3, ... are about 30s, 1m, 2m, 4m, ...,
    capped at 6 hours, each stretched or shrunk by up to 20% so retries of a burst spread out.
    """

    base: float = 30.0
    cap: float = 6 * 3600.0
    jitter: float = 0.2

    def __call__(self, attempt: int) -> float:
        # The exponent is bounded first: 2**1100 would overflow a float long before the cap.
        delay = min(self.cap, self.base * 2 ** min(attempt - 1, 60))
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RowFailure:
    """A handler failure for one row, before it is written down."""

    row_key: str
    attempts_before: int
    error: BaseException

    @property
    def error_type(self) -> str:
        cls = type(self.error)
        return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"

    @property
    def message(self) -> str:
        return _storable(str(self.error))[:TRACEBACK_LIMIT]

    @property
    def traceback(self) -> str:
        text = "".join(traceback.format_exception(type(self.error), self.error, self.error.__traceback__))
        return _storable(text)[-TRACEBACK_LIMIT:]


def _storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL; a message that cannot be stored would lose the chunk.
    return text.replace("\x00", "\\x00")


def record_failures(
    session: Session | Connection, dialect: Dialect, job: FlagJob, failures: Sequence[RowFailure], now: datetime
) -> None:
    """Count one attempt for each failed row, and schedule its retry or declare it dead."""
    if not failures:
        return
    table = Failure.__table__
    insert = dialect.insert(table)
    values = []
    for failure in failures:
        # The inserted values are those of a first failure; when a record exists already, the
        # update below counts on from it, and uses this wait for the attempt the claim saw.
        first_is_last = job.max_attempts <= 1
        wait = timedelta(seconds=job.backoff(failure.attempts_before + 1))
        values.append(
            {
                "job": job.name,
                "row_key": failure.row_key,
                "attempts": 1,
                "first_failed_at": now,
                "last_failed_at": now,
                "next_attempt_at": None if first_is_last else now + wait,
                "dead": first_is_last,
                "error_type": failure.error_type[:200],
                "error_message": failure.message,
                "traceback": failure.traceback,
            }
        )
    # The count comes from the stored row, not from what the claim saw: attempts stay exact
    # even if another runner recorded an attempt in between.
    attempts = table.c.attempts + 1
    now_dead = attempts >= job.max_attempts
    stmt = insert.values(values).on_conflict_do_update(
        index_elements=[table.c.job, table.c.row_key],
        set_={
            "attempts": attempts,
            "last_failed_at": insert.excluded.last_failed_at,
            "dead": now_dead,
            "next_attempt_at": case((now_dead, None), else_=func.coalesce(insert.excluded.next_attempt_at, now)),
            "error_type": insert.excluded.error_type,
            "error_message": insert.excluded.error_message,
            "traceback": insert.excluded.traceback,
        },
    )
    session.execute(stmt)


def clear_failures(session: Session | Connection, dialect: Dialect, job: FlagJob, row_keys: Sequence[str]) -> int:
    """Forget the failure records of these rows (after a success, a retry or a requeue)."""
    if not row_keys:
        return 0
    bound = session.dialect if isinstance(session, Connection) else session.get_bind().dialect
    result = session.execute(
        delete(Failure).where(Failure.job == job.name, dialect.key_in(Failure.row_key)),
        {KEYS: dialect.key_list(Failure.row_key, row_keys, bound)},
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class FailureInfo:
    """One row of ``batchjobs failures``."""

    job: str
    row_key: str
    attempts: int
    dead: bool
    first_failed_at: datetime
    last_failed_at: datetime
    next_attempt_at: datetime | None
    error_type: str
    error_message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "row_key": self.row_key,
            "attempts": self.attempts,
            "dead": self.dead,
            "first_failed_at": self.first_failed_at.isoformat(),
            "last_failed_at": self.last_failed_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "error_type": self.error_type,
            "error_message": self.error_message,
        }


def _job_name(connection: Connection, registry: Registry, job: str) -> str:
    """A registered job, or one that is not (renamed, removed) but still has failure records."""
    if job in registry.jobs:
        return job
    if connection.scalar(select(Failure.job).where(Failure.job == job).limit(1)) is not None:
        return job
    return registry.job(job).name  # raises the "unknown job" error


def list_failures(
    connection: Connection, registry: Registry, job: str | None = None, dead_only: bool = False
) -> list[FailureInfo]:
    """Failing and dead rows, oldest failure first; one job's when ``job`` is given."""
    stmt = select(Failure).order_by(Failure.job, Failure.first_failed_at, Failure.row_key)
    if job is not None:
        stmt = stmt.where(Failure.job == _job_name(connection, registry, job))
    if dead_only:
        stmt = stmt.where(Failure.dead.is_(True))
    with Session(connection) as session:
        return [
            FailureInfo(
                job=f.job,
                row_key=f.row_key,
                attempts=f.attempts,
                dead=f.dead,
                first_failed_at=f.first_failed_at,
                last_failed_at=f.last_failed_at,
                next_attempt_at=f.next_attempt_at,
                error_type=f.error_type,
                error_message=f.error_message,
            )
            for f in session.scalars(stmt)
        ]


def show_failure(connection: Connection, registry: Registry, job: str, row_key: str) -> Failure:
    """The full failure record of one row, traceback included."""
    name = _job_name(connection, registry, job)
    with Session(connection, expire_on_commit=False) as session:
        failure = session.get(Failure, (name, row_key))
        if failure is None:
            raise BatchJobsError(f"job {name!r} has no failure recorded for row {row_key!r}")
        session.expunge(failure)
        return failure


def retry(
    connection: Connection,
    registry: Registry,
    job: str,
    row_keys: Sequence[str] = (),
    all_dead: bool = False,
    everything: bool = False,
) -> int:
    """Clear failure records so the rows are claimed on the next run; returns how many.

    Exactly one selection: ``row_keys``, ``all_dead`` or ``everything``. Naming a row that has no
    failure record is an error and clears nothing.
    """
    name = _job_name(connection, registry, job)
    if sum((bool(row_keys), all_dead, everything)) != 1:
        raise BatchJobsError("choose exactly one of --row KEY, --all-dead or --all")
    stmt = delete(Failure).where(Failure.job == name)
    if row_keys:
        keys = list(dict.fromkeys(row_keys))
        found = set(connection.scalars(select(Failure.row_key).where(Failure.job == name, Failure.row_key.in_(keys))))
        missing = [key for key in keys if key not in found]
        if missing:
            raise BatchJobsError(f"job {name!r} has no failure recorded for row(s) {', '.join(missing)}; nothing retried")
        stmt = stmt.where(Failure.row_key.in_(keys))
    elif all_dead:
        stmt = stmt.where(Failure.dead.is_(True))
    return int(connection.execute(stmt).rowcount or 0)

