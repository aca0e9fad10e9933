"""SQLite (embedded default, one host): what batchjobs does differently there.

There are no row locks, so a claiming transaction takes the database write lock up front with
``BEGIN IMMEDIATE``; overlapping runners wait their turn.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Engine, Table, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert

from batchjobs.store.base import Store

# Execution option that marks a connection as one that claims rows (see configure).
_CLAIMS = "batchjobs_claims"


class SQLiteStore(Store):
    name = "sqlite"
    # SQLite alters little in place: alembic copies a table to change it.
    render_as_batch = True

    @classmethod
    def configure(cls, engine: Engine, *, connect_timeout: float | None = None) -> None:
        # pysqlite's own transaction handling cannot BEGIN IMMEDIATE, so batchjobs emits BEGIN
        # itself (the recipe from SQLAlchemy's SQLite documentation).
        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # Wait for another runner's chunk instead of failing with "database is locked".
            cursor.execute("PRAGMA busy_timeout = 60000")
            # WAL lets status queries and the app read while a chunk holds the write lock.
            if not _in_memory(engine):
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_CLAIMS) else "BEGIN")

    @classmethod
    def adopt(cls, engine: Engine) -> Engine:
        # The app's engine may run its own BEGIN recipe, so batchjobs works through an engine of
        # its own on the same database, derived from the app's: its pool is a copy of the app's
        # (same creator, connect arguments, pool settings and pool listeners). An in-memory
        # database exists only in the app's engine, so it is used as is (no other process can
        # see it, so there is nobody to take the write lock from).
        if _in_memory(engine):
            return engine
        from sqlalchemy import create_engine

        adopted = create_engine(engine.url, pool=engine.pool.recreate())
        cls.configure(adopted)
        return adopted

    def claiming(self) -> Engine:
        return self.engine.execution_options(**{_CLAIMS: True})

    def upsert(self, table: Table) -> Insert:
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table)

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        # The busy timeout set on connect ran out.
        return "database is locked" in str(error.orig)

    def is_schema_error(self, error: DBAPIError) -> bool:
        # sqlite3 raises these as OperationalError, as it does a locked database; only its message tells.
        return str(error.orig).startswith(("no such table:", "no such column:"))

    @classmethod
    def create_pending_index(cls, op: Any, name: str, table: str, key: str, pending: ColumnElement[bool]) -> None:
        op.create_index(name, table, [key], sqlite_where=pending)


def _in_memory(engine: Engine) -> bool:
    return engine.url.database in (None, "", ":memory:") or "mode=memory" in str(engine.url)
