"""The Store: every statement batchjobs sends, behind one interface.

A Store is batchjobs' view of one database through one engine. This module holds the interface
and the statements every supported database accepts as SQLAlchemy writes them; a subclass per
database (``postgresql.py``, ``sqlite.py``) supplies what differs: how rows are locked for a
claim, how a chunk's keys are bound, upserts, lock waits, transaction control and DDL. Adding a
database is adding one such module. Nothing outside this package builds SQL of its own or asks
which database it talks to.

Transactions belong to the caller: no method here begins, commits or rolls back, except where
its name says so.
"""

from __future__ import annotations

import hashlib
import json
import operator
import uuid
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    false,
    func,
    insert,
    inspect,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy import Dialect as SQLADialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from batchjobs.errors import BatchJobsError
from batchjobs.store.tables import BACKLOG, FAILURES, RUNS, VERSION_TABLE, BackfillState, Failure, RunRecord, UTCDateTime
from batchjobs.timeutil import as_utc

if TYPE_CHECKING:
    from batchjobs.failures import RowFailure
    from batchjobs.registry import FlagJob

#: The parameter :meth:`Store.key_in` binds; prefixed so that it cannot clash with a column name.
KEYS = "batchjobs_keys"
#: Bound to the key a keyset walk continues after.
AFTER = "batchjobs_after"
#: Label of the row key the claim computes beside each row.
ROW_KEY = "batchjobs_row_key"
#: ``Index.info`` key of a pending index: the name of its flag column, for a database that has no
#: partial indexes and indexes the flag itself.
PENDING_FLAG = "batchjobs_pending_flag"


def value_type(type_: Any) -> type | None:
    """The Python type of a column type's values, or None where SQLAlchemy knows of none."""
    try:
        return type_.python_type  # type: ignore[no-any-return]
    except NotImplementedError:
        return None


def row_key_sql(job: FlagJob) -> ColumnElement[str]:
    """The row's primary key as text, the form failure records are keyed by."""
    return cast(job.primary_key, String)


def keyset(stmt: Select[Any], key: Column[Any], after: Any = None, *, bound: bool = False) -> Select[Any]:
    """The one keyset walk: ``stmt`` in ``key`` order, after the ``after`` key when there is one.

    With ``bound`` the position is the parameter :data:`AFTER`, so that the statement can be
    built once and executed with each chunk's position.
    """
    stmt = stmt.order_by(key)
    if bound:
        return stmt.where(key > bindparam(AFTER, type_=key.type))
    return stmt if after is None else stmt.where(key > after)


def advance(position: Any, reached: Any, later: Callable[[Any, Any], bool] = operator.gt) -> Any:
    """The walk's next position, ``reached``, which must lie past the current ``position``.

    Keyset order must move forward: anything else (a key type that does not sort as the database
    sorts it, a selection that changes under the walk) would walk the same rows forever.
    ``later(reached, position)`` tells whether it did (see :meth:`Store.walk_order`).
    """
    if position is not None and not later(reached, position):
        raise BatchJobsError(f"the walk did not move past key {position}")
    return reached


def held_back(records: Any = FAILURES.c, *, suspects: bool = True) -> ColumnElement[bool]:
    """Failure-record condition for rows that must wait: dead, backing off, or failed this run;
    with ``suspects``, also rows whose handler ever ended its process (they run apart).
    ``records`` holds the failure table's columns (or those of a selectable of its rows).

    ``now`` and ``run_started`` are bound at execution, so each statement is built once per run.
    """
    return or_(
        records.dead.is_(True),
        records.next_attempt_at > bindparam("now", type_=UTCDateTime()),
        records.last_failed_at >= bindparam("run_started", type_=UTCDateTime()),
        *([records.crashes > 0] if suspects else []),
    )


def first_failure_values(
    job: FlagJob, failures: Sequence[RowFailure], now: datetime, digests: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The failure records of these rows as a first failure would write them (see Store.record_failures);
    ``digests`` are the rows' (see :meth:`Store.row_digests`)."""
    first_is_last = job.max_attempts <= 1
    return [
        {
            "job": job.name,
            "row_key": failure.row_key,
            "row_digest": (digests or {}).get(failure.row_key),
            "attempts": 1,
            "crashes": int(failure.crashed),
            "first_failed_at": now,
            "last_failed_at": now,
            # A crash suspect is due at once: it runs in a chunk of its own, so it cannot
            # take other rows down with it again.
            "next_attempt_at": None if first_is_last else now if failure.crashed else now + failure.wait(job),
            "dead": first_is_last or (failure.crashed and job.max_crashes <= 1),
            "error_type": failure.error_type[:200],
            "error_message": failure.message,
            "traceback": failure.traceback,
        }
        for failure in failures
    ]


def pending_flag(job: FlagJob) -> ColumnElement[bool]:
    """The job's flag says pending (its ``where=`` aside)."""
    from batchjobs.registry import pending_condition

    return pending_condition(job.flag)


def row_digest(values: Sequence[Any]) -> str:
    """A digest of a row's values, the same for the same values however they were read.

    Times count as the instant they are (a driver may hand them back in the session's time
    zone); values of types this does not know count by their type alone, since their text may
    differ from one read to the next.
    """
    parts = []
    for value in values:
        if isinstance(value, datetime):
            value = value.astimezone(timezone.utc).isoformat() if value.tzinfo else value.isoformat()
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True, default=str)
        elif not isinstance(value, (str, int, float, bool, Decimal, bytes, uuid.UUID, date, time, timedelta, type(None))):
            value = type(value).__qualname__
        parts.append(repr(value))
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class Store:
    """batchjobs' statements for one database, executed on connections the caller hands in."""

    #: SQLAlchemy's name for the database (``engine.dialect.name``).
    name: ClassVar[str] = ""
    #: URL schemes that mean this database without naming a driver, and the driver batchjobs uses.
    schemes: ClassVar[tuple[str, ...]] = ()
    default_driver: ClassVar[str | None] = None
    #: The batchjobs extra that installs ``default_driver`` (``pip install 'batchjobs[extra]'``), if any.
    extra: ClassVar[str | None] = None
    #: Whether batchjobs' own migrations need alembic's batch mode (tables copied to be altered).
    render_as_batch: ClassVar[bool] = False
    #: Whether adding a column with a constant default, and then changing that default, touch
    #: no existing row (see :meth:`add_flag_column`).
    instant_column_defaults: ClassVar[bool] = False
    #: Whether a DATETIME holds no time zone even when asked to: times are written as naive UTC.
    naive_times: ClassVar[bool] = False

    def __init__(self, engine: Engine) -> None:
        #: The engine batchjobs works through: the app's own, or one derived from it (see adopt).
        self.engine = engine

    # -- engines ---------------------------------------------------------------------------------

    @classmethod
    def configure(cls, engine: Engine, *, connect_timeout: float | None = None) -> None:
        """Install connection-level settings on an engine batchjobs created itself; with
        ``connect_timeout``, new connections wait that long at most for the server (unless the
        URL says otherwise)."""

    @classmethod
    def adopt(cls, engine: Engine) -> Engine:
        """The engine to work through for an engine the app created; by default that engine."""
        return engine

    #: The isolation level claiming transactions need, where the database's default may be another.
    claim_isolation_level: str | None = None

    def claiming(self) -> Engine:
        """The engine to open claiming transactions (admin changes, backfills) on."""
        if self.claim_isolation_level is None:
            return self.engine
        return self.engine.execution_options(isolation_level=self.claim_isolation_level)

    def claiming_connection(self) -> Connection:
        """A connection of :meth:`claiming`'s for a run's chunks, to be closed by the caller.

        The isolation level is set on the connection, not through the engine's options: an
        engine with an isolation level option listens for every connection it hands out, and
        SQLAlchemy then dispatches events around every statement of its connections.
        """
        if self.claim_isolation_level is None:
            return self.claiming().connect()
        return self.engine.connect().execution_options(isolation_level=self.claim_isolation_level)

    def walk_order(self, key: Column[Any]) -> Callable[[Any, Any], bool]:
        """How a keyset walk on ``key`` tells that a key it reached lies past its position
        (see :func:`advance`): Python's ``>``, where Python orders the key's values as the
        database does.

        Text keys follow their column's collation, which in most puts 'a' before 'B', unlike
        Python. A walk's claims ask for keys greater than its position in the server's own
        order, and keys come back from the server exactly as they were bound, so for text the
        walk moved if the key is another one.
        """
        return operator.ne if isinstance(key.type, String) else operator.gt

    # -- driver and server behaviour -----------------------------------------------------------------

    def limit_lock_wait(self, connection: Connection | Session, seconds: float) -> None:
        """Make this transaction give up after waiting ``seconds`` for a lock another holds."""

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        """Whether ``error`` means a lock wait ran out (worth retrying), not a real failure."""
        return False

    def is_schema_error(self, error: DBAPIError) -> bool:
        """Whether ``error`` says the app's schema lacks a table or column a statement names
        (code deployed before its migration): no reconnecting mends it."""
        return False

    def is_deadlock(self, error: DBAPIError) -> bool:
        """Whether ``error`` means the database rolled the whole transaction back to break a
        deadlock: nothing of it was committed, so it may be run again."""
        return False

    def transaction_limits(self, connection: Connection) -> list[str]:
        """Server settings in force that end a transaction which idles or lasts too long.

        A chunk's transaction stays open while its handlers run, so such a limit shorter than a
        handler would end every chunk it is in (see :meth:`lift_transaction_limits`).
        """
        return []

    def lift_transaction_limits(self, connection: Connection | Session, names: Sequence[str]) -> None:
        """Switch these limits off for the current transaction only."""

    # -- wake-ups for workers ---------------------------------------------------------------------------

    @classmethod
    def pending_trigger_sql(cls, table: str, flag: str, *, boolean: bool) -> list[str]:
        """DDL that makes the database tell listening workers when a row of ``table`` becomes
        pending; none where the database cannot (workers poll it)."""
        return []

    @classmethod
    def drop_pending_trigger_sql(cls, table: str, flag: str) -> list[str]:
        """DDL that removes what :meth:`pending_trigger_sql` installs."""
        return []

    def has_pending_trigger(self, connection: Connection, table: str, flag: str) -> bool:
        """Whether ``table`` tells workers about new pending rows (see :meth:`pending_trigger_sql`)."""
        return False

    def listener(self) -> Listener | None:
        """A connection that waits for those notifications; None where workers poll."""
        return None

    def in_failed_transaction(self, dbapi_connection: Any) -> bool:
        """Whether a statement failed and the transaction refuses more until rolled back."""
        return False

    #: Whether :meth:`cancel_running_statement` tells by itself whether a statement is in flight
    #: (it then ignores ``in_flight``, and nobody needs to listen for statements to know it).
    sees_statement_in_flight = False

    def cancel_running_statement(self, dbapi_connection: Any, in_flight: bool) -> bool:
        """From a signal handler or another thread: cancel the statement the driver is waiting
        on, if there is one (``in_flight``: batchjobs saw one sent and not yet answered).

        Returns False when no statement is in flight, so raising in Python code is safe.
        """
        return False

    # -- building blocks the subclasses shape ------------------------------------------------------

    def lock_for_claim(self, stmt: Select[Any], table: Table) -> Select[Any]:
        """Make a SELECT of pending rows take them for this transaction only."""
        return stmt

    def key_from_text(self, key: ColumnElement[Any], text_key: ColumnElement[str]) -> ColumnElement[Any]:
        """A row key stored as text (a failure record's) as a value of the key's type, to look its
        row up by the primary key; NULL, not an error, where the text is no such value."""
        return cast(text_key, key.type)

    def key_in(self, column: ColumnElement[Any]) -> ColumnElement[bool]:
        """``column IN (...)`` for a chunk's worth of keys, bound as ``{KEYS: key_list(...)}``."""
        return column.in_(bindparam(KEYS, expanding=True))

    def key_list(self, column: ColumnElement[Any], keys: Iterable[Any], bound: SQLADialect) -> Any:
        """The value to bind to :meth:`key_in`'s parameter, for a connection of dialect ``bound``."""
        return list(keys)

    def upsert(self, table: Table) -> Insert:
        """An INSERT that supports ``on_conflict_do_update`` and ``excluded``."""
        raise NotImplementedError

    # -- the run loop ------------------------------------------------------------------------------

    def chunk_statements(self, job: FlagJob, limit: int) -> ChunkStatements:
        """The claim, failure re-check and mark-done statements of ``job``, built once per run."""
        return ChunkStatements(self, job, limit)

    def record_failures(
        self, connection: Connection | Session, job: FlagJob, failures: Sequence[RowFailure], now: datetime
    ) -> None:
        """Count one attempt for each failed row, and schedule its retry or declare it dead."""
        if not failures:
            return
        table = FAILURES
        upsert = self.upsert(table)
        # The inserted values are those of a first failure; when a record exists already, the
        # update below counts on from it, and uses this wait for the attempt the claim saw.
        values = first_failure_values(job, failures, now, self.row_digests(connection, job, [f.row_key for f in failures]))
        # The counts come from the stored row, not from what the claim saw: attempts stay exact
        # even if another runner recorded an attempt in between.
        attempts = table.c.attempts + 1
        crashes = table.c.crashes + upsert.excluded.crashes  # type: ignore[attr-defined]
        now_dead = or_(attempts >= job.max_attempts, crashes >= job.max_crashes)
        stmt = upsert.values(values).on_conflict_do_update(  # type: ignore[attr-defined]
            index_elements=[table.c.job, table.c.row_key],
            set_={
                "attempts": attempts,
                "crashes": crashes,
                "last_failed_at": upsert.excluded.last_failed_at,  # type: ignore[attr-defined]
                "dead": now_dead,
                "next_attempt_at": case(
                    (now_dead, None), else_=func.coalesce(upsert.excluded.next_attempt_at, now)  # type: ignore[attr-defined]
                ),
                "error_type": upsert.excluded.error_type,  # type: ignore[attr-defined]
                "error_message": upsert.excluded.error_message,  # type: ignore[attr-defined]
                "traceback": upsert.excluded.traceback,  # type: ignore[attr-defined]
                "row_digest": upsert.excluded.row_digest,  # type: ignore[attr-defined]
            },
        )
        connection.execute(stmt)

    def clear_failures(self, connection: Connection | Session, job_name: str, row_keys: Sequence[str]) -> int:
        """Forget the failure records of these rows (after a success, a retry or a requeue)."""
        if not row_keys:
            return 0
        bound = connection.dialect if isinstance(connection, Connection) else connection.get_bind().dialect
        result = connection.execute(
            delete(Failure).where(Failure.job == job_name, self.key_in(FAILURES.c.row_key)),
            {KEYS: self.key_list(FAILURES.c.row_key, row_keys, bound)},
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def row_digests(self, connection: Connection | Session, job: FlagJob, row_keys: Sequence[str]) -> dict[str, str]:
        """Row key -> digest of the row's contents (see :func:`row_digest`), for those of these
        rows that exist. The job's own done columns are left out: only batchjobs changes them."""
        if not row_keys:
            return {}
        pk = job.primary_key
        done = {column.name for column in job.done_columns}
        columns = [column for column in job.table.columns if column.name not in done]
        keys = [self.key_from_text(pk, literal(key, String())) for key in row_keys]
        stmt = select(row_key_sql(job), *columns).where(pk.in_(keys))
        return {row[0]: row_digest(row[1:]) for row in connection.execute(stmt)}

    def failing_jobs(self, connection: Connection) -> set[str]:
        """Names of the jobs that have failure records."""
        return set(connection.scalars(select(Failure.job).distinct()))

    def failure_states_of(self, connection: Connection, job: FlagJob) -> list[tuple[str, int, datetime, str | None, bool]]:
        """Every failure record of the job: (row key, attempts, last failed at, row digest, whether
        its row exists and is pending by its flag)."""
        pk = job.primary_key
        row_is_pending = (
            select(true())
            .where(pk == self.key_from_text(pk, FAILURES.c.row_key), pending_flag(job))
            .correlate(FAILURES)
            .exists()
        )
        stmt = select(Failure.row_key, Failure.attempts, Failure.last_failed_at, Failure.row_digest, row_is_pending).where(
            Failure.job == job.name
        )
        return [(key, attempts, as_utc(at), digest, bool(live)) for key, attempts, at, digest, live in connection.execute(stmt)]

    def forget_failures(self, connection: Connection, job_name: str, seen: Sequence[tuple[str, int, datetime]]) -> int:
        """Delete these failure records, each only as it was seen (row key, attempts, last failed
        at): a record another run has written since is kept."""
        forgotten = 0
        for row_key, attempts, last_failed_at in seen:
            result = connection.execute(
                delete(Failure).where(
                    Failure.job == job_name,
                    Failure.row_key == row_key,
                    Failure.attempts == attempts,
                    Failure.last_failed_at == last_failed_at,
                )
            )
            forgotten += int(result.rowcount or 0)
        return forgotten

    def job_failure_counts(self, connection: Connection, job: FlagJob) -> tuple[int, int]:
        """(rows failing and waiting to retry, dead rows) of the job, counting only rows that
        exist and are its work: pending by its flag and its ``where=``."""
        pk = job.primary_key
        stmt = (
            select(func.count(case((Failure.dead == false(), 1))), func.count(case((Failure.dead == true(), 1))))
            .select_from(FAILURES)
            .join(job.table, pk == self.key_from_text(pk, FAILURES.c.row_key))
            .where(Failure.job == job.name, job.pending())
        )
        backoff, dead = connection.execute(stmt).one()
        return int(backoff), int(dead)

    def job_failures(self, connection: Connection, job: FlagJob, dead_only: bool = False) -> list[Failure]:
        """The job's failure records of rows that exist and are its work, detached."""
        pk = job.primary_key
        stmt = (
            select(Failure)
            .join(job.table, pk == self.key_from_text(pk, FAILURES.c.row_key))
            .where(Failure.job == job.name, job.pending())
            .order_by(Failure.first_failed_at, Failure.row_key)
        )
        if dead_only:
            stmt = stmt.where(Failure.dead.is_(True))
        return self._detached(connection, stmt)

    # -- crash accounting ----------------------------------------------------------------------------

    def suspect_jobs(self, connection: Connection) -> set[str]:
        """Names of the jobs that have crash suspects to run (pending rows are not checked)."""
        stmt = select(Failure.job).where(Failure.crashes > 0, Failure.dead.is_(False)).distinct()
        return set(connection.scalars(stmt))

    def still_attempted(self, connection: Connection, job: FlagJob, row_keys: Sequence[str], since: datetime) -> list[str]:
        """Of these row keys, those still pending with no failure recorded since ``since``: the rows
        a worker that went away was handling (a row it finished is done, one that failed has its
        failure recorded)."""
        if not row_keys:
            return []
        pk = job.primary_key
        recorded = (
            select(true())
            .where(Failure.job == job.name, Failure.row_key == row_key_sql(job), Failure.last_failed_at >= since)
            .exists()
        )
        stmt = select(row_key_sql(job)).where(
            job.pending(), pk.in_([self.key_from_text(pk, literal(key, String())) for key in row_keys]), ~recorded
        )
        # Locked as a claim locks, until the crashes are committed: a run that claims meanwhile
        # passes these rows by rather than run them in an ordinary chunk. A row another run holds
        # is that run's: done, failed, or in its own marker if its worker goes away too.
        return list(connection.scalars(self.lock_for_claim(stmt, job.table)))

    # -- failures, for operators ----------------------------------------------------------------------

    def has_failures(self, connection: Connection, job_name: str) -> bool:
        """Whether any failure record names this job (it may no longer be registered)."""
        return connection.scalar(select(Failure.job).where(Failure.job == job_name).limit(1)) is not None

    def failures(
        self,
        connection: Connection,
        job_name: str | None = None,
        dead_only: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Failure]:
        """Failure records, oldest failure first, detached from any session; ``limit`` of them
        after the first ``offset``, when given."""
        stmt = select(Failure).order_by(Failure.job, Failure.first_failed_at, Failure.row_key)
        if job_name is not None:
            stmt = stmt.where(Failure.job == job_name)
        if dead_only:
            stmt = stmt.where(Failure.dead.is_(True))
        if limit is not None:
            stmt = stmt.limit(limit).offset(offset)
        with Session(connection, expire_on_commit=False) as session:
            found = list(session.scalars(stmt))
            session.expunge_all()
        return found

    def failure(self, connection: Connection, job_name: str, row_key: str) -> Failure | None:
        """One row's failure record, traceback included, detached from any session."""
        with Session(connection, expire_on_commit=False) as session:
            found = session.get(Failure, (job_name, row_key))
            if found is not None:
                session.expunge(found)
        return found

    def failing_keys(self, connection: Connection, job_name: str, row_keys: Sequence[str]) -> set[str]:
        """Which of these row keys have a failure record."""
        return set(
            connection.scalars(select(Failure.row_key).where(Failure.job == job_name, Failure.row_key.in_(row_keys)))
        )

    def delete_failures(
        self, connection: Connection, job_name: str, row_keys: Sequence[str] = (), dead_only: bool = False
    ) -> int:
        """Delete a job's failure records: these rows', its dead ones', or all of them."""
        stmt = delete(Failure).where(Failure.job == job_name)
        if row_keys:
            stmt = stmt.where(Failure.row_key.in_(row_keys))
        if dead_only:
            stmt = stmt.where(Failure.dead.is_(True))
        return int(connection.execute(stmt).rowcount or 0)

    def failure_counts(self, connection: Connection) -> dict[str, tuple[int, int]]:
        """Per job name: (rows failing and waiting to retry, dead rows)."""
        rows = connection.execute(
            select(
                Failure.job,
                func.count().filter(Failure.dead == false()),
                func.count().filter(Failure.dead == true()),
            ).group_by(Failure.job)
        )
        return {name: (int(backoff), int(dead)) for name, backoff, dead in rows}

    # -- a job's rows, for operators and admins ----------------------------------------------------------

    def pending_count(self, connection: Connection, job: FlagJob) -> int:
        """Rows waiting for this job (dead and backing-off rows included); rides the partial index."""
        return int(connection.execute(select(func.count()).select_from(job.table).where(job.pending())).scalar_one())

    def oldest_pending(self, connection: Connection, job: FlagJob) -> datetime | None:
        """The ``pending_since`` of the job's oldest pending row, in UTC."""
        assert job.pending_since is not None
        oldest = connection.execute(select(func.min(job.pending_since)).where(job.pending())).scalar()
        return as_utc(oldest) if oldest is not None else None

    def count_rows(self, connection: Connection | Session, stmt: Select[Any]) -> int:
        """How many rows ``stmt`` selects."""
        return int(connection.execute(select(func.count()).select_from(stmt.order_by(None).subquery())).scalar_one())

    def row_keys(
        self, connection: Connection | Session, job: FlagJob, condition: ColumnElement[bool], limit: int, after: Any = None
    ) -> list[tuple[Any, str]]:
        """(primary key, row key) of the next ``limit`` rows matching ``condition`` after ``after``."""
        walk = keyset(select(job.primary_key, row_key_sql(job)).where(condition), job.primary_key, after)
        return [(key, row_key) for key, row_key in connection.execute(walk.limit(limit))]

    def update_rows(
        self,
        connection: Connection | Session,
        job: FlagJob,
        keys: Sequence[Any],
        condition: ColumnElement[bool],
        values: dict[str, Any],
    ) -> int:
        """Set ``values`` on the rows with these primary keys that still match ``condition``."""
        bound = connection.dialect if isinstance(connection, Connection) else connection.get_bind().dialect
        changed = connection.execute(
            update(job.table).where(self.key_in(job.primary_key), condition).values(values),
            {KEYS: self.key_list(job.primary_key, keys, bound)},
        )
        return int(getattr(changed, "rowcount", 0) or 0)

    # -- backfills -----------------------------------------------------------------------------------

    def backfill_state(self, session: Session, name: str, *, lock: bool = False) -> BackfillState | None:
        """A backfill's saved state; with ``lock``, locked until the transaction ends."""
        return session.get(BackfillState, name, with_for_update=lock or None)

    def backfill_states(self, connection: Connection) -> list[BackfillState]:
        """Every saved backfill state, detached."""
        with Session(connection, expire_on_commit=False) as session:
            states = list(session.scalars(select(BackfillState)))
            session.expunge_all()
        return states

    def next_objects(self, session: Session, query: Select[Any], key: Column[Any], after: Any, limit: int) -> list[Any]:
        """The next ``limit`` ORM objects of ``query`` after the ``after`` key, in key order."""
        return list(session.scalars(keyset(query.order_by(None), key, after).limit(limit)))

    # -- run history ---------------------------------------------------------------------------------

    def open_run(self, connection: Connection, values: dict[str, Any], prune_before: datetime) -> Any:
        """Forget runs started before ``prune_before`` and record a new one; returns its id."""
        # Core statements rather than the ORM's unit of work: an idle cron tick pays for every
        # statement compiled in a fresh process, and these run in every tick.
        connection.execute(delete(RUNS).where(RUNS.c.started_at < prune_before))
        created = connection.execute(insert(RUNS).values(**values)).inserted_primary_key
        assert created is not None
        return created[0]

    def save_run(self, connection: Connection, run_id: Any, values: dict[str, Any]) -> None:
        connection.execute(update(RUNS).where(RUNS.c.id == run_id).values(**values))

    def unfinished_runs(
        self, connection: Connection, host: str, since: datetime, quiet_since: datetime
    ) -> list[tuple[int, int, datetime]]:
        """(id, pid, last heartbeat) of ``host``'s runs that recorded no end, beat at or after
        ``since`` and not since ``quiet_since``."""
        stmt = select(RUNS.c.id, RUNS.c.pid, RUNS.c.heartbeat_at).where(
            RUNS.c.outcome.is_(None),
            RUNS.c.host == host,
            RUNS.c.heartbeat_at >= since,
            RUNS.c.heartbeat_at < quiet_since,
        )
        return [(run_id, pid, as_utc(beat)) for run_id, pid, beat in connection.execute(stmt)]

    def runs_since(self, connection: Connection, since: datetime) -> list[RunRecord]:
        """Runs that were active at or after ``since``, newest first, detached."""
        stmt = select(RunRecord).where(RunRecord.heartbeat_at >= since).order_by(RunRecord.started_at.desc())
        return self._detached(connection, stmt)

    def last_run(self, connection: Connection, job_name: str | None = None) -> RunRecord | None:
        """The latest run (that covered ``job_name``, when given), detached."""
        stmt = select(RunRecord).order_by(RunRecord.started_at.desc(), RunRecord.id.desc())
        if job_name is not None:
            # Job names are stored comma-separated; match a whole name, not a prefix.
            stmt = stmt.where(("," + RunRecord.jobs + ",").contains(f",{job_name},"))
        found = self._detached(connection, stmt.limit(1))
        return found[0] if found else None

    # -- for the web page: backlog history and pages of run history ------------------------------------

    def sampled_jobs(self, connection: Connection, since: datetime) -> set[str]:
        """Names of the jobs whose pending rows were counted into the backlog history since ``since``."""
        return set(connection.scalars(select(BACKLOG.c.job).where(BACKLOG.c.sampled_at >= since).distinct()))

    def record_backlog(self, connection: Connection, jobs: Sequence[FlagJob], now: datetime, prune_before: datetime) -> None:
        """Forget samples taken before ``prune_before`` and record each job's pending rows now."""
        connection.execute(delete(BACKLOG).where(BACKLOG.c.sampled_at < prune_before))
        rows = [{"sampled_at": now, "job": job.name, "pending": self.pending_count(connection, job)} for job in jobs]
        if rows:
            connection.execute(insert(BACKLOG), rows)

    def backlog_since(self, connection: Connection, since: datetime) -> list[tuple[str, datetime, int]]:
        """(job, sampled at, pending) of the samples taken at or after ``since``, oldest first."""
        stmt = (
            select(BACKLOG.c.job, BACKLOG.c.sampled_at, BACKLOG.c.pending)
            .where(BACKLOG.c.sampled_at >= since)
            .order_by(BACKLOG.c.sampled_at, BACKLOG.c.id)
        )
        return [(job, as_utc(at), int(pending)) for job, at, pending in connection.execute(stmt)]

    def runs_page(self, connection: Connection, limit: int, offset: int) -> list[RunRecord]:
        """``limit`` runs, newest first, after skipping the ``offset`` newest, detached."""
        stmt = select(RunRecord).order_by(RunRecord.started_at.desc(), RunRecord.id.desc()).limit(limit).offset(offset)
        return self._detached(connection, stmt)

    def run_count(self, connection: Connection) -> int:
        """How many runs the history holds."""
        return int(connection.execute(select(func.count()).select_from(RUNS)).scalar_one())

    @staticmethod
    def _detached(connection: Connection, stmt: Select[Any]) -> list[Any]:
        with Session(connection, expire_on_commit=False) as session:
            found = list(session.scalars(stmt))
            session.expunge_all()
        return found

    # -- batchjobs' own schema, and the app's flag columns ------------------------------------------------

    def schema_revision(self, connection: Connection) -> str | None:
        """The revision of batchjobs' own tables, or None when they were never created."""
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()

    @classmethod
    def add_flag_column(
        cls, op: Any, table: str, column: str, *, existing_done: bool, done_at: datetime | None = None, type_: Any = None
    ) -> None:
        """Add a flag, pending for new rows, ``existing_done`` for old ones: a NOT NULL Boolean
        (false = pending), or with ``done_at`` a nullable ``type_`` (DateTime; NULL = pending),
        where old rows that are done read ``done_at``."""
        import sqlalchemy as sa

        done: Any
        pending: Any
        if done_at is None:
            flag_type, done, pending = sa.Boolean(), sa.true(), sa.false()
        else:
            if cls.naive_times:
                done_at = done_at.astimezone(timezone.utc).replace(tzinfo=None) if done_at.tzinfo else done_at
            # A constant the server stores once, not an expression evaluated per row.
            flag_type, done, pending = type_, sa.text(f"'{done_at.isoformat(sep=' ')}'"), None
        nullable = done_at is not None
        if existing_done and cls.instant_column_defaults:
            # Existing rows take "done" from the default the column is added with, with no UPDATE
            # of every row, instantly on any table size; then new rows get "pending".
            op.add_column(table, sa.Column(column, flag_type, nullable=nullable, server_default=done))
            op.alter_column(table, column, server_default=pending, existing_type=flag_type, existing_nullable=nullable)
            return
        op.add_column(table, sa.Column(column, flag_type, nullable=nullable, server_default=pending))
        if existing_done:
            value = sa.true() if done_at is None else sa.literal(done_at, flag_type)
            op.execute(sa.table(table, sa.column(column)).update().values({column: value}))

    @classmethod
    def create_pending_index(cls, op: Any, name: str, table: str, key: str, pending: ColumnElement[bool]) -> None:
        """Create the partial index of pending rows, as :func:`batchjobs.pending_index` declares it."""
        raise NotImplementedError

    @classmethod
    def create_functions_sql(cls) -> list[str]:
        """The functions this database's statements call, created by migration 0007 (none by default)."""
        return []

    @classmethod
    def drop_functions_sql(cls) -> list[str]:
        """What undoes :meth:`create_functions_sql`."""
        return []


class Listener(Protocol):
    """Waits for "a row became pending" notifications on a connection of its own."""

    def wait(self, timeout: float) -> set[str]:
        """Block up to ``timeout`` seconds; the names of the tables notified (empty on timeout)."""
        ...

    def poll(self) -> set[str]:
        """What arrived meanwhile, without waiting."""
        ...

    def hears_itself(self, timeout: float) -> bool:
        """Send a notification from another connection and wait up to ``timeout`` seconds for it:
        False when notifications do not come back (a pooler in transaction mode hands the
        LISTEN's server connection to others between statements)."""
        ...

    def close(self) -> None: ...


class ChunkStatements:
    """One job's chunk statements, built once per run and executed with each chunk's values.

    Building a statement and its cache key costs more than handling a small chunk of rows, so
    every value that changes between chunks is a bound parameter, and SQLAlchemy's compiled
    cache finds each statement by identity from the second chunk on.
    """

    #: Whether the claim statements return each row's failure state, as :meth:`failure_states`
    #: reads it, after the row and its key (see :meth:`with_states`).
    states_in_claim = False

    def __init__(self, store: Store, job: FlagJob, limit: int) -> None:
        self.store = store
        self.job = job
        # Looked up once: reading them means a mapper lookup, and they are needed for every chunk.
        self.pk_attr = job.primary_key_attr
        self.primary_key = job.primary_key
        self.walk_order = store.walk_order(self.primary_key)
        self.claim = self.with_states(self.claim_statement(limit), suspects=True)
        self.claim_after = self.with_states(self.claim_statement(limit, keyset_walk=True), suspects=True)
        self.claim_suspect = self.with_states(self.suspect_statement(), suspects=False)
        if not self.states_in_claim:
            of_these_rows = and_(Failure.job == job.name, self.failure_keys())
            self.failures = select(Failure.row_key, Failure.attempts, held_back()).where(of_these_rows)
            self.suspect_failures = select(Failure.row_key, Failure.attempts, held_back(suspects=False)).where(of_these_rows)
        self.mark = (
            update(job.table)
            .where(store.key_in(job.primary_key))
            .values({c.name: bindparam(f"batchjobs_done_{c.name}", type_=c.type) for c in job.done_columns})
        )
        # Plain rows are named tuples: as cheap as the driver's tuples, readable as row.email.
        self.record: Any = namedtuple(f"{job.model.__name__}Row", job.fields) if job.columns else None

    def claim_statement(self, limit: int, *, keyset_walk: bool = False) -> Select[Any]:
        """Select up to ``limit`` pending rows that are not held back, locked for this transaction.

        Rows come as the job's model instance (or its ``columns``) followed by the row key. The
        key is computed by the database, the same expression the failure lookups use, so both
        agree for every key type (a UUID is text with hyphens on PostgreSQL, 32 hex digits on
        SQLite). Execute with ``now`` and ``run_started``; with ``keyset_walk``, also with
        :data:`AFTER`: only rows with a greater primary key are claimed.

        The failure check is a scalar subquery on purpose: PostgreSQL turns NOT EXISTS into an
        anti-join, and a hash anti-join loses the index order, so with stale statistics it would
        sort every pending row on every claim. A scalar subquery is looked up per row through the
        failure table's primary key while the partial pending index is walked in key order, and
        the walk stops after ``limit`` rows: O(pending + failing) at worst, never O(table).

        It is tested with IS NOT TRUE, not IS NULL: the planner guesses that IS NULL on a
        subquery keeps 0.5% of rows, so it would expect to walk the whole pending index to find
        ``limit`` rows, and past ``jit_above_cost`` it JIT-compiles every claim (milliseconds
        each). IS NOT TRUE gets the neutral guess of one half, which keeps the estimate near the
        real cost.

        The limit is part of the SQL text, not a parameter: for an unknown limit PostgreSQL's
        generic plan expects a long walk, so it would plan every claim afresh.
        """
        job = self.job
        stmt = keyset(self._claimable(), job.primary_key, bound=keyset_walk).limit(literal_column(str(int(limit)), Integer()))
        return self.store.lock_for_claim(stmt, job.table)

    @cached_property
    def claim_keys(self) -> Select[Any]:
        """:meth:`keys_statement`, built on first use: only runs given keys claim by keys."""
        return self.with_states(self.keys_statement(), suspects=True)

    def keys_statement(self) -> Select[Any]:
        """Select and lock the rows of given primary keys that are claimable, as :meth:`claim_statement`
        would claim them: pending, not held back, not locked by another transaction (skipped).

        Execute with ``now``, ``run_started`` and :data:`KEYS` bound to :meth:`Store.key_list` of the
        keys. Rows that are done, gone, held back or locked elsewhere are simply not returned.
        """
        job = self.job
        stmt = self._claimable().where(self.store.key_in(job.primary_key)).order_by(job.primary_key)
        return self.store.lock_for_claim(stmt, job.table)

    def _claimable(self) -> Select[Any]:
        """The claims' SELECT: the job's row (or its ``columns``) and row key, of pending rows not held back."""
        job = self.job
        # No LIMIT 1 needed: (job, row_key) is the failure table's primary key.
        of_this_row = and_(Failure.job == job.name, Failure.row_key == row_key_sql(job))
        is_held_back = select(true()).where(of_this_row, held_back()).scalar_subquery()
        # Table columns, not mapped attributes, for plain rows: the ORM stays out of that path.
        loaded: list[Any] = list(job.columns) if job.columns else [job.model]
        # Labelled: the same expression sits in the subquery, and an unlabelled twin confuses
        # the ORM's result mapping once the compiled statement comes from SQLAlchemy's cache.
        return select(*loaded, row_key_sql(job).label(ROW_KEY)).where(job.pending(), is_held_back.is_not(true()))

    def suspect_statement(self) -> Select[Any]:
        """Select and lock one crash suspect: a pending row whose handler ended its process before.

        Driven from the failure table (few rows) to the job's table through its primary key, the
        row key cast back to the key's type, so it costs an index probe per suspect.
        """
        job = self.job
        loaded: list[Any] = list(job.columns) if job.columns else [job.model]
        key = self.store.key_from_text(job.primary_key, FAILURES.c.row_key)
        of_this_row = and_(Failure.job == job.name, job.primary_key == key)
        stmt = (
            select(*loaded, row_key_sql(job).label(ROW_KEY))
            .join_from(job.table, Failure, of_this_row)
            .where(job.pending(), Failure.crashes > 0, ~held_back(suspects=False))
            .order_by(job.primary_key)
            .limit(1)
        )
        return self.store.lock_for_claim(stmt, job.table)

    def claim_rows(
        self,
        connection: Connection,
        session: Session | None,
        now: datetime,
        run_started: datetime,
        after: Any = None,
        *,
        suspect: bool = False,
        keys: Sequence[Any] | None = None,
    ) -> tuple[list[tuple[Any, str]], dict[str, tuple[int, bool]]]:
        """Lock pending rows: (row for the handler, row key) pairs, in key order, and the
        :meth:`failure_states` of those rows.

        ORM objects are loaded into ``session``; plain rows come straight from ``connection``.
        With ``after`` (a primary-key value), only rows with a greater key are claimed. With
        ``suspect``, one crash suspect and nothing else. With ``keys`` (primary-key values), those
        of these rows that are claimable and nothing else. The failure states take a second
        statement, unless the store's claim reads them as they are once its rows are locked
        (``states_in_claim``).
        """
        found = self._claim(connection, session, now, run_started, after, suspect, keys)
        rows = [(row, key) for row, key, *_ in found]
        if self.states_in_claim:
            return rows, {key: (attempts, bool(held)) for _, key, attempts, held in found if attempts is not None}
        if not rows:
            return rows, {}
        return rows, self.failure_states(connection, [key for _, key in rows], now, run_started, suspect=suspect)

    def with_states(self, claim: Select[Any], *, suspects: bool) -> Select[Any]:
        """The claim as executed: for a store with ``states_in_claim``, one that also returns each
        row's failure record's attempts and whether it holds the row back (with ``suspects``, as
        for the claims of the walk), read once the rows are locked."""
        return claim

    def _claim(
        self,
        connection: Connection,
        session: Session | None,
        now: datetime,
        run_started: datetime,
        after: Any,
        suspect: bool,
        keys: Sequence[Any] | None,
    ) -> list[Any]:
        """The claim's result rows: the row for the handler, its key, and what ``with_states`` adds."""
        params: dict[str, Any] = {"now": now, "run_started": run_started}
        claim = self.claim_suspect if suspect else self.claim
        if keys is not None:
            params[KEYS] = self.store.key_list(self.primary_key, keys, connection.dialect)
            claim = self.claim_keys
        elif after is not None:
            params[AFTER] = after
            claim = self.claim_after
        if self.record is None:
            assert session is not None, "ORM objects are loaded into a session"
            return list(session.execute(claim, params).all())
        make, width = self.record._make, len(self.job.columns)
        # all() fetches the chunk in one call; iterating the result would fetch row by row.
        return [(make(values[:width]), *values[width:]) for values in connection.execute(claim, params).all()]

    def failure_states(
        self, connection: Connection, keys: Sequence[str], now: datetime, run_started: datetime, *, suspect: bool = False
    ) -> dict[str, tuple[int, bool]]:
        """For claimed rows that have a failure record: row key -> (attempts so far, held back).

        Run right after the claim, as its own statement (unless the claim returns them, see
        ``states_in_claim``): under READ COMMITTED it sees every failure committed before this
        transaction got the row locks, including one recorded by another runner after the
        claim's snapshot was taken. Skipping rows held back here means
        a row is never attempted twice by overlapping runs before its backoff has passed.
        """
        params = {KEYS: self.failure_keys_value(keys, connection.dialect), "now": now, "run_started": run_started}
        rows = connection.execute(self.suspect_failures if suspect else self.failures, params)
        return {key: (attempts, bool(held)) for key, attempts, held in rows}

    def failure_keys(self) -> ColumnElement[bool]:
        """Which records :meth:`failure_states` reads: those of the row keys bound as :data:`KEYS`,
        in the form :meth:`failure_keys_value` gives them."""
        return self.store.key_in(FAILURES.c.row_key)

    def failure_keys_value(self, keys: Sequence[str], bound: SQLADialect) -> Any:
        """The value bound to :meth:`failure_keys`' parameter for these row keys."""
        return self.store.key_list(FAILURES.c.row_key, keys, bound)

    def mark_done(self, connection: Connection, keys: Sequence[Any], now: datetime) -> None:
        """Set the flag (and ``done_at``) on these rows: one UPDATE for the whole chunk."""
        if keys:
            done = {f"batchjobs_done_{name}": value for name, value in self.job.done_values(now).items()}
            keys_param = self.store.key_list(self.primary_key, keys, connection.dialect)
            connection.execute(self.mark, {KEYS: keys_param, **done})

