"""Helpers for the app's own tests: run jobs synchronously, in-process, like Celery's eager mode.

Both helpers go through the production code path (claim, handler, mark done), only right away
and in the test's process. The database needs batchjobs' tables: call
``batchjobs.migrate(engine)`` (``from batchjobs import migrate``) in your test setup.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from batchjobs.errors import BatchJobsError
from batchjobs.registry import Registry
from batchjobs.runner import run_pending
from batchjobs.summary import RunSummary


def _engine(session_or_engine: Session | Engine) -> Engine:
    if isinstance(session_or_engine, Engine):
        return session_or_engine
    bind = session_or_engine.get_bind()
    engine = bind if isinstance(bind, Engine) else getattr(bind, "engine", None)
    if not isinstance(engine, Engine):
        raise BatchJobsError("the session must be bound to an engine")
    return engine


def drain(
    registry: Registry,
    session_or_engine: Session | Engine,
    jobs: Sequence[str] | None = None,
    queues: Sequence[str] | None = None,
    raise_errors: bool = False,
) -> RunSummary:
    """Handle every pending row of the chosen jobs now, and return what was done per job.

    Rows must be committed first: the run works on its own connection, as in production. With
    ``raise_errors`` the first handler exception propagates (after its failure is recorded).
    """
    return run_pending(
        registry,
        _engine(session_or_engine),
        jobs=jobs or (),
        queues=queues or (),
        record=False,
        raise_errors=raise_errors,
    )


@contextmanager
def eager(registry: Registry, session: Session) -> Iterator[None]:
    """While active, each commit of ``session`` that touched a job's table runs that job at once.

    Inserting a row, or flipping its flag back to pending, through the session (ORM objects or
    ``session.execute(insert/update(...))``) and committing is enough; a handler's exception
    propagates out of ``commit()``, so the test fails loudly.
    """
    by_table: dict[str, list[str]] = {}
    for job in registry.jobs.values():
        by_table.setdefault(job.table.name, []).append(job.name)
    touched: set[str] = set()

    def after_flush(session_: Session, _context: Any) -> None:
        for obj in [*session_.new, *session_.dirty]:
            table = getattr(type(obj), "__table__", None)
            if table is not None and table.name in by_table:
                touched.update(by_table[table.name])

    def on_execute(state: Any) -> None:
        if state.is_insert or state.is_update:
            table = getattr(state.statement, "table", None)
            if table is not None and getattr(table, "name", None) in by_table:
                touched.update(by_table[table.name])

    committed: set[str] = set()

    def after_commit(_session: Session) -> None:
        committed.update(touched)
        touched.clear()

    def after_transaction_end(session_: Session, transaction: Any) -> None:
        # Run once the transaction is fully closed, so the session stays usable if a handler
        # raises; only for the outermost transaction (not savepoints).
        if transaction.parent is None and committed:
            names = sorted(committed)
            committed.clear()
            drain(registry, session_, jobs=names, raise_errors=True)

    def after_rollback(_session: Session, _previous: Any) -> None:
        touched.clear()

    listeners: list[tuple[str, Any]] = [
        ("after_flush", after_flush),
        ("do_orm_execute", on_execute),
        ("after_commit", after_commit),
        ("after_transaction_end", after_transaction_end),
        ("after_soft_rollback", after_rollback),
    ]
    for name, listener in listeners:
        event.listen(session, name, listener)
    try:
        yield
    finally:
        for name, listener in listeners:
            event.remove(session, name, listener)
