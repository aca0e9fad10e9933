"""The two statements a chunk is made of: claim pending rows, then mark the handled ones done."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import String, and_, cast, or_, select, update
from sqlalchemy.orm import Session

from batchjobs.dialects import Dialect
from batchjobs.registry import FlagJob
from batchjobs.schema import Failure


def row_key_sql(job: FlagJob) -> Any:
    """The row's primary key as text, the form failure records are keyed by."""
    return cast(job.primary_key, String)


def claim_statement(job: FlagJob, dialect: Dialect, now: datetime, run_started: datetime, limit: int) -> Any:
    """Select up to ``limit`` eligible pending rows, locked for this transaction.

    Rows come as (model instance, attempts so far or None). A row is not eligible while it is
    dead, waiting out its backoff, or already failed during this run. The failure table is joined
    per pending row through its primary key, so the cost stays O(pending + failing): the planner
    walks the partial pending index in key order and stops after ``limit`` rows.
    """
    failure = and_(Failure.job == job.name, Failure.row_key == row_key_sql(job))
    eligible = or_(
        Failure.row_key.is_(None),
        ~or_(
            Failure.dead.is_(True),
            Failure.next_attempt_at > now,
            Failure.last_failed_at >= run_started,
        ),
    )
    stmt = (
        select(job.model, Failure.attempts)
        .outerjoin(Failure, failure)
        .where(job.pending(), eligible)
        .order_by(job.primary_key)
        .limit(limit)
    )
    return dialect.lock_for_claim(stmt, job.table)


def mark_done(session: Session, job: FlagJob, keys: Sequence[Any], now: datetime) -> None:
    """Set the flag (and ``done_at``) on these rows: one UPDATE for the whole chunk."""
    if keys:
        session.execute(update(job.table).where(job.primary_key.in_(keys)).values(job.done_values(now)))
