"""The statements a chunk is made of: claim pending rows, look at their failure records, mark done."""

from __future__ import annotations

from collections import namedtuple
from datetime import datetime
from typing import Any, Sequence

from sqlalchemy import (
    Connection,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    cast,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import Dialect as SQLADialect
from sqlalchemy.orm import Session

from batchjobs.dialects import KEYS, Dialect
from batchjobs.direct import Statement
from batchjobs.registry import FlagJob
from batchjobs.schema import Failure, UTCDateTime

#: Label of the row key the claim computes beside each row.
ROW_KEY = "batchjobs_row_key"


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


#: Bound to the key a keyset claim continues after.
AFTER = "batchjobs_after"


def claim_statement(job: FlagJob, dialect: Dialect, limit: int, *, keyset: bool = False) -> Select[Any]:
    """Select up to ``limit`` pending rows that are not held back, locked for this transaction.

    Rows come as the job's model instance (or its ``columns``) followed by the row key. The key
    is computed by the database, the same expression the failure lookups use, so both agree for
    every key type (a UUID is text with hyphens on PostgreSQL, 32 hex digits on SQLite). Execute
    with ``now`` and ``run_started``; with ``keyset``, also with ``batchjobs_after``: only rows
    with a greater primary key are claimed.

    The failure check is a scalar subquery on purpose: PostgreSQL turns NOT EXISTS into an
    anti-join, and a hash anti-join loses the index order, so with stale statistics it would
    sort every pending row on every claim. A scalar subquery is looked up per row through the
    failure table's primary key while the partial pending index is walked in key order, and the
    walk stops after ``limit`` rows: O(pending + failing) at worst, never O(table).

    It is tested with IS NOT TRUE, not IS NULL: the planner guesses that IS NULL on a subquery
    keeps 0.5% of rows, so it would expect to walk the whole pending index to find ``limit``
    rows, and past ``jit_above_cost`` it JIT-compiles every claim (milliseconds each). IS NOT TRUE
    gets the neutral guess of one half, which keeps the estimate near the real cost.

    The limit is part of the SQL text, not a parameter: for an unknown limit PostgreSQL's generic
    plan expects a long walk, so it would plan every claim afresh.
    """
    # No LIMIT 1 needed: (job, row_key) is the failure table's primary key.
    of_this_row = and_(Failure.job == job.name, Failure.row_key == row_key_sql(job))
    held_back = select(true()).where(of_this_row, _held_back()).scalar_subquery()
    # Table columns, not mapped attributes, for plain rows: the ORM stays out of that path.
    loaded = list(job.columns) if job.columns else [job.model]
    stmt = (
        # Labelled: the same expression sits in the subquery, and an unlabelled twin confuses
        # the ORM's result mapping once the compiled statement comes from SQLAlchemy's cache.
        select(*loaded, row_key_sql(job).label(ROW_KEY))
        .where(job.pending(), held_back.is_not(true()))
        .order_by(job.primary_key)
        .limit(literal_column(str(int(limit)), Integer()))
    )
    if keyset:
        stmt = stmt.where(job.primary_key > bindparam(AFTER, type_=job.primary_key.type))
    return dialect.lock_for_claim(stmt, job.table)


class ChunkStatements:
    """One job's chunk statements, built once per run and executed with each chunk's values.

    Building a statement and its cache key costs more than handling a small chunk of rows, so
    every value that changes between chunks is a bound parameter.
    """

    def __init__(self, job: FlagJob, dialect: Dialect, limit: int, direct_to: SQLADialect | None = None) -> None:
        self.job = job
        self.dialect = dialect
        # Looked up once: reading it means a mapper lookup, and it is needed for every chunk.
        self.pk_attr = job.primary_key_attr
        # With ``direct_to``, the statements go straight to the driver (see batchjobs.direct);
        # ORM objects are always loaded through the chunk's session.
        self.claim = Statement(claim_statement(job, dialect, limit), direct_to)
        self.claim_after = Statement(claim_statement(job, dialect, limit, keyset=True), direct_to)
        self.failures = Statement(
            select(Failure.row_key, Failure.attempts, _held_back()).where(
                Failure.job == job.name, dialect.key_in(Failure.row_key)
            ),
            direct_to,
        )
        self.mark = Statement(
            update(job.table)
            .where(dialect.key_in(job.primary_key))
            .values({c.name: bindparam(f"batchjobs_done_{c.name}", type_=c.type) for c in job.done_columns}),
            direct_to,
        )
        # Plain rows are named tuples: as cheap as the driver's tuples, readable as row.email.
        self.record = namedtuple(f"{job.model.__name__}Row", job.fields) if job.columns else None  # type: ignore[misc]

    def claim_rows(
        self, connection: Connection, session: Session | None, now: datetime, run_started: datetime, after: Any = None
    ) -> list[tuple[Any, str]]:
        """Lock pending rows: (row for the handler, row key) pairs, in key order.

        ORM objects are loaded into ``session``; plain rows come straight from ``connection``.
        With ``after`` (a primary-key value), only rows with a greater key are claimed.
        """
        params = {"now": now, "run_started": run_started}
        claim = self.claim
        if after is not None:
            params[AFTER] = after
            claim = self.claim_after
        if self.record is None:
            assert session is not None, "ORM objects are loaded into a session"
            return [(row, key) for row, key in session.execute(claim.statement, params).all()]
        make = self.record._make
        return [(make(values[:-1]), values[-1]) for values in claim.rows(connection, params)]

    def failure_states(
        self, connection: Connection, keys: Sequence[str], now: datetime, run_started: datetime
    ) -> dict[str, tuple[int, bool]]:
        """For claimed rows that have a failure record: row key -> (attempts so far, held back).

        Run right after the claim, as its own statement: under READ COMMITTED it sees every failure
        committed before this transaction got the row locks, including one recorded by another
        runner after the claim's snapshot was taken. Skipping rows held back here means a row is
        never attempted twice by overlapping runs before its backoff has passed.
        """
        keys_param = self.dialect.key_list(Failure.row_key, keys, connection.dialect)
        params = {KEYS: keys_param, "now": now, "run_started": run_started}
        rows = self.failures.rows(connection, params)
        return {key: (attempts, bool(held)) for key, attempts, held in rows}

    def mark_done(self, connection: Connection, keys: Sequence[Any], now: datetime) -> None:
        """Set the flag (and ``done_at``) on these rows: one UPDATE for the whole chunk."""
        if keys:
            done = {f"batchjobs_done_{name}": value for name, value in self.job.done_values(now).items()}
            keys_param = self.dialect.key_list(self.job.primary_key, keys, connection.dialect)
            self.mark.run(connection, {KEYS: keys_param, **done})
