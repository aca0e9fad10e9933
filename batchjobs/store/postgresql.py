"""PostgreSQL (production): every statement and psycopg detail batchjobs needs there.

Claims lock rows with ``FOR NO KEY UPDATE SKIP LOCKED``, so any number of runners on any number
of hosts take disjoint rows, and inserts into tables that reference a claimed row go on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Select, String, Table, any_, bindparam, cast, func, select, text
from sqlalchemy import Dialect as SQLADialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from batchjobs.store.base import KEYS, Store


class PostgreSQLStore(Store):
    name = "postgresql"
    schemes = ("postgres", "postgresql")
    # psycopg 3, which batchjobs depends on; a URL naming another driver keeps it.
    default_driver = "psycopg"

    def claiming(self) -> Engine:
        # SKIP LOCKED and the failure re-check after locking rely on each statement seeing what
        # committed before it; a database defaulting to REPEATABLE READ would break both.
        return self.engine.execution_options(isolation_level="READ COMMITTED")

    def lock_for_claim(self, stmt: Select[Any], table: Table) -> Select[Any]:
        # key_share=True renders FOR NO KEY UPDATE: foreign-key inserts pointing at the row go on.
        return stmt.with_for_update(key_share=True, skip_locked=True, of=table)

    def upsert(self, table: Table) -> Insert:
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

    def limit_lock_wait(self, connection: Connection | Session, seconds: float) -> None:
        connection.execute(text(f"SET LOCAL lock_timeout = '{int(seconds * 1000)}ms'"))

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

    @classmethod
    def add_flag_column(cls, op: Any, table: str, column: str, *, existing_done: bool) -> None:
        import sqlalchemy as sa

        if not existing_done:
            super().add_flag_column(op, table, column, existing_done=False)
            return
        # Adding a column with a constant default rewrites nothing (PostgreSQL 11+): existing
        # rows take the default at ADD time, instantly on any table size; then new rows get
        # "pending".
        op.add_column(table, sa.Column(column, sa.Boolean(), nullable=False, server_default=sa.true()))
        op.alter_column(table, column, server_default=sa.false())

    @classmethod
    def create_pending_index(cls, op: Any, name: str, table: str, key: str, pending: ColumnElement[bool]) -> None:
        # CONCURRENTLY, in an autocommit block: the app keeps writing while the index is built.
        with op.get_context().autocommit_block():
            op.create_index(name, table, [key], postgresql_where=pending, postgresql_concurrently=True)
