"""Chunk statements sent straight to the database driver, for the run loop's hot path.

A chunk of plain rows costs three statements of batchjobs' own (claim, failure re-check, mark
done), and their SQL never changes within a run. Executed through SQLAlchemy, each execution
repeated the same per-statement work (execution context, compiled-cache lookup, parameter and
result processing, events): going direct cut the client's instructions per drained plain row
from 27,900 to 20,000. A direct :class:`Statement` is compiled once per run, keeps what
SQLAlchemy does to the values (the column types' bind and result processors, its parameter
building and its error handling), and sends the compiled SQL through the DBAPI cursor of the
chunk's own connection, in the chunk's own transaction.

What it skips is SQLAlchemy's SQL logging and execution events, so a run uses it only where
nothing would miss them (see :func:`direct_allowed`): with echo, the ``sqlalchemy.engine`` logger
at INFO, or any execution listener (tracing tools install them), every statement goes through
SQLAlchemy as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import Connection, Select, Update
from sqlalchemy import Dialect as SQLADialect
from sqlalchemy.sql.compiler import SQLCompiler

_Processor = Callable[[Any], Any]


#: Execution events a direct statement would not fire: where any has a listener, nothing goes direct.
_EXECUTION_EVENTS = ("before_execute", "after_execute", "before_cursor_execute", "after_cursor_execute")


def direct_allowed(connection: Connection) -> bool:
    """Whether statements on ``connection`` may bypass SQLAlchemy: nothing logs, observes or rewrites them.

    Listeners are looked up on the connection itself, which sees those of its engine, of the
    engine it was derived from, and of the ``Engine`` and ``Connection`` classes.
    """
    dispatch = connection.dispatch
    observed = any(getattr(dispatch, name) for name in _EXECUTION_EVENTS) or connection.dialect.dispatch.do_execute
    # A schema translate map is applied when SQLAlchemy executes a statement, not when it compiles it.
    translated = connection.get_execution_options().get("schema_translate_map")
    return not observed and not translated and not connection.engine.logger.isEnabledFor(logging.INFO)


class Statement:
    """One of a chunk's statements, built once per run and executed once per chunk.

    Without ``direct_to`` it is executed through SQLAlchemy. With a dialect in ``direct_to`` it is
    compiled for it on first use and sent straight to the driver, unless SQLAlchemy does more at
    each execution than bind values: render SQL that depends on them (an expanding ``IN`` in a
    job's ``where=``) or compute column values (a Python-side ``onupdate=``, such as an app's
    ``updated_at``). Those statements go through SQLAlchemy.
    """

    def __init__(self, statement: Select[Any] | Update, direct_to: SQLADialect | None = None) -> None:
        self.statement = statement
        self.direct_to = direct_to
        self._compiled: _Compiled | None = None

    def _direct(self) -> _Compiled | None:
        if self._compiled is None and self.direct_to is not None:
            compiled = cast(SQLCompiler, self.statement.compile(dialect=self.direct_to))
            per_execution = compiled.literal_execute_params or compiled.post_compile_params
            if per_execution or compiled.update_prefetch or compiled.insert_prefetch:
                self.direct_to = None
            else:
                self._compiled = _Compiled(self.statement, compiled, self.direct_to)
        return self._compiled

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> Sequence[Any]:
        """Execute and fetch every row (tuples, or SQLAlchemy Rows, which behave as tuples)."""
        direct = self._direct()
        if direct is None:
            return connection.execute(self.statement, params).all()
        return direct.execute(connection, params, fetch=True)

    def run(self, connection: Connection, params: Mapping[str, Any]) -> None:
        """Execute a statement that returns no rows."""
        direct = self._direct()
        if direct is None:
            connection.execute(self.statement, params)
        else:
            direct.execute(connection, params, fetch=False)


class _Compiled:
    """A compiled statement, with what SQLAlchemy does to its values at each execution."""

    def __init__(self, stmt: Select[Any] | Update, compiled: SQLCompiler, dialect: SQLADialect) -> None:
        self.compiled = compiled
        self.sql = compiled.string
        escaped = compiled.escaped_bind_names
        # Keyed by the name as rendered: two binds of one name are one parameter, processed once.
        self.bind_processors: dict[str, _Processor] = {}
        for bind, name in compiled.bind_names.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self.bind_processors[escaped.get(name, name)] = process
        self.dialect = dialect
        self.result_types = [column.type for column in stmt.selected_columns] if isinstance(stmt, Select) else []
        # Result processors depend on the driver's type codes, known after the first execution.
        self.result_processors: list[_Processor | None] | None = None

    def execute(self, connection: Connection, params: Mapping[str, Any], *, fetch: bool) -> Sequence[Any]:
        """Execute on the connection's DBAPI cursor; with ``fetch``, return the rows."""
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = values = None
        try:
            # The statement's own values (a job name), callables and bound names as rendered.
            values = self.compiled.construct_params(params, escape_names=True)
            for name, process in self.bind_processors.items():
                values[name] = process(values[name])
            cursor = dbapi_connection.cursor()
            cursor.execute(self.sql, values)
            rows: Sequence[Any] = cursor.fetchall() if fetch else ()
            if fetch and self.result_processors is None:
                self.result_processors = [
                    type_.dialect_impl(self.dialect).result_processor(self.dialect, column[1])
                    for type_, column in zip(self.result_types, cursor.description)
                ]
            cursor.close()
        except BaseException as error:
            # SQLAlchemy's own error path, as for any statement it executes: the error wrapped as
            # DBAPIError, handle_error hooks run, the connection (and pool) invalidated when the
            # database went away, the cursor closed.
            connection._handle_dbapi_exception(error, self.sql, values, cursor, None)
        processors = self.result_processors
        if not rows or not processors or not any(processors):
            return rows
        return [tuple(value if p is None else p(value) for p, value in zip(processors, row)) for row in rows]
