"""Chunk statements sent straight to the database driver, for the run loop's hot path.

A chunk of plain rows costs three statements of batchjobs' own (claim, failure re-check, mark
done). Executed through SQLAlchemy, each paid about as much client time again for SQLAlchemy's
per-execution work (execution context, parameter and result processing, events) as for the
driver's: the statements themselves never change within a run, so that work repeats the same
answer on every chunk. A direct :class:`Statement` is compiled once, keeps what SQLAlchemy would
do to the values (the column types' bind and result processors), and sends the compiled SQL
through the DBAPI cursor of the chunk's own connection, in the chunk's own transaction.

What it does not do is fire SQLAlchemy's execution events or log SQL, so a run uses it only where
nobody would notice (see :func:`direct_allowed`): with SQL logging or cursor-execute listeners on
the engine (echo, tracing), every statement goes through SQLAlchemy as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy import Dialect as SQLADialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable

_Processor = Callable[[Any], Any]


def direct_allowed(engine: Engine) -> bool:
    """Whether statements on ``engine`` may bypass SQLAlchemy: nothing logs or observes them."""
    dispatch = engine.dispatch
    observed = bool(dispatch.before_cursor_execute) or bool(dispatch.after_cursor_execute)
    return not observed and not engine.logger.isEnabledFor(logging.INFO)


class Statement:
    """One of a chunk's statements, built once per run and executed once per chunk.

    Without ``direct_to`` it is executed through SQLAlchemy. With a dialect in ``direct_to`` it is
    compiled for it on first use and sent straight to the driver; the statement must then need no
    per-execution rendering (no expanding or literal-execute parameters).
    """

    def __init__(self, statement: Executable, direct_to: SQLADialect | None = None) -> None:
        self.statement = statement
        self.direct_to = direct_to
        self._compiled: _Compiled | None = None

    def _direct(self) -> _Compiled | None:
        if self._compiled is None and self.direct_to is not None:
            self._compiled = _Compiled(self.statement, self.direct_to)
        return self._compiled

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> Sequence[Any]:
        """Execute and fetch every row (tuples, or SQLAlchemy Rows, which behave as tuples)."""
        direct = self._direct()
        if direct is None:
            return connection.execute(self.statement, params).all()
        return direct.rows(connection, params)

    def run(self, connection: Connection, params: Mapping[str, Any]) -> None:
        """Execute a statement that returns no rows."""
        direct = self._direct()
        if direct is None:
            connection.execute(self.statement, params)
        else:
            direct.execute(connection, params).close()


class _Compiled:
    """A statement compiled once, with what SQLAlchemy would do to its values at each execution."""

    def __init__(self, stmt: Executable, dialect: SQLADialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("a direct statement cannot render its parameters per execution")
        self.dialect = dialect
        self.sql = compiled.string
        # Values the statement carries itself (a job name in a WHERE clause); the rest are bound
        # by name at each execution.
        self.fixed = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}
        self.bind_processors: dict[str, _Processor] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self.bind_processors[name] = process
        self.result_types = [column.type for column in getattr(stmt, "selected_columns", ())]
        # Result processors depend on the driver's type codes, known after the first execution.
        self.result_processors: list[_Processor | None] | None = None

    def execute(self, connection: Connection, params: Mapping[str, Any]) -> Any:
        """Execute on the connection's DBAPI cursor; returns the cursor."""
        values = {**self.fixed, **params}
        for name, process in self.bind_processors.items():
            values[name] = process(values[name])
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.sql, values)
        except self.dialect.loaded_dbapi.Error as error:
            # Raised as SQLAlchemy would raise it, so callers catch one kind of error either way.
            lost = self.dialect.is_disconnect(error, dbapi_connection, cursor)
            if lost:
                connection.invalidate(error)
            raise DBAPIError.instance(
                self.sql,
                values,
                error,
                self.dialect.loaded_dbapi.Error,
                hide_parameters=connection.engine.hide_parameters,
                connection_invalidated=lost,
                dialect=self.dialect,
            ) from error
        return cursor

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        cursor = self.execute(connection, params)
        rows = cursor.fetchall()
        if self.result_processors is None:
            self.result_processors = [
                type_.dialect_impl(self.dialect).result_processor(self.dialect, column[1])
                for type_, column in zip(self.result_types, cursor.description)
            ]
        cursor.close()
        processors = self.result_processors
        if not any(processors):
            return rows  # type: ignore[no-any-return]
        return [tuple(value if p is None else p(value) for p, value in zip(processors, row)) for row in rows]
