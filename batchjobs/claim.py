"""The statements a chunk is made of: claim pending rows, look at their failure records, mark done."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import Integer, Select, String, and_, bindparam, cast, literal, or_, select, update
from sqlalchemy.orm import Session

from batchjobs.dialects import Dialect
from batchjobs.registry import FlagJob
from batchjobs.schema import Failure, UTCDateTime


def row_key_sql(job: FlagJob) -> Any:
    """The row's primary key as text, the form failure records are keyed by."""
    return cast(job.primary_key, String)


def _held_back() -> Any:
    """Failure-record condition for rows that must wait: dead, backing off, or failed this run.

    ``now`` and ``run_started`` are bound at execution, so each statement is built once per run.
    """
    return or_(
        Failure.dead.is_(True),
        Failure.next_attempt_at > bindparam("now", type_=UTCDateTime()),
        Failure.last_failed_at >= bindparam("run_started", type_=UTCDateTime()),
    )


def claim_statement(job: FlagJob, dialect: Dialect) -> Select[Any]:
    """Select up to ``:limit`` pending rows that are not held back, locked for this transaction.

    Rows come as (model instance, row key). The key is computed by the database, the same
    expression the failure lookups use, so both agree for every key type (a UUID is text with
    hyphens on PostgreSQL, 32 hex digits on SQLite). Execute with ``now``, ``run_started`` and
    ``limit``.

    The failure check is a scalar subquery on purpose: PostgreSQL turns NOT EXISTS into an
    anti-join, and a hash anti-join loses the index order, so with stale statistics it would
    sort every pending row on every claim. A scalar subquery is looked up per row through the
    failure table's primary key while the partial pending index is walked in key order, and the
    walk stops after ``limit`` rows: O(pending + failing) at worst, never O(table).
    """
    of_this_row = and_(Failure.job == job.name, Failure.row_key == row_key_sql(job))
    held_back = select(literal(1)).where(of_this_row, _held_back()).limit(1).scalar_subquery()
    stmt = (
        # Labelled: the same expression sits in the subquery, and an unlabelled twin confuses
        # the ORM's result mapping once the compiled statement comes from SQLAlchemy's cache.
        select(job.model, row_key_sql(job).label("batchjobs_row_key"))
        .where(job.pending(), held_back.is_(None))
        .order_by(job.primary_key)
        .limit(bindparam("limit", type_=Integer()))
    )
    return dialect.lock_for_claim(stmt, job.table)


def failure_states(
    session: Session, dialect: Dialect, job: FlagJob, keys: Sequence[str], now: datetime, run_started: datetime
) -> dict[str, tuple[int, bool]]:
    """For claimed rows that have a failure record: row key -> (attempts so far, held back).

    Run right after the claim, as its own statement: under READ COMMITTED it sees every failure
    committed before this transaction got the row locks, including one recorded by another runner
    after the claim's snapshot was taken. Skipping rows held back here means a row is never
    attempted twice by overlapping runs before its backoff has passed.
    """
    if not keys:
        return {}
    rows = session.execute(
        select(Failure.row_key, Failure.attempts, _held_back()).where(
            Failure.job == job.name, dialect.key_in(Failure.row_key, keys)
        ),
        {"now": now, "run_started": run_started},
    )
    return {key: (attempts, bool(held)) for key, attempts, held in rows}


def mark_done(session: Session, dialect: Dialect, job: FlagJob, keys: Sequence[Any], now: datetime) -> None:
    """Set the flag (and ``done_at``) on these rows: one UPDATE for the whole chunk."""
    if keys:
        session.execute(update(job.table).where(dialect.key_in(job.primary_key, keys)).values(job.done_values(now)))
