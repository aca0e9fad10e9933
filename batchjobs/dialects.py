"""Everything that differs between databases lives here, so the run loop never asks which one it has.

PostgreSQL (production): claims lock rows with ``FOR NO KEY UPDATE SKIP LOCKED``, so any number of
runners on any number of hosts take disjoint rows, and inserts into tables that reference a claimed
row are not blocked.

SQLite (embedded default, one host): there are no row locks, so a claiming transaction takes the
database write lock up front with ``BEGIN IMMEDIATE``; overlapping runners wait their turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Dialect as SQLADialect
from sqlalchemy import ColumnElement, Engine, Select, String, Table, any_, bindparam, cast, event, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from batchjobs.errors import BatchJobsError

# SQLAlchemy's dialect modules (sqlalchemy.dialects.postgresql, .sqlite) are imported where they
# are used: a cron tick on one database would otherwise import the other's, 10 to 35 ms.

# Execution option that marks a connection as one that claims rows (see SQLite.configure_engine).
_CLAIMS = "batchjobs_claims"

#: The parameter :meth:`Dialect.key_in` binds; prefixed so that it cannot clash with a column name.
KEYS = "batchjobs_keys"


class Dialect:
    """The database-specific parts of batchjobs."""

    name = ""

    #: Whether a run may send its chunk statements straight to the driver (see batchjobs.direct).
    direct_statements = False

    def configure_engine(self, engine: Engine) -> None:
        """Install connection-level settings on an engine batchjobs created."""

    def adopt(self, engine: Engine) -> Engine:
        """An engine batchjobs can use for the database of an engine the app created itself."""
        return engine

    def claiming(self, engine: Engine) -> Engine:
        """The engine to open claiming transactions on."""
        return engine

    def lock_for_claim(self, stmt: Select[Any], table: Table) -> Select[Any]:
        """Make a SELECT of pending rows take them for this transaction only."""
        return stmt

    def key_in(self, column: ColumnElement[Any]) -> ColumnElement[bool]:
        """``column IN (...)`` for a chunk's worth of keys, bound as ``{KEYS: key_list(...)}``."""
        return column.in_(bindparam(KEYS, expanding=True))

    def key_list(self, column: ColumnElement[Any], keys: Iterable[Any], bound: SQLADialect) -> Any:
        """The value to bind to :meth:`key_in`'s parameter, for a connection of dialect ``bound``."""
        return list(keys)

    def insert(self, table: Table) -> Insert:
        """An INSERT that supports ``on_conflict_do_update``."""
        raise NotImplementedError

    def limit_lock_wait(self, session: Session, seconds: float) -> None:
        """Make this transaction give up after waiting ``seconds`` for a lock another holds."""

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        """Whether ``error`` means a lock wait ran out (worth retrying), not a real failure."""
        return False

    def in_failed_transaction(self, dbapi_connection: Any) -> bool:
        """Whether a statement failed and the transaction refuses more until rolled back."""
        return False

    def cancel_running_statement(self, dbapi_connection: Any) -> bool:
        """From a signal handler: cancel the statement the driver is waiting on, if there is one.

        Returns False when no statement is in flight, so raising in Python code is safe.
        """
        return False


class PostgreSQL(Dialect):
    name = "postgresql"
    # Its chunk statements bind each chunk's keys as one JSON parameter (see key_in), so their
    # SQL text never changes. SQLite's are expanding IN lists, rendered anew for every chunk.
    direct_statements = True

    def claiming(self, engine: Engine) -> Engine:
        # SKIP LOCKED and the failure re-check after locking rely on each statement seeing what
        # committed before it; a database defaulting to REPEATABLE READ would break both.
        return engine.execution_options(isolation_level="READ COMMITTED")

    def lock_for_claim(self, stmt: Select[Any], table: Table) -> Select[Any]:
        # key_share=True renders FOR NO KEY UPDATE: foreign-key inserts pointing at the row go on.
        return stmt.with_for_update(key_share=True, skip_locked=True, of=table)

    def insert(self, table: Table) -> Insert:
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)

    def key_in(self, column: ColumnElement[Any]) -> ColumnElement[bool]:
        # One parameter instead of a hundred, so the statement text is the same for every chunk.
        # It is JSON text rather than an array: psycopg dumps a list element by element in Python,
        # which cost more than everything else in the statement; a string is passed through as is.
        # = ANY(ARRAY(...)) rather than IN (SELECT ...): the planner probes an index with each key
        # instead of considering a hash join over every row of the table.
        from sqlalchemy.dialects.postgresql import JSON

        elements = func.json_array_elements_text(cast(bindparam(KEYS, type_=String()), JSON))
        keys = select(cast(elements.table_valued("value").c.value, column.type)).scalar_subquery()
        return column == any_(func.array(keys))

    def key_list(self, column: ColumnElement[Any], keys: Iterable[Any], bound: SQLADialect) -> Any:
        # The column type's own conversion first, as for any parameter: a UUID stored as 32 hex
        # digits, a TypeDecorator or an Enum is sent as the database stores it. default=str then
        # writes what JSON has no type for (UUIDs, dates, decimals) as text PostgreSQL casts back.
        process = column.type.dialect_impl(bound).bind_processor(bound)
        return json.dumps([process(key) for key in keys] if process else list(keys), default=str)

    def limit_lock_wait(self, session: Session, seconds: float) -> None:
        session.execute(text(f"SET LOCAL lock_timeout = '{int(seconds * 1000)}ms'"))

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        return getattr(error.orig, "sqlstate", None) == "55P03"  # lock_not_available

    def in_failed_transaction(self, dbapi_connection: Any) -> bool:
        from psycopg import pq

        return bool(dbapi_connection.pgconn.transaction_status == pq.TransactionStatus.INERROR)

    def cancel_running_statement(self, dbapi_connection: Any) -> bool:
        # psycopg waits for results in Python, so an exception raised there would leave the
        # connection mid-exchange. libpq's cancel request is made for signal handlers: the
        # statement fails with QueryCanceled and the connection stays usable.
        from psycopg import pq

        if dbapi_connection.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            return False
        dbapi_connection.cancel()
        return True


class SQLite(Dialect):
    name = "sqlite"

    def configure_engine(self, engine: Engine) -> None:
        # pysqlite's own transaction handling cannot BEGIN IMMEDIATE, so batchjobs emits BEGIN
        # itself (the recipe from SQLAlchemy's SQLite documentation).
        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # Wait for another runner's chunk instead of failing with "database is locked".
            cursor.execute("PRAGMA busy_timeout = 60000")
            # WAL lets status queries and the app read while a chunk holds the write lock.
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_CLAIMS) else "BEGIN")

    def adopt(self, engine: Engine) -> Engine:
        # The app's engine may run its own BEGIN recipe; batchjobs gets an engine of its own on
        # the same file. An in-memory database exists only in that engine, so it is used as is
        # (no other process can see it, so there is nobody to take the write lock from).
        if engine.url.database in (None, "", ":memory:") or "mode=memory" in str(engine.url):
            return engine
        from sqlalchemy import create_engine

        adopted = create_engine(engine.url)
        self.configure_engine(adopted)
        return adopted

    def claiming(self, engine: Engine) -> Engine:
        return engine.execution_options(**{_CLAIMS: True})

    def insert(self, table: Table) -> Insert:
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table)

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        # The busy timeout set on connect ran out.
        return "database is locked" in str(error.orig)


_DIALECTS: dict[str, Dialect] = {d.name: d for d in (PostgreSQL(), SQLite())}


def dialect_for(engine: Engine) -> Dialect:
    """The batchjobs dialect for an engine, or a clear error for an unsupported database."""
    try:
        return _DIALECTS[engine.dialect.name]
    except KeyError:
        raise BatchJobsError(
            f"batchjobs supports PostgreSQL and SQLite; this database is {engine.dialect.name}"
        ) from None
