"""The application the benchmarks drive: its tables and its batchjobs Registry.

run.py imports it in-process, and the real CLI loads it with ``-A benchapp:jobs`` (PYTHONPATH set
to this folder), so both paths run exactly the same jobs.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from batchjobs import Registry, flag_column, pending_index

#: Rows per chunk for every contender (batchjobs, the SQL loop, the ideal Python loop).
BATCH_SIZE = 100

#: File the ``record`` job appends row ids to (set by run.py for the concurrency scenario).
RECORD_FILE_ENV = "BENCH_RECORD_FILE"
#: File the ``stamp`` job appends "id time" lines to (set by workerbench.py for pickup latency).
STAMP_FILE_ENV = "BENCH_STAMP_FILE"


class Base(DeclarativeBase):
    pass


class Row(Base):
    """The backlog every drain, the idle tick and the concurrency scenario work on."""

    __tablename__ = "bench_rows"

    id: Mapped[int] = mapped_column(primary_key=True)
    note: Mapped[str | None] = mapped_column(String(40))
    done: Mapped[bool] = flag_column()


class FlaggedSignup(Base):
    """An app table that enqueues a job on insert: flag column plus partial pending index."""

    __tablename__ = "bench_signups_flagged"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    welcome_sent: Mapped[bool] = flag_column()


class PlainSignup(Base):
    """The same table without batchjobs: the baseline for the insert cost."""

    __tablename__ = "bench_signups_plain"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class TriggeredSignup(Base):
    """The flagged table again, with the pending trigger that wakes workers: its insert cost."""

    __tablename__ = "bench_signups_triggered"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    welcome_sent: Mapped[bool] = flag_column()


def create_tables(url: Any) -> None:
    """Create the benchmark app's tables, then batchjobs' own with its migrations, in an empty
    database; works with the batchjobs of any revision being measured."""
    from batchjobs.db import create_engine

    try:
        from batchjobs.schema import migrate
    except ImportError:  # a revision from before the module's rename
        from batchjobs.migrate import migrate  # type: ignore[no-redef]

    engine = create_engine(url)
    try:
        Base.metadata.create_all(engine)
        migrate(engine)
    finally:
        engine.dispose()


pending_index(Row.done)
pending_index(FlaggedSignup.welcome_sent)
pending_index(TriggeredSignup.welcome_sent)

jobs = Registry()


@jobs.flag_job(Row.done, batch_size=BATCH_SIZE)
def noop(row: Row) -> None:
    """Nothing at all: what is left is batchjobs' own cost per row, loading ORM objects."""


@jobs.flag_job(Row.done, batch_size=BATCH_SIZE, columns=[Row.id, Row.note])
def noop_columns(row: Any) -> None:
    """The same, handed plain rows of the columns the ideal loop fetches, not ORM objects."""


@jobs.flag_job(Row.done, batch_size=BATCH_SIZE)
def orm_write(row: Row) -> None:
    """One ORM write per row; batchjobs flushes it inside the row's savepoint."""
    row.note = "handled"


@jobs.flag_job(Row.done, batch=True, batch_size=BATCH_SIZE)
def batch_noop(rows: list[Row]) -> None:
    """A batch handler that does nothing: one call and one savepoint per chunk."""


@jobs.flag_job(Row.done, batch=True, batch_size=BATCH_SIZE)
def batch_write(rows: list[Row]) -> None:
    """The same ORM write per row as ``orm_write``, flushed once per chunk."""
    for row in rows:
        row.note = "handled"


_record_fd: int | None = None


@jobs.flag_job(Row.done, batch_size=BATCH_SIZE)
def record(row: Row) -> None:
    """Append the row id to a shared file, one write(2) on an O_APPEND fd so processes never interleave."""
    global _record_fd
    if _record_fd is None:
        _record_fd = os.open(os.environ[RECORD_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_record_fd, f"{row.id}\n".encode())


_stamp_fd: int | None = None


@jobs.flag_job(Row.done, batch_size=BATCH_SIZE, columns=[Row.id])
def stamp(row: Any) -> None:
    """Append "id time" at the handler's start: the wall clock, compared with the app's after its COMMIT."""
    started = time.time()
    global _stamp_fd
    if _stamp_fd is None:
        _stamp_fd = os.open(os.environ[STAMP_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_stamp_fd, f"{row.id} {started:.6f}\n".encode())


@jobs.flag_job(FlaggedSignup.welcome_sent, batch_size=BATCH_SIZE)
def welcome(signup: FlaggedSignup) -> None:
    """Registered so the flagged table is a real job table; the insert benchmark never runs it."""
