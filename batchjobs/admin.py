"""Admin changes to a job's rows: mark them done without running the handler, or requeue them.

Both walk the selection in keyset chunks on the primary key, one short transaction per chunk, so
the app keeps writing meanwhile: a row is locked for one chunk at most. Updates wait for row
locks (a run holding the row is finishing it) but only up to a lock timeout, and a chunk that
times out is retried. Running the same command again continues where it stopped: rows already
in the target state are not counted again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, bindparam, func, not_, select, text, true, update
from sqlalchemy.types import NullType
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from batchjobs.claim import row_key_sql
from batchjobs.db import ensure_schema, prepare
from batchjobs.dialects import KEYS
from batchjobs.errors import BatchJobsError
from batchjobs.failures import clear_failures, utcnow
from batchjobs.registry import FlagJob, parse_key, pending_condition

ACTIONS = ("mark-done", "requeue")
#: Above this many rows the CLI asks before changing anything (or needs --yes).
CONFIRM_ABOVE = 10_000
LOCK_RETRIES = 3


@dataclass(frozen=True)
class Selection:
    """Which rows of a job's table an admin command touches: exactly one kind of selection."""

    keys: tuple[str, ...] = ()
    id_range: tuple[str, str] | None = None
    where: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    everything: bool = False

    def clause(self, job: FlagJob) -> ColumnElement[bool]:
        given = [bool(self.keys), self.id_range is not None, self.where is not None, self.everything]
        if sum(given) != 1:
            raise BatchJobsError("choose exactly one selection: --row, --id-range, --where or --all")
        pk = job.primary_key
        if self.keys:
            return pk.in_([parse_key(pk, key) for key in self.keys])
        if self.id_range is not None:
            low, high = (parse_key(pk, end) for end in self.id_range)
            return pk.between(low, high)
        if self.where is not None:
            return self._where()
        return true()

    def _where(self) -> ColumnElement[bool]:
        """The raw SQL of ``--where``, parenthesised and with every placeholder bound.

        Raw SQL by design: admins know their tables. Values are bound, never pasted in, and left
        untyped so the database reads '15' as a number next to an integer column.
        """
        assert self.where is not None
        if not self.where.strip():
            raise BatchJobsError("--where is empty; to select every row say --all")
        # Parentheses, so "a OR b" stays one condition next to batchjobs' own "AND ...".
        clause = text(f"({self.where})")
        names = set(clause._bindparams)
        missing = sorted(names - set(self.params))
        if missing:
            raise BatchJobsError(f"--where uses :{', :'.join(missing)}; give a value with --param NAME=VALUE")
        unused = sorted(set(self.params) - names)
        if unused:
            raise BatchJobsError(f"--param {', '.join(unused)}: --where has no :{unused[0]} placeholder")
        binds = [bindparam(name, value, type_=NullType()) for name, value in self.params.items()]
        return clause.bindparams(*binds)  # type: ignore[return-value]


def parse_id_range(value: str) -> tuple[str, str]:
    """``A:B`` -> (A, B), both ends included."""
    low, sep, high = value.partition(":")
    if not sep or not low or not high:
        raise BatchJobsError(f"--id-range {value!r}: use FIRST:LAST, e.g. 1000:1999 (both included)")
    return low, high


def parse_params(values: tuple[str, ...]) -> dict[str, str]:
    """``name=value`` pairs for ``:name`` placeholders in --where."""
    params = {}
    for value in values:
        name, sep, bound = value.partition("=")
        if not sep or not name.isidentifier():
            raise BatchJobsError(f"--param {value!r}: use name=value, for a :name placeholder in --where")
        params[name] = bound
    return params


def _plan(job: FlagJob, action: str, now: datetime) -> tuple[ColumnElement[bool], dict[str, Any]]:
    """(rows that would change, the values that change them) for an action."""
    pending = pending_condition(job.flag)
    if action == "mark-done":
        return pending, job.done_values(now)
    if action == "requeue":
        values = job.pending_values()
        if job.done_at is not None and job.done_at.nullable:
            values[job.done_at.name] = None
        return not_(pending), values
    raise BatchJobsError(f"unknown action {action!r} (use one of: {', '.join(ACTIONS)})")


@dataclass(frozen=True)
class Preview:
    """What an admin command would do: how many rows change, a few of their keys."""

    rows: int
    sample: list[str]


def preview(engine: Engine, job: FlagJob, selection: Selection, action: str, sample_size: int = 10) -> Preview:
    """Count the rows ``action`` would change, without changing anything."""
    changes, _ = _plan(job, action, utcnow())
    condition = selection.clause(job) & changes
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(job.table).where(condition)).scalar_one()
        sample = conn.scalars(select(job.primary_key).where(condition).order_by(job.primary_key).limit(sample_size))
        return Preview(rows=int(count), sample=[str(key) for key in sample])


@dataclass
class ChangeResult:
    rows: int = 0
    failures_cleared: int = 0
    chunks: int = 0


def apply(
    engine: Engine,
    job: FlagJob,
    selection: Selection,
    action: str,
    *,
    chunk_size: int = 5000,
    lock_timeout: float = 5.0,
    progress: Callable[[int], None] | None = None,
) -> ChangeResult:
    """Mark the selected rows done, or requeue them; clears their failure records either way.

    A requeued row is eligible at once (its backoff and dead state are forgotten); a row marked
    done no longer shows up as failing.
    """
    if chunk_size < 1:
        raise BatchJobsError(f"chunk size must be at least 1, got {chunk_size}")
    if lock_timeout <= 0:
        # PostgreSQL reads a lock_timeout of 0 as "wait forever", the opposite of what it says.
        raise BatchJobsError("the lock timeout must be more than 0, e.g. 5s")
    engine, dialect = prepare(engine)
    ensure_schema(engine)
    bind = dialect.claiming(engine)
    chosen = selection.clause(job)
    pk = job.primary_key
    result = ChangeResult()
    cursor: Any = None
    while True:
        changes, values = _plan(job, action, utcnow())
        walk = select(pk, row_key_sql(job)).where(chosen).order_by(pk).limit(chunk_size)
        if action == "mark-done":
            # Only pending rows can change; this rides the partial pending index.
            walk = walk.where(changes)
        if cursor is not None:
            walk = walk.where(pk > cursor)
        for attempt in range(1, LOCK_RETRIES + 1):
            try:
                with Session(bind) as session, session.begin():
                    dialect.limit_lock_wait(session, lock_timeout)
                    rows = session.execute(walk).all()
                    if not rows:
                        return result
                    keys = [key for key, _ in rows]
                    changed = session.execute(
                        update(job.table).where(dialect.key_in(pk), changes).values(values),
                        {KEYS: dialect.key_list(pk, keys, session.get_bind().dialect)},
                    )
                    cleared = clear_failures(session, dialect, job, [row_key for _, row_key in rows])
                break
            except DBAPIError as exc:
                if not dialect.is_lock_timeout(exc):
                    raise
                if attempt == LOCK_RETRIES:
                    after = f"after key {cursor}" if cursor is not None else "at the start"
                    raise BatchJobsError(
                        f"rows {after} stayed locked longer than {lock_timeout:g}s, {LOCK_RETRIES} times; "
                        f"{result.rows} rows were changed so far: run the command again to continue"
                    ) from None
                time.sleep(0.1 * attempt)
        result.rows += int(changed.rowcount or 0)
        result.failures_cleared += cleared
        result.chunks += 1
        if cursor is not None and not keys[-1] > cursor:
            # Keyset order must move forward; anything else would walk the same rows forever.
            raise BatchJobsError(f"the selection did not move past key {cursor}; check --where")
        cursor = keys[-1]
        if progress is not None:
            progress(len(keys))
