"""batchjobs' own tables. The app's tables get no extra columns; all bookkeeping lives here.

Changes to these models need a new revision in ``migrations/versions`` and a bump of
:data:`SCHEMA_REVISION`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, cast

from sqlalchemy import BigInteger, Boolean, DateTime, Dialect, Integer, MetaData, String, Table, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

from batchjobs.timeutil import as_utc

#: The alembic revision this code expects; `batchjobs migrate` brings a database to it.
SCHEMA_REVISION = "0007"
#: batchjobs keeps its own alembic version table, apart from the app's `alembic_version`.
VERSION_TABLE = "batchjobs_alembic_version"


#: SQLAlchemy's dialect names for MySQL and MariaDB, whose DATETIME keeps no time zone and,
#: unless asked for, no fraction of a second.
_MYSQL = ("mysql", "mariadb")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite and MySQL store them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in _MYSQL:
            from sqlalchemy.dialects.mysql import DATETIME

            # Microseconds: backoff and "failed in this run" compare times less than a second apart.
            return dialect.type_descriptor(DATETIME(fsp=6))
        return dialect.type_descriptor(self.impl)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("batchjobs stores aware datetimes only")
        # In UTC: a database that keeps no time zone (SQLite) stores this wall time.
        utc = value.astimezone(timezone.utc)
        # Naive for MySQL: given an offset, MySQL 8 would convert the value to the session's time zone.
        return utc.replace(tzinfo=None) if dialect.name in _MYSQL else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


class LongText(TypeDecorator[str]):
    """Text for tracebacks: MySQL's TEXT holds only 64 KiB, so there it is MEDIUMTEXT (16 MiB)."""

    impl = Text()
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in _MYSQL:
            from sqlalchemy.dialects.mysql import MEDIUMTEXT

            return dialect.type_descriptor(MEDIUMTEXT())
        return dialect.type_descriptor(self.impl)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Failure(Base):
    """One failing (or dead) row of one job: what went wrong and when to try again."""

    __tablename__ = "batchjobs_failures"

    job: Mapped[str] = mapped_column(String(200), primary_key=True)
    row_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer)
    first_failed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_failed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: NULL once the row is dead.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    dead: Mapped[bool] = mapped_column(Boolean, default=False)
    error_type: Mapped[str] = mapped_column(String(200))
    error_message: Mapped[str] = mapped_column(LongText)
    traceback: Mapped[str] = mapped_column(LongText)
    #: Of ``attempts``, how many ended the process (or the transaction) while the handler ran.
    #: A row with crashes is a suspect: it runs in a chunk of its own.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: A digest of the row's contents when it failed (see batchjobs.failures.row_digest): the record
    #: applies to that row only, not to a new row that reuses its key. NULL in older records.
    row_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)


class BackfillState(Base):
    """Where a backfill is: its cursor is saved with each committed chunk, so it can resume."""

    __tablename__ = "batchjobs_backfills"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    #: running, interrupted, failed or finished. A crash leaves "running" behind.
    status: Mapped[str] = mapped_column(String(20))
    #: Primary key (as text) of the last row of the last committed chunk; NULL before the first.
    cursor: Mapped[str | None] = mapped_column(String(255), nullable=True)
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class RunRecord(Base):
    """One `run-pending` invocation: where it ran, its heartbeat, and how it ended.

    Written in short transactions of its own, never inside a chunk's. A run whose heartbeat went
    stale without a finish time crashed (kill -9, OOM, host lost).
    """

    __tablename__ = "batchjobs_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: Comma-separated names of the jobs the run covered.
    jobs: Mapped[str] = mapped_column(Text)
    queues: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_failed: Mapped[int] = mapped_column(BigInteger, default=0)
    #: JSON: {job name: [done, failed]}.
    job_stats: Mapped[str] = mapped_column(Text, default="{}")
    #: NULL while running; then finished, interrupted (signal or --max-runtime) or failed.
    outcome: Mapped[str | None] = mapped_column(String(20), nullable=True)
    #: "run" for run-pending (one drain), "worker" for `batchjobs worker` (drains until stopped).
    kind: Mapped[str] = mapped_column(String(20), default="run", server_default="run")


class BacklogSample(Base):
    """How many rows a job had pending at one moment: the backlog's history, for the web page's chart.

    Written by runs and workers every few minutes (see batchjobs.history), pruned with the run
    history. Two runs starting together may both write a sample; readers take the latest.
    """

    __tablename__ = "batchjobs_backlog"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sampled_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    job: Mapped[str] = mapped_column(String(200))
    pending: Mapped[int] = mapped_column(BigInteger)


metadata = Base.metadata
#: The tables themselves, for Core statements.
FAILURES = cast(Table, Failure.__table__)
RUNS = cast(Table, RunRecord.__table__)
BACKLOG = cast(Table, BacklogSample.__table__)
