"""Resumable one-off backfills: a function over every row of a query, in keyset chunks.

Each chunk is one transaction: lock the backfill's state row, load the next ``chunk_size`` rows
after the saved cursor (primary-key order), run the function, save the new cursor, commit. The
cursor commits with the chunk's own changes, so after a crash or Ctrl-C the next invocation
resumes exactly at the first chunk that did not commit: no committed chunk runs twice, no row is
skipped. The state-row lock makes two invocations of the same backfill take turns per chunk.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, Select, event
from sqlalchemy.orm import Session

from batchjobs.db import connection_for, ensure_schema
from batchjobs.errors import BatchJobsError
from batchjobs.registry import Backfill, BackfillContext, Registry, parse_key
from batchjobs.signals import StopRequest
from batchjobs.store import Store, store_for
from batchjobs.store.base import advance
from batchjobs.store.tables import BackfillState
from batchjobs.timeutil import utcnow

logger = logging.getLogger("batchjobs.backfill")

_DML = re.compile(r"^\s*(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+\"?([\w.]+)\"?", re.IGNORECASE)


@dataclass
class BackfillResult:
    """What one invocation did."""

    name: str
    status: str
    rows: int = 0
    chunks: int = 0
    total: int | None = None
    #: Dry run only: per table, per statement kind, the rows the first chunk would change.
    changes: dict[str, dict[str, int]] = field(default_factory=dict)


def _remaining(backfill: Backfill, cursor: Any) -> Select[Any]:
    """The rows of the backfill's query that the walk has not reached yet."""
    query = backfill.query.order_by(None)
    return query if cursor is None else query.where(backfill.primary_key > cursor)


def _cursor(backfill: Backfill, state: BackfillState | None) -> Any:
    return parse_key(backfill.primary_key, state.cursor) if state is not None and state.cursor is not None else None


def run_backfill(
    registry: Registry,
    engine: Engine,
    name: str,
    *,
    restart: bool = False,
    throttle: float = 0.0,
    stop: StopRequest | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> BackfillResult:
    """Run (or resume) a backfill until its query has no rows left, ``stop`` is set, or it fails.

    Each chunk commits with the saved position. ``restart`` starts over from the first row.
    ``throttle`` sleeps that many seconds between chunks, to leave the database room.
    ``progress`` is called after each committed chunk with (rows in the chunk, total rows
    expected, counted once at the start).
    """
    backfill = registry.get_backfill(name)
    store = store_for(engine)
    ensure_schema(store.engine)
    bind = store.claiming()
    stop = stop if stop is not None else StopRequest()
    pk_attr = backfill.primary_key_attr
    with Session(bind, expire_on_commit=False) as session, session.begin():
        state = store.backfill_state(session, name, lock=True)
        now = utcnow()
        if state is None:
            state = BackfillState(name=name, rows_done=0, started_at=now)
            session.add(state)
        if restart:
            state.cursor, state.rows_done, state.started_at = None, 0, now
        state.status, state.updated_at, state.finished_at, state.last_error = "running", now, None, None
        total = state.rows_done + store.count_rows(session, _remaining(backfill, _cursor(backfill, state)))
        state.total = total
    result = BackfillResult(name=name, status="running", total=total)
    ctx_logger = logger.getChild(name)
    while True:
        if stop:
            _set_status(store, name, "interrupted")
            result.status = "interrupted"
            return result
        try:
            with Session(bind, expire_on_commit=False, autoflush=False) as session, session.begin():
                state = store.backfill_state(session, name, lock=True)
                assert state is not None
                cursor = _cursor(backfill, state)
                rows = store.next_objects(session, backfill.query, backfill.primary_key, cursor, backfill.chunk_size)
                now = utcnow()
                if not rows:
                    state.status, state.finished_at, state.updated_at = "finished", now, now
                    result.status = "finished"
                    return result
                backfill.call(rows, BackfillContext(session=session, backfill=backfill, logger=ctx_logger))
                session.flush()
                state.cursor = str(advance(cursor, getattr(rows[-1], pk_attr), store.walk_order(backfill.primary_key)))
                state.rows_done += len(rows)
                state.updated_at = now
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            _set_status(store, name, "failed", error)
            logger.error("backfill %s failed: %s", name, error, exc_info=exc)
            raise BatchJobsError(
                f"backfill {name} failed after {result.rows} rows this run: {error.splitlines()[0]}; "
                "fix it and run again to resume at the failed chunk"
            ) from None
        result.rows += len(rows)
        result.chunks += 1
        if progress is not None:
            progress(len(rows), total)
        if throttle:
            time.sleep(throttle)


def _set_status(store: Store, name: str, status: str, error: str | None = None) -> None:
    with Session(store.claiming()) as session, session.begin():
        state = store.backfill_state(session, name, lock=True)
        if state is not None:
            state.status, state.updated_at, state.last_error = status, utcnow(), error


def dry_run_backfill(registry: Registry, engine: Engine, name: str, restart: bool = False) -> BackfillResult:
    """Run the next chunk (the first one with ``restart``) in a transaction that is rolled back; changes nothing.

    Changes are counted per table from the statements the chunk executes (the ORM's flush and
    anything the function runs itself), using the rows each statement reported.
    """
    backfill = registry.get_backfill(name)
    store = store_for(engine)
    ensure_schema(store.engine)
    changes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        match = _DML.match(statement)
        if match and cursor.rowcount and cursor.rowcount > 0:
            kind = match.group(1).split()[0].lower()
            changes[match.group(2)][kind] += cursor.rowcount

    with Session(store.engine, autoflush=False) as session:
        try:
            cursor = None if restart else _cursor(backfill, store.backfill_state(session, name))
            total = store.count_rows(session, _remaining(backfill, cursor))
            rows = store.next_objects(session, backfill.query, backfill.primary_key, cursor, backfill.chunk_size)
            connection = session.connection()
            event.listen(connection, "after_cursor_execute", count)
            try:
                backfill.call(rows, BackfillContext(session=session, backfill=backfill, logger=logger.getChild(name)))
                session.flush()
            finally:
                event.remove(connection, "after_cursor_execute", count)
        finally:
            session.rollback()
    return BackfillResult(
        name=name,
        status="dry run",
        rows=len(rows),
        chunks=1,
        total=total,
        changes={table: dict(kinds) for table, kinds in changes.items()},
    )


@dataclass(frozen=True)
class BackfillInfo:
    """One line of `batchjobs backfills`."""

    name: str
    registered: bool
    status: str
    rows_done: int
    total: int | None
    cursor: str | None
    started_at: str | None
    updated_at: str | None
    finished_at: str | None
    last_error: str | None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_backfills(registry: Registry, bind: Engine | Connection) -> list[BackfillInfo]:
    """Every backfill the registry defines or the database remembers, with where it got to. Reads only."""
    with connection_for(bind) as connection:
        states = {s.name: s for s in store_for(connection.engine).backfill_states(connection)}
    infos = []
    for name in sorted(set(registry.backfills) | set(states)):
        state = states.get(name)
        infos.append(
            BackfillInfo(
                name=name,
                registered=name in registry.backfills,
                status=state.status if state else "never run",
                rows_done=state.rows_done if state else 0,
                total=state.total if state else None,
                cursor=state.cursor if state else None,
                started_at=state.started_at.isoformat() if state else None,
                updated_at=state.updated_at.isoformat() if state else None,
                finished_at=state.finished_at.isoformat() if state and state.finished_at else None,
                last_error=state.last_error if state else None,
            )
        )
    return infos
