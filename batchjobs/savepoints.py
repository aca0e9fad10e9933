"""Handlers inside the chunk's transaction: a session they cannot commit, and savepoints that cost nothing until used."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, SessionTransaction

from batchjobs.errors import BatchJobsError
from batchjobs.registry import FlagJob, JobContext
from batchjobs.store import Store
from batchjobs.timeouts import JobTimeout, TimeLimit

Instance = TypeVar("Instance")


class ChunkSession(Session):
    """The chunk's session, as handlers see it through ``ctx.session``.

    Committing, rolling back or closing it inside a handler would release the chunk's row locks
    (another run could take the same rows) or undo rows already handled, so it is refused.
    """

    in_handler = False
    #: Set when objects are added, merged or deleted (one at a time or several): with the
    #: identity map's own flag for changed attributes, what tells that a handler left something
    #: to flush. Cheaper than asking ``session.new`` and ``session.deleted``, which build a set
    #: on every call.
    changed = False

    def add(self, instance: object, *args: Any, **kwargs: Any) -> None:
        self.changed = True
        super().add(instance, *args, **kwargs)

    def add_all(self, instances: Iterable[object]) -> None:
        self.changed = True
        super().add_all(instances)

    def merge(self, instance: Instance, *args: Any, **kwargs: Any) -> Instance:
        self.changed = True
        return super().merge(instance, *args, **kwargs)

    def delete(self, instance: object) -> None:
        self.changed = True
        super().delete(instance)

    # SQLAlchemy 2.1's, which do not go through merge() and delete().

    def merge_all(self, instances: Iterable[Instance], *args: Any, **kwargs: Any) -> Sequence[Instance]:
        self.changed = True
        return super().merge_all(instances, *args, **kwargs)

    def delete_all(self, instances: Iterable[object]) -> None:
        self.changed = True
        super().delete_all(instances)

    def _refuse(self, what: str) -> None:
        if self.in_handler:
            raise BatchJobsError(f"handlers must not {what} the session: batchjobs commits the chunk itself")

    def commit(self) -> None:
        self._refuse("commit")
        super().commit()

    def rollback(self) -> None:
        self._refuse("roll back")
        super().rollback()

    def close(self) -> None:
        self._refuse("close")
        super().close()


class StatementCounter:
    """Watches the statements on one connection: how many were sent (to tell whether a handler
    used the database), and whether one is waiting for the server right now (to cancel it).

    Listening costs every statement on the connection SQLAlchemy's event dispatch, so it starts
    only once it is needed: at once where the store cannot tell by itself whether a statement is
    in flight (see :attr:`Store.sees_statement_in_flight`), else when a handler with a session
    first runs.
    """

    def __init__(self, connection: Connection, store: Store) -> None:
        self.connection = connection
        self.count = 0
        #: Set while a statement is with the driver, once watching; an error leaves it set until the
        #: next one. A store that sees for itself whether a statement is in flight ignores it.
        self.in_flight = False
        self.watching = False
        if not store.sees_statement_in_flight:
            self.watch()

    def watch(self) -> None:
        """Count from now on (once started, it stays)."""
        if not self.watching:
            self.watching = True
            event.listen(self.connection, "before_cursor_execute", self._sent)
            event.listen(self.connection, "after_cursor_execute", self._answered)

    def _sent(self, *_args: Any) -> None:
        self.count += 1
        self.in_flight = True

    def _answered(self, *_args: Any) -> None:
        self.in_flight = False


class HandlerCalls:
    """Calls a chunk's handlers, each in a savepoint, without paying for one per row.

    SQLAlchemy sends SAVEPOINT only once a handler uses the connection, but its bookkeeping for
    each nested transaction still costs more than a handler that sends an email. So handlers
    share one nested transaction for as long as they leave the database and the session alone;
    the first one that touches either gets its changes released (or, if it fails, rolled back)
    right after it returns. A failure therefore never undoes an earlier row's writes, and a
    chunk of handlers that do not write costs no savepoint at all. Handlers of plain rows
    (``columns=``) that take no ctx run with no session, and skip all of this.
    """

    def __init__(
        self, store: Store, job: FlagJob, session: ChunkSession | None, connection: Connection, statements: StatementCounter
    ) -> None:
        self.store = store
        self.job = job
        # None for handlers that cannot reach the chunk's transaction: they need no savepoint.
        self.session = session
        self.dbapi_connection = connection.connection.dbapi_connection
        self.statements = statements
        if session is not None:
            statements.watch()  # whether a handler used the database decides on its savepoint
        self.savepoint: SessionTransaction | None = None

    def call(self, rows: Any, ctx: JobContext | None) -> BaseException | None:
        """Run the handler; return the exception it raised (its changes undone), if any."""
        job, session = self.job, self.session
        if session is not None and self.savepoint is None:
            self.savepoint = session.begin_nested()
        limit = TimeLimit(job.timeout, self.store, self.dbapi_connection, self.statements) if job.timeout else None
        executed = self.statements.count
        self.statements.in_flight = False  # between handlers, nothing is with the driver
        try:
            if session is not None:
                session.in_handler, session.changed = True, False
            try:
                if limit is None:
                    job.call(rows, ctx)
                else:
                    with limit:
                        job.call(rows, ctx)
            finally:
                if session is not None:
                    session.in_handler = False
            if limit is not None and limit.expired:
                raise limit.error()  # the handler swallowed the cancelled statement's error
            # What a handler that only read leaves empty. check_modified() is the identity map's
            # own flag for objects with changed attributes: unlike session.dirty it does not
            # compare every modified object's history, and a no-op change only costs a flush.
            if session is not None and (
                self.statements.count != executed or session.identity_map.check_modified() or session.changed
            ):
                session.flush()
                if self.store.in_failed_transaction(self.dbapi_connection):
                    # The handler caught a database error and carried on; PostgreSQL refuses all
                    # further statements until the savepoint is rolled back, so this row failed.
                    raise BatchJobsError("the handler went on after a database error; its changes were rolled back")
                assert self.savepoint is not None
                self.savepoint.commit()
                self.savepoint = None
        except (JobTimeout, Exception) as exc:  # noqa: BLE001 - a handler may raise anything; it is recorded
            savepoint, self.savepoint = self.savepoint, None
            if savepoint is not None:
                savepoint.rollback()
            # A statement cancelled by the time limit surfaces as a driver error: call it a timeout.
            return limit.error() if limit is not None and limit.expired and not isinstance(exc, JobTimeout) else exc
        return None

    def finish(self) -> None:
        """Release the shared savepoint, if the last handlers left one open."""
        if self.savepoint is not None:
            self.savepoint.commit()
            self.savepoint = None
