"""The two statements a chunk is made of: claim pending rows, then mark the handled ones done."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import String, and_, cast, literal, or_, select, update
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
    dead, waiting out its backoff, or already failed during this run.

    The failure checks are scalar subqueries on purpose: PostgreSQL turns NOT EXISTS into an
    anti-join, and a hash anti-join loses the index order, so with stale statistics it would
    sort every pending row on every claim. A scalar subquery is looked up per row through the
    failure table's primary key while the partial pending index is walked in key order, and the
    walk stops after ``limit`` eligible rows: O(pending + failing) at worst, never O(table).
    """
    of_this_row = and_(Failure.job == job.name, Failure.row_key == row_key_sql(job))
    attempts = select(Failure.attempts).where(of_this_row).scalar_subquery()
    not_now = or_(Failure.dead.is_(True), Failure.next_attempt_at > now, Failure.last_failed_at >= run_started)
    held_back = select(literal(1)).where(of_this_row, not_now).limit(1).scalar_subquery()
    stmt = (
        select(job.model, attempts)
        .where(job.pending(), held_back.is_(None))
        .order_by(job.primary_key)
        .limit(limit)
    )
    return dialect.lock_for_claim(stmt, job.table)


def mark_done(session: Session, job: FlagJob, keys: Sequence[Any], now: datetime) -> None:
    """Set the flag (and ``done_at``) on these rows: one UPDATE for the whole chunk."""
    if keys:
        session.execute(update(job.table).where(job.primary_key.in_(keys)).values(job.done_values(now)))
