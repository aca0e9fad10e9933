"""MySQL 8 and MariaDB 10.6+: what batchjobs does differently there.

Claims lock rows with ``FOR UPDATE SKIP LOCKED`` under READ COMMITTED, as on PostgreSQL, so any
number of runners on any number of hosts take disjoint rows. MySQL has no ``FOR NO KEY UPDATE``:
an insert into a table that references a claimed row waits until the chunk commits. Nor has it
partial indexes: the pending index is on (flag, primary key), whose pending part is walked in key
order. Times are stored as naive UTC in ``DATETIME(6)`` (see ``UTCDateTime``), so the server's
time zone never matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    Select,
    Table,
    case,
    delete,
    event,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.elements import ColumnClause

from batchjobs.errors import BatchJobsError
from batchjobs.store.base import PENDING_FLAG, ChunkStatements, Store, first_failure_values
from batchjobs.store.tables import FAILURES, RUNS, Failure, UTCDateTime

if TYPE_CHECKING:
    from batchjobs.failures import RowFailure
    from batchjobs.registry import FlagJob

#: The oldest releases with SKIP LOCKED.
MINIMUM_MYSQL = (8, 0)
MINIMUM_MARIADB = (10, 6)

#: MySQL's error number for a lock wait that ran out.
ER_LOCK_WAIT_TIMEOUT = 1205

#: Connection-record flag: the connection got a read timeout only to bound its handshake.
_HANDSHAKE_TIMEOUT = "batchjobs_handshake_timeout"


class MySQLStore(Store):
    name = "mysql"
    schemes = ("mysql",)
    # Adding a column and changing a default are instant (MySQL 8.0.12+, MariaDB 10.3+).
    instant_column_defaults = True
    naive_times = True
    # Pure Python, so it installs anywhere; mysqlclient works too, named in the URL (mysql+mysqldb://).
    default_driver = "pymysql"
    extra = "mysql"

    @classmethod
    def configure(cls, engine: Engine, *, connect_timeout: float | None = None) -> None:
        driver = engine.dialect.driver
        if connect_timeout is None or driver not in ("pymysql", "mysqldb"):
            return
        # Both drivers take whole seconds.
        timeout = max(1, math.ceil(connect_timeout))

        @event.listens_for(engine, "do_connect")
        def _connect(_dialect: Any, record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
            # The URL (?connect_timeout=N) and connect_args win over batchjobs' default.
            cparams.setdefault("connect_timeout", timeout)
            # PyMySQL's connect_timeout bounds the TCP connect only: a server that accepts and
            # never answers would hold the handshake forever. A read timeout bounds it, and is
            # lifted once connected, so that no statement is cut short by it.
            if driver == "pymysql" and "read_timeout" not in cparams:
                cparams["read_timeout"] = cparams["connect_timeout"]
                record.info[_HANDSHAKE_TIMEOUT] = True

        @event.listens_for(engine, "connect")
        def _connected(dbapi_connection: Any, record: Any) -> None:
            if record.info.pop(_HANDSHAKE_TIMEOUT, False):
                # PyMySQL has no public setter; it applies this value before its next read.
                dbapi_connection._read_timeout = None

    def claiming(self) -> Engine:
        # MySQL defaults to REPEATABLE READ, where the failure re-check after the claim would read
        # the transaction's first snapshot, and locking reads take gap locks.
        return self.engine.execution_options(isolation_level="READ COMMITTED")

    def lock_for_claim(self, stmt: Select[Any], table: Table) -> Select[Any]:
        # OF is rendered where the server has it (MySQL 8). Either way only the claimed rows are
        # locked: not the failure records the claim reads, nor rows it passes by (READ COMMITTED).
        return stmt.with_for_update(skip_locked=True, of=table)

    # -- driver and server behaviour -----------------------------------------------------------------

    def limit_lock_wait(self, connection: Connection | Session, seconds: float) -> None:
        # MySQL has no setting that ends with the transaction (PostgreSQL's SET LOCAL), so the
        # session's value is saved, changed, and put back when this transaction ends: a pooled
        # connection (perhaps the app's own) keeps its own setting. Whole seconds, at least 1.
        conn = connection if isinstance(connection, Connection) else connection.connection()
        conn.exec_driver_sql(
            "SET @batchjobs_lock_wait = @@SESSION.innodb_lock_wait_timeout, "
            f"SESSION innodb_lock_wait_timeout = {max(1, math.ceil(seconds))}"
        )

        def restore(ended: Connection) -> None:
            # Straight to the driver: the transaction is ending, SQLAlchemy's is no place for a
            # statement now. SET is not transactional, so it holds whether the end commits or not.
            cursor = ended.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute("SET SESSION innodb_lock_wait_timeout = @batchjobs_lock_wait")
            finally:
                cursor.close()

        event.listen(conn, "commit", restore, once=True)
        event.listen(conn, "rollback", restore, once=True)

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        return _error_number(error) == ER_LOCK_WAIT_TIMEOUT

    def cancel_running_statement(self, dbapi_connection: Any, in_flight: bool) -> bool:
        # Raising in Python while the driver waits for the server would leave the connection in
        # the middle of an exchange. MySQL cancels a statement from another connection instead:
        # KILL QUERY ends it with error 1317 and leaves the connection and its transaction usable.
        if not in_flight:
            return False
        killer = self.engine.raw_connection()
        try:
            cursor = killer.cursor()
            cursor.execute(f"KILL QUERY {int(dbapi_connection.thread_id())}")
            cursor.close()
        finally:
            killer.close()
        return True

    # -- the run loop ------------------------------------------------------------------------------

    def chunk_statements(self, job: FlagJob, limit: int) -> ChunkStatements:
        return MySQLChunkStatements(self, job, limit)

    def record_failures(
        self, connection: Connection | Session, job: FlagJob, failures: Sequence[RowFailure], now: datetime
    ) -> None:
        if not failures:
            return
        from sqlalchemy.dialects import mysql

        table = FAILURES
        digests = self.row_digests(connection, job, [failure.row_key for failure in failures])
        stmt = mysql.insert(table).values(first_failure_values(job, failures, now, digests))
        new = stmt.inserted
        # As in Store.record_failures: the counts come from the stored row.
        attempts = table.c.attempts + 1
        crashes = table.c.crashes + new.crashes
        now_dead = or_(attempts >= job.max_attempts, crashes >= job.max_crashes)
        due = func.coalesce(new.next_attempt_at, literal(now, UTCDateTime()))
        # MySQL runs these assignments in order, each one seeing the values assigned before it:
        # whatever reads attempts and crashes comes before they are counted up.
        stmt = stmt.on_duplicate_key_update(
            [
                ("next_attempt_at", case((now_dead, None), else_=due)),
                ("dead", now_dead),
                ("attempts", attempts),
                ("crashes", crashes),
                ("last_failed_at", new.last_failed_at),
                ("error_type", new.error_type),
                ("error_message", new.error_message),
                ("traceback", new.traceback),
                ("row_digest", new.row_digest),
            ]
        )
        connection.execute(stmt)

    # -- failures, for operators ----------------------------------------------------------------------

    def failure_counts(self, connection: Connection) -> dict[str, tuple[int, int]]:
        # MySQL has no FILTER clause; COUNT skips the NULL of an unmatched CASE.
        rows = connection.execute(
            select(
                Failure.job,
                func.count(case((Failure.dead == false(), 1))),
                func.count(case((Failure.dead == true(), 1))),
            ).group_by(Failure.job)
        )
        return {name: (int(backoff), int(dead)) for name, backoff, dead in rows}

    # -- run history ---------------------------------------------------------------------------------

    def open_run(self, connection: Connection, values: dict[str, Any], prune_before: datetime) -> Any:
        # Deleting a range of started_at would lock the gap after it under REPEATABLE READ (the
        # default): two runs starting together each wait to insert into the other's gap, a
        # deadlock. A plain read finds the old runs, and only their rows are locked and deleted.
        old = list(connection.scalars(select(RUNS.c.id).where(RUNS.c.started_at < prune_before)))
        if old:
            connection.execute(delete(RUNS).where(RUNS.c.id.in_(old)))
        created = connection.execute(insert(RUNS).values(**values)).inserted_primary_key
        assert created is not None
        return created[0]

    # -- batchjobs' own schema, and the app's flag columns ------------------------------------------------

    def schema_revision(self, connection: Connection) -> str | None:
        # Every command reads the schema revision before it does anything else: the place to
        # refuse a server without SKIP LOCKED, before a claim fails with a syntax error.
        check_server(connection.dialect)
        return super().schema_revision(connection)

    @classmethod
    def create_pending_index(cls, op: Any, name: str, table: str, key: str, pending: ColumnElement[bool]) -> None:
        # pending is "flag = false", as add_flag_column builds it. InnoDB builds a secondary
        # index online: the app keeps writing meanwhile.
        flag = next(column.name for column in pending.get_children() if isinstance(column, ColumnClause))
        op.create_index(name, table, [flag, key])


class MySQLChunkStatements(ChunkStatements):
    """The chunk statements, with a keyset claim that seeks in the pending index.

    For ``flag = false AND key > :after ... ORDER BY key LIMIT n`` MariaDB reads the pending
    index from the start of ``flag = false`` and filters the keys (ref access), so each claim of
    a long drain would pass every entry before its position. Told to use that index, it seeks
    to the position (range access): twice the drain rate on MariaDB 10.11.
    """

    #: Whether the database was asked for an index to seek in (once per run, at the first keyset claim).
    looked_up = False

    def claim_rows(
        self,
        connection: Connection,
        session: Session | None,
        now: datetime,
        run_started: datetime,
        after: Any = None,
        *,
        suspect: bool = False,
    ) -> list[tuple[Any, str]]:
        if after is not None and not self.looked_up:
            self.looked_up = True
            index = _seek_index(connection, self.job)
            if index is not None:
                # "*": the hint is for this store's own dialects, MySQL and MariaDB alike.
                self.claim_after = self.claim_after.with_hint(self.job.table, f"FORCE INDEX ({index})", "*")
        return super().claim_rows(connection, session, now, run_started, after, suspect=suspect)


def _seek_index(connection: Connection, job: FlagJob) -> str | None:
    """The quoted name of an index on (flag, primary key, ...) of the job's table, if it has one.

    Asked of the database rather than taken from the models: forcing an index that does not
    exist is an error, and forcing one on other columns would walk the whole table.
    """
    table = job.table
    name = connection.execute(
        text(
            "SELECT first.INDEX_NAME FROM information_schema.STATISTICS first"
            " JOIN information_schema.STATISTICS second ON second.TABLE_SCHEMA = first.TABLE_SCHEMA"
            " AND second.TABLE_NAME = first.TABLE_NAME AND second.INDEX_NAME = first.INDEX_NAME"
            " AND second.SEQ_IN_INDEX = 2"
            " WHERE first.TABLE_SCHEMA = COALESCE(:schema, DATABASE()) AND first.TABLE_NAME = :table"
            " AND first.SEQ_IN_INDEX = 1 AND first.COLUMN_NAME = :flag AND second.COLUMN_NAME = :key"
            " ORDER BY first.INDEX_NAME LIMIT 1"
        ),
        {"schema": table.schema, "table": table.name, "flag": job.flag.name, "key": job.primary_key.name},
    ).scalar()
    return None if name is None else str(connection.dialect.identifier_preparer.quote(name))


class MariaDBStore(MySQLStore):
    """MariaDB through SQLAlchemy's ``mariadb://`` dialect (a ``mysql://`` URL works as well)."""

    name = "mariadb"
    schemes = ("mariadb",)


def check_server(dialect: Dialect) -> None:
    """Refuse, in one line, a server that is older than batchjobs supports."""
    version = tuple(part for part in dialect.server_version_info or () if isinstance(part, int))
    refusal = server_refusal(version, mariadb=bool(getattr(dialect, "is_mariadb", False)))
    if refusal is not None:
        raise BatchJobsError(refusal)


def server_refusal(version: tuple[int, ...], *, mariadb: bool) -> str | None:
    """Why batchjobs cannot work with this server version, or None."""
    product, minimum = ("MariaDB", MINIMUM_MARIADB) if mariadb else ("MySQL", MINIMUM_MYSQL)
    if version >= minimum:
        return None
    return (
        f"batchjobs needs {product} {'.'.join(map(str, minimum))} or newer (for SKIP LOCKED); "
        f"this server is {product} {'.'.join(map(str, version))}"
    )


def _error_number(error: DBAPIError) -> int | None:
    args = getattr(error.orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


@compiles(CreateIndex, "mysql")
@compiles(CreateIndex, "mariadb")
def _create_pending_index(create: CreateIndex, compiler: Any, **kw: Any) -> str:
    """A pending index (see :func:`batchjobs.pending_index`) indexes its flag before the key."""
    index = create.element
    flag = index.info.get(PENDING_FLAG)
    if flag is None:
        return str(compiler.visit_create_index(create, **kw))
    preparer = compiler.preparer
    columns = ", ".join(preparer.quote(name) for name in [flag, *(column.name for column in index.columns)])
    return f"CREATE INDEX {preparer.format_index(index)} ON {preparer.format_table(index.table)} ({columns})"
