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

from sqlalchemy import ColumnElement, Engine, bindparam, not_, select, text, true
from sqlalchemy.exc import DBAPIError
from sqlalchemy.types import NullType

from batchjobs.db import connect, ensure_schema
from batchjobs.errors import BatchJobsError
from batchjobs.registry import FlagJob, Registry, parse_key, pending_condition
from batchjobs.store import store_for
from batchjobs.store.base import advance
from batchjobs.timeutil import check_seconds, utcnow

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
            raise BatchJobsError("choose exactly one selection: keys, a key range, a where clause or every row")
        pk = job.primary_key
        if self.keys:
            return pk.in_([parse_key(pk, key) for key in self.keys])
        if self.id_range is not None:
            low, high = (parse_key(pk, end) for end in self.id_range)
            # Text keys are left to the database: its collation, not Python's, orders them.
            if not isinstance(low, str) and low > high:
                first, last = self.id_range
                raise BatchJobsError(
                    f"the key range {first}:{last} is empty: its first key is above its last (write {last}:{first})"
                )
            return pk.between(low, high)
        if self.where is not None:
            return self._where()
        return true()

    def _where(self) -> ColumnElement[bool]:
        """The raw SQL of ``where``, parenthesised and with every placeholder bound.

        Raw SQL by design: admins know their tables. Values are bound, never pasted in, and left
        untyped so the database reads '15' as a number next to an integer column.
        """
        assert self.where is not None
        if not self.where.strip():
            raise BatchJobsError("the where clause is empty; to select every row, select everything")
        # Parentheses, so "a OR b" stays one condition next to batchjobs' own "AND ...".
        clause = text(f"({self.where})")
        names = set(clause.compile().params)
        missing = sorted(names - set(self.params))
        if missing:
            raise BatchJobsError(f"the where clause uses :{', :'.join(missing)}; give each a value")
        unused = sorted(set(self.params) - names)
        if unused:
            raise BatchJobsError(f"a value is given for {', '.join(unused)}, but the where clause has no :{unused[0]}")
        binds = [bindparam(name, value, type_=NullType()) for name, value in self.params.items()]
        return clause.bindparams(*binds)  # type: ignore[return-value]


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


def preview_change(
    registry: Registry, engine: Engine, job: str, selection: Selection, action: str, sample_size: int = 10
) -> Preview:
    """Count the rows ``action`` would change, without changing anything."""
    flag_job = registry.job(job)
    changes, _ = _plan(flag_job, action, utcnow())
    condition = selection.clause(flag_job) & changes
    store = store_for(engine)
    with connect(store.engine) as connection:
        count = store.count_rows(connection, select(flag_job.primary_key).where(condition))
        sample = store.row_keys(connection, flag_job, condition, sample_size)
    return Preview(rows=count, sample=[str(key) for key, _ in sample])


@dataclass
class ChangeResult:
    """What :func:`change_rows` did: rows changed, failure records cleared, chunks committed."""

    rows: int = 0
    failures_cleared: int = 0
    chunks: int = 0


def change_rows(
    registry: Registry,
    engine: Engine,
    job: str,
    selection: Selection,
    action: str,
    *,
    chunk_size: int = 5000,
    lock_timeout: float = 5.0,
    progress: Callable[[int], None] | None = None,
) -> ChangeResult:
    """Mark the selected rows done, or requeue them; clears their failure records either way.

    Commits each chunk as it goes. A requeued row is eligible at once (its backoff and dead
    state are forgotten); a row marked done no longer shows up as failing.
    """
    flag_job = registry.job(job)
    if chunk_size < 1:
        raise BatchJobsError(f"chunk size must be at least 1, got {chunk_size}")
    check_seconds(lock_timeout, "lock timeout")
    store = store_for(engine)
    ensure_schema(store.engine)
    chosen = selection.clause(flag_job)
    result = ChangeResult()
    cursor: Any = None
    while True:
        changes, values = _plan(flag_job, action, utcnow())
        # For mark-done only pending rows can change, and so the walk rides the partial pending index.
        walked = chosen & changes if action == "mark-done" else chosen
        for attempt in range(1, LOCK_RETRIES + 1):
            try:
                with store.claiming().begin() as connection:
                    store.limit_lock_wait(connection, lock_timeout)
                    rows = store.row_keys(connection, flag_job, walked, chunk_size, after=cursor)
                    if not rows:
                        return result
                    keys = [key for key, _ in rows]
                    changed = store.update_rows(connection, flag_job, keys, changes, values)
                    cleared = store.clear_failures(connection, flag_job.name, [row_key for _, row_key in rows])
                break
            except DBAPIError as exc:
                if not store.is_lock_timeout(exc):
                    raise
                if attempt == LOCK_RETRIES:
                    after = f"after key {cursor}" if cursor is not None else "at the start"
                    raise BatchJobsError(
                        f"rows {after} stayed locked longer than {lock_timeout:g}s, {LOCK_RETRIES} times; "
                        f"{result.rows} rows were changed so far: run the command again to continue"
                    ) from None
                time.sleep(0.1 * attempt)
        result.rows += changed
        result.failures_cleared += cleared
        result.chunks += 1
        cursor = advance(cursor, keys[-1], store.walk_order(flag_job.primary_key))
        if progress is not None:
            progress(len(keys))
