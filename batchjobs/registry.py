"""Job definitions: which flag column marks a row as pending, and what to run for it."""

from __future__ import annotations

import inspect as pyinspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Boolean, Column, ColumnElement, DateTime, Index, Select, Table, event, false, inspect, select
from sqlalchemy.orm import InstrumentedAttribute, Mapper, Session, mapped_column
from sqlalchemy.orm.properties import MappedColumn

from batchjobs.errors import BatchJobsError
from batchjobs.failures import Backoff
from batchjobs.store.base import PENDING_FLAG, value_type

Handler = Callable[..., Any]
#: The decorated function's own type: the decorators hand it back unchanged, so type checkers
#: keep its signature.
HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
FailureHook = Callable[["FlagJob", str, BaseException], None]


def flag_column(**kwargs: Any) -> MappedColumn[bool]:
    """A Boolean flag column: ``False`` (pending) by default on the server, ``True`` once done.

    The server default means rows inserted by any code path, ORM or raw SQL, are pending.
    """
    kwargs.setdefault("nullable", False)
    kwargs.setdefault("server_default", false())
    kwargs.setdefault("default", False)
    return mapped_column(Boolean, **kwargs)


def _column(flag: InstrumentedAttribute[Any] | Column[Any]) -> Column[Any]:
    if isinstance(flag, Column):
        return flag
    columns = getattr(getattr(flag, "property", None), "columns", None)
    if not columns or not isinstance(columns[0], Column):
        raise BatchJobsError(f"{flag!r} is not a mapped column attribute (e.g. User.welcome_email_sent)")
    return columns[0]


def parse_key(column: Column[Any], text: str) -> Any:
    """A primary key typed on the command line (or stored as text), as the column's Python type."""
    python_type = value_type(column.type)
    if python_type is None or python_type is str:
        return text
    try:
        return python_type(text)
    except (TypeError, ValueError):
        raise BatchJobsError(f"{text!r} is not a valid key for {column.table.name}.{column.name}") from None


def pending_condition(flag: Column[Any]) -> ColumnElement[bool]:
    """SQL that is true for rows whose flag says "pending".

    The claim query and :func:`pending_index` use this same expression, so the planner can match
    the partial index (SQLite only uses a partial index whose WHERE appears verbatim in the query).
    """
    if isinstance(flag.type, Boolean):
        if flag.nullable:
            # NULL would be neither pending nor done: such rows would silently never run.
            raise BatchJobsError(
                f"Boolean flag column {flag.table.name}.{flag.name} must be NOT NULL; declare it with flag_column()"
            )
        return flag == false()
    if isinstance(flag.type, DateTime):
        return flag.is_(None)
    raise BatchJobsError(
        f"flag column {flag.table.name}.{flag.name} must be Boolean (False = pending) "
        f"or a nullable DateTime (NULL = pending), not {flag.type}"
    )


def pending_index(flag: InstrumentedAttribute[Any] | Column[Any] | MappedColumn[Any], name: str | None = None) -> Index:
    """A partial index on the primary key covering only pending rows.

    Finding pending rows then costs O(pending), not O(table). Declare it in the class body, as
    SQLAlchemy indexes are declared, with the flag's ``mapped_column``::

        welcome_email_sent: Mapped[bool] = flag_column()
        __table_args__ = (pending_index(welcome_email_sent),)

    or after the class, ``pending_index(User.welcome_email_sent)``; either way the index joins
    the table's metadata, the same index. MySQL and MariaDB have no partial indexes: there it is
    an index on (flag, primary key).
    """
    target = flag.column if isinstance(flag, MappedColumn) else flag
    if isinstance(target, Column) and not isinstance(getattr(target, "table", None), Table):
        return _pending_index_once_attached(target, name)
    column = _column(target)
    table = column.table
    assert isinstance(table, Table)
    primary_key = list(table.primary_key.columns)
    condition = pending_condition(column)
    return Index(
        name or f"ix_{table.name}_{column.name}_pending",
        *primary_key,
        postgresql_where=condition,
        sqlite_where=condition,
        info={PENDING_FLAG: column.name},
    )


def _pending_index_once_attached(column: Column[Any], name: str | None) -> Index:
    """For a class body, where the flag has no table yet (nor, perhaps, its type or name): an
    index that stands in for the pending index until the table is built, then gives its place to
    the real one. Table arguments are attached after the columns, so by then the table has its
    primary key and the flag its type."""
    stand_in = Index(name or "batchjobs_pending_index")

    @event.listens_for(stand_in, "after_parent_attach")
    def _attached(_index: Index, table: Any) -> None:
        table.indexes.discard(stand_in)
        pending_index(column, name)  # bound to the table's columns, it joins the table itself

    return stand_in


@dataclass
class JobContext:
    """Passed as the optional second handler argument."""

    session: Session
    job: FlagJob
    logger: logging.Logger


class _KeyedModel:
    """The single-column primary key of a job's or backfill's model (checked at registration)."""

    model: type

    @property
    def primary_key(self) -> Column[Any]:
        return next(iter(inspect(self.model).local_table.primary_key.columns))

    @property
    def primary_key_attr(self) -> str:
        """The attribute name of that column on the class (it may differ from the column name)."""
        mapper: Mapper[Any] = inspect(self.model)
        return mapper.get_property_by_column(self.primary_key).key


@dataclass(frozen=True, eq=False)
class FlagJob(_KeyedModel):
    """One registered job: a flag column, the handler, and how to run it."""

    name: str
    handler: Handler
    flag: Column[Any]
    model: type
    queue: str = "default"
    batch_size: int = 100
    where: ColumnElement[bool] | None = None
    done_at: Column[Any] | None = None
    batch: bool = False
    max_attempts: int = 10
    max_crashes: int = 3
    backoff: Callable[[int], float] = field(default_factory=Backoff)
    timeout: float | None = None
    pending_since: Column[Any] | None = None
    wants_context: bool = False
    #: With ``columns=``: the columns handlers get as plain rows; empty for ORM instances.
    columns: tuple[Column[Any], ...] = ()

    @property
    def table(self) -> Table:
        table = self.flag.table
        assert isinstance(table, Table)
        return table

    def pending(self) -> ColumnElement[bool]:
        """The WHERE clause selecting this job's pending rows."""
        condition = pending_condition(self.flag)
        return condition if self.where is None else condition & self.where

    @property
    def fields(self) -> list[str]:
        """The attribute names of ``columns``: the fields of the plain rows handlers get."""
        mapper: Mapper[Any] = inspect(self.model)
        return [mapper.get_property_by_column(column).key for column in self.columns]

    @property
    def done_columns(self) -> list[Column[Any]]:
        """The columns marking a row done sets: the flag, and ``done_at`` if the job has one."""
        return [self.flag] if self.done_at is None else [self.flag, self.done_at]

    def done_values(self, now: datetime) -> dict[str, Any]:
        """Column values that mark a row done."""
        values: dict[str, Any] = {
            self.flag.name: True if isinstance(self.flag.type, Boolean) else _for_column(self.flag, now)
        }
        if self.done_at is not None:
            values[self.done_at.name] = _for_column(self.done_at, now)
        return values

    def pending_values(self) -> dict[str, Any]:
        """Column values that put a row back to pending."""
        return {self.flag.name: false() if isinstance(self.flag.type, Boolean) else None}

    def call(self, rows: Any, ctx: JobContext | None) -> Any:
        """Call the handler; ``ctx`` may be None only for a handler that takes none."""
        return self.handler(rows, ctx) if self.wants_context else self.handler(rows)


@dataclass
class BackfillContext:
    """Passed as the optional second argument of a backfill function."""

    session: Session
    backfill: Backfill
    logger: logging.Logger


@dataclass(frozen=True, eq=False)
class Backfill(_KeyedModel):
    """A one-off function over every row of a query, run in resumable keyset chunks."""

    name: str
    handler: Handler
    query: Select[Any]
    model: type
    chunk_size: int = 1000
    wants_context: bool = False

    def call(self, rows: list[Any], ctx: BackfillContext) -> Any:
        return self.handler(rows, ctx) if self.wants_context else self.handler(rows)


def _for_column(column: Column[Any], now: datetime) -> datetime:
    # A naive column gets naive UTC, so the value means the same on every server time zone.
    timezone_aware = isinstance(column.type, DateTime) and column.type.timezone
    return now if timezone_aware else now.replace(tzinfo=None)


def _plain_columns(model: type, attributes: Sequence[InstrumentedAttribute[Any]]) -> tuple[Column[Any], ...]:
    """The columns for ``columns=``, primary key first, checked to belong to the job's model."""
    if not attributes:
        return ()
    mapper: Mapper[Any] = inspect(model)
    table = mapper.local_table
    assert isinstance(table, Table)
    loaded = [next(iter(table.primary_key.columns))]
    for attribute in attributes:
        column = _column(attribute)
        if column.table is not table:
            raise BatchJobsError(f"columns= may only name columns of {table.name}, not {column.table.name}.{column.name}")
        if mapper.get_property_by_column(column).key.startswith("_"):
            raise BatchJobsError(f"columns= cannot hand over {attribute!r}: plain row fields may not start with '_'")
        if column not in loaded:
            loaded.append(column)
    return tuple(loaded)


def _wants_context(handler: Handler) -> bool:
    params = [
        p
        for p in pyinspect.signature(handler).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if not params:
        raise BatchJobsError(f"handler {handler.__qualname__} must take the row (or rows) as its first argument")
    return len(params) >= 2 or params[0].kind is params[0].VAR_POSITIONAL


class Registry:
    """The set of jobs an application defines; point the CLI at it with ``-A module:attr``."""

    def __init__(
        self,
        database_url: str | None = None,
        on_failure: FailureHook | None = None,
        keep_history: timedelta = timedelta(days=7),
    ) -> None:
        """``on_failure(job, row_key, exception)`` is called after each failure is recorded;
        ``keep_history`` is how long `run-pending` runs stay in the run history."""
        self.database_url = database_url
        self.on_failure = on_failure
        self.keep_history = keep_history
        self.jobs: dict[str, FlagJob] = {}
        self.backfills: dict[str, Backfill] = {}

    def flag_job(
        self,
        flag: InstrumentedAttribute[Any],
        *,
        name: str | None = None,
        queue: str = "default",
        batch_size: int = 100,
        where: ColumnElement[bool] | None = None,
        done_at: InstrumentedAttribute[Any] | None = None,
        batch: bool = False,
        max_attempts: int = 10,
        max_crashes: int = 3,
        backoff: Callable[[int], float] | None = None,
        timeout: float | None = None,
        pending_since: InstrumentedAttribute[Any] | None = None,
        columns: Sequence[InstrumentedAttribute[Any]] = (),
    ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated function as the handler for rows whose ``flag`` is pending.

        ``flag`` is a Boolean column (False = pending, True = done) or a nullable DateTime column
        (NULL = pending, set to the current time when done). The handler gets one row, or a list of
        rows with ``batch=True``, and optionally a :class:`JobContext` as second argument.

        A row whose handler raises is tried again after ``backoff(attempt)`` seconds, up to
        ``max_attempts`` attempts, then it is dead. A row whose handler ends the process (kill -9,
        OOM, a segfault) or during which the server ends the transaction is found by the next
        run and tried again in a chunk of its own; after ``max_crashes`` such endings it is dead.

        ``pending_since`` names a timestamp column telling since when a row waits (usually
        ``created_at``); with it, `status`, `check` and `metrics` report the oldest pending age.

        ``columns`` hands the handler plain, read-only rows (named tuples) holding just these
        columns and the primary key, instead of ORM instances: loading ORM instances is the most
        expensive part of a chunk, so handlers that call out (email, HTTP) and don't write
        through the row run faster, and wide columns the handler does not read are not fetched.
        Such a handler writes through ``ctx.session``.
        """
        column = _column(flag)
        pending_condition(column)  # validates the column type early
        model = getattr(flag, "class_", None)
        if model is None:
            raise BatchJobsError("flag_job needs a mapped attribute such as User.welcome_email_sent")
        primary_key = inspect(model).primary_key
        if len(primary_key) != 1:
            keys = ", ".join(c.name for c in primary_key)
            raise BatchJobsError(
                f"{model.__name__} has a composite primary key ({keys}); batchjobs needs a single-column key"
            )
        if where is not None:
            # Another table in where= would join into the claim and could return a row twice.
            others = {getattr(t, "name", str(t)) for t in select(where).get_final_froms()} - {column.table.name}
            if others:
                raise BatchJobsError(
                    f"where= may only use columns of {column.table.name}, not of {', '.join(sorted(others))}; "
                    "use an EXISTS subquery for other tables"
                )
        for name_, extra in (("done_at", done_at), ("pending_since", pending_since)):
            if extra is not None and not isinstance(_column(extra).type, DateTime):
                raise BatchJobsError(f"{name_}= must be a DateTime column, not {_column(extra).type}")
        loaded = _plain_columns(model, columns)
        if batch_size < 1:
            raise BatchJobsError(f"batch_size must be at least 1, got {batch_size}")
        if max_attempts < 1:
            raise BatchJobsError(f"max_attempts must be at least 1, got {max_attempts}")
        if max_crashes < 1:
            raise BatchJobsError(f"max_crashes must be at least 1, got {max_crashes}")

        def register(handler: HandlerT) -> HandlerT:
            job_name = name or handler.__name__
            if job_name in self.jobs:
                raise BatchJobsError(
                    f"a job named {job_name!r} is already registered; pass name=... to tell them apart"
                )
            self.jobs[job_name] = FlagJob(
                name=job_name,
                handler=handler,
                flag=column,
                model=model,
                queue=queue,
                batch_size=batch_size,
                where=where,
                done_at=_column(done_at) if done_at is not None else None,
                batch=batch,
                max_attempts=max_attempts,
                max_crashes=max_crashes,
                backoff=backoff or Backoff(),
                timeout=timeout,
                pending_since=_column(pending_since) if pending_since is not None else None,
                wants_context=_wants_context(handler),
                columns=loaded,
            )
            return handler

        return register

    def backfill(
        self, query: Select[Any], *, name: str | None = None, chunk_size: int = 1000
    ) -> Callable[[HandlerT], HandlerT]:
        """Register a one-off backfill: the function gets each chunk of ``query``'s rows as a list.

        ``query`` selects one mapped class, e.g. ``select(User).where(User.display_name.is_(None))``;
        it is walked in primary-key order, one transaction per chunk, and the position is saved
        with every committed chunk so `batchjobs backfill NAME` resumes after a crash or Ctrl-C.
        """
        entities = [d.get("entity") for d in query.column_descriptions]
        if len(entities) != 1 or entities[0] is None or len(query.column_descriptions) != 1:
            raise BatchJobsError("a backfill query must select one mapped class, e.g. select(User).where(...)")
        model = entities[0]
        if len(inspect(model).primary_key) != 1:
            raise BatchJobsError(f"{model.__name__} has a composite primary key; backfills need a single-column key")
        if chunk_size < 1:
            raise BatchJobsError(f"chunk_size must be at least 1, got {chunk_size}")

        def register(handler: HandlerT) -> HandlerT:
            backfill_name = name or handler.__name__
            if backfill_name in self.backfills:
                raise BatchJobsError(f"a backfill named {backfill_name!r} is already registered")
            self.backfills[backfill_name] = Backfill(
                name=backfill_name,
                handler=handler,
                query=query,
                model=model,
                chunk_size=chunk_size,
                wants_context=_wants_context(handler),
            )
            return handler

        return register

    def get_backfill(self, name: str) -> Backfill:
        """The backfill called ``name``, or a clear error listing the known ones."""
        try:
            return self.backfills[name]
        except KeyError:
            known = ", ".join(sorted(self.backfills)) or "none registered"
            raise BatchJobsError(f"unknown backfill {name!r} (known backfills: {known})") from None

    @property
    def queues(self) -> list[str]:
        return sorted({job.queue for job in self.jobs.values()})

    def job(self, name: str) -> FlagJob:
        """The job called ``name``, or a clear error listing the known ones."""
        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(sorted(self.jobs)) or "none registered"
            raise BatchJobsError(f"unknown job {name!r} (known jobs: {known})") from None

    def select(self, jobs: Sequence[str] = (), queues: Sequence[str] = ()) -> list[FlagJob]:
        """Jobs by name and/or queue; all jobs when both are empty."""
        for queue in queues:
            if queue not in self.queues:
                known = ", ".join(self.queues) or "none"
                raise BatchJobsError(f"unknown queue {queue!r} (known queues: {known})")
        chosen = [self.job(name) for name in jobs]
        if queues:
            chosen += [job for job in self.jobs.values() if job.queue in queues and job not in chosen]
        return chosen if (jobs or queues) else list(self.jobs.values())


def load_registry(spec: str) -> Registry:
    """Import ``module:attribute`` (or just ``module`` holding one Registry) and return the Registry.

    The current directory is put on ``sys.path`` first, as Celery's ``-A`` does, so an app's own
    package imports from its project folder.
    """
    import importlib
    import os
    import sys

    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any error in the app's import is reported the same way
        where = _error_location(exc, module_name)
        # A SyntaxError's text names its file and line too; the location says them once.
        message = exc.msg if isinstance(exc, SyntaxError) and exc.filename else str(exc)
        raise BatchJobsError(
            f"cannot import app {module_name!r}: {type(exc).__name__}: {message}{where}"
            " (set BATCHJOBS_DEBUG=1 for the traceback)"
        ) from exc
    if attribute:
        try:
            registry = getattr(module, attribute)
        except AttributeError:
            raise BatchJobsError(f"module {module_name!r} has no attribute {attribute!r}") from None
        if not isinstance(registry, Registry):
            raise BatchJobsError(f"{spec} is a {type(registry).__name__}, not a batchjobs Registry")
        return registry
    found = [value for value in vars(module).values() if isinstance(value, Registry)]
    if len(found) != 1:
        raise BatchJobsError(
            f"module {module_name!r} holds {len(found)} Registry objects; name one as {module_name}:attribute"
        )
    return found[0]


def _error_location(error: BaseException, module_name: str) -> str:
    """`` (at file:line)`` of where an app's import failed: the line with a syntax error, else
    the innermost frame outside Python's import machinery and installed libraries."""
    import sysconfig
    import traceback

    if isinstance(error, ModuleNotFoundError) and error.name == module_name:
        return ""  # the app itself was not found: there is no line to show
    if isinstance(error, SyntaxError) and error.filename:
        return f" (at {error.filename}:{error.lineno})"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<")]
    libraries = {sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    own = [f for f in frames if not any(f.filename.startswith(path) for path in libraries if path)]
    chosen = own or frames
    return f" (at {chosen[-1].filename}:{chosen[-1].lineno})" if chosen else ""
