"""MySQL 8 and MariaDB 10.6+: what batchjobs does differently there.

Claims lock rows with ``FOR UPDATE SKIP LOCKED`` under READ COMMITTED, as on PostgreSQL, so any
number of runners on any number of hosts take disjoint rows. MySQL has no ``FOR NO KEY UPDATE``:
an insert into a table that references a claimed row waits until the chunk commits. Nor has it
partial indexes: the pending index is on (flag, primary key), whose pending part is walked in key
order. Times are stored as naive UTC in ``DATETIME(6)`` (see ``UTCDateTime``), so the server's
time zone never matters.

MySQL has no per-transaction settings (PostgreSQL's ``SET LOCAL``): a lock wait limit, and the
lifting of MariaDB's idle transaction timeouts in chunks, change the session's setting and put it
back when the transaction ends. InnoDB breaks a deadlock by rolling one transaction back whole;
the run loop runs such a chunk again (see :meth:`MySQLStore.is_deadlock`).
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import socket
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    Integer,
    Select,
    String,
    Table,
    Uuid,
    and_,
    bindparam,
    case,
    column,
    delete,
    event,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList, ColumnClause, False_, Null
from sqlalchemy.sql.selectable import Subquery

from batchjobs.errors import BatchJobsError
from batchjobs.store.base import (
    KEYS,
    PENDING_FLAG,
    ROW_KEY,
    ChunkStatements,
    Store,
    first_failure_values,
    keyset,
    row_key_sql,
)
from batchjobs.store.base import held_back as held_back_condition
from batchjobs.store.tables import FAILURES, RUNS, Failure, UTCDateTime

if TYPE_CHECKING:
    from batchjobs.failures import RowFailure
    from batchjobs.registry import FlagJob

#: The oldest releases with SKIP LOCKED.
MINIMUM_MYSQL = (8, 0)
MINIMUM_MARIADB = (10, 6)

#: MySQL's error number for a lock wait that ran out.
ER_LOCK_WAIT_TIMEOUT = 1205
#: MySQL's error number for a deadlock: the server rolled the whole transaction back.
ER_LOCK_DEADLOCK = 1213
#: MySQL's error numbers for a table, and a column, that a statement names and the schema lacks.
ER_NO_SUCH_TABLE = 1146
ER_BAD_FIELD_ERROR = 1054

#: MariaDB's limits on how long a transaction may wait for its client's next statement.
IDLE_TRANSACTION_LIMITS = ("idle_readonly_transaction_timeout", "idle_transaction_timeout", "idle_write_transaction_timeout")
#: Connection.info key: the session settings changed for this transaction, to put back at its end.
_RESTORE = "batchjobs_restore_session"


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
        def _connect(dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> Any:
            # The URL (?connect_timeout=N) and connect_args win over batchjobs' default.
            cparams.setdefault("connect_timeout", timeout)
            # PyMySQL's connect_timeout bounds the TCP connect only: a server that accepts and
            # never answers would hold the handshake forever. A read timeout would bound it, but
            # would stay for every statement after it. A read timeout of the app's own is kept.
            if driver == "pymysql" and "read_timeout" not in cparams and "defer_connect" not in cparams:
                return _pymysql_connect(dialect.loaded_dbapi, cparams)
            return None

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        #: Per (table, flag column name): the quoted name of its pending index, "" for none.
        self._seek_indexes: dict[tuple[Table, str], str] = {}

    # MySQL defaults to REPEATABLE READ, where the failure re-check after the claim would read
    # the transaction's first snapshot, and locking reads take gap locks.
    claim_isolation_level = "READ COMMITTED"

    def walk_order(self, key: Column[Any]) -> Callable[[Any, Any], bool]:
        # MariaDB's native UUID type orders its values by their last group first, unlike Python:
        # like text keys (see the base class), a walk over them moved if the key is another one.
        return operator.ne if isinstance(key.type, Uuid) else super().walk_order(key)

    def key_from_text(self, key: ColumnElement[Any], text_key: ColumnElement[str]) -> ColumnElement[Any]:
        # Both compare a UUID key (MariaDB's native type, or SQLAlchemy's CHAR(32)) with its text
        # as it is; SQLAlchemy renders no CAST to UUID here, and warns each time it leaves one out.
        if isinstance(key.type, Uuid):
            return text_key
        return super().key_from_text(key, text_key)

    def lock_for_claim(self, stmt: Select[Any], table: Table) -> Select[Any]:
        # OF is rendered where the server has it (MySQL 8). Either way only the claimed rows are
        # locked: not the failure records the claim reads, nor rows it passes by (READ COMMITTED).
        return stmt.with_for_update(skip_locked=True, of=table)

    # -- driver and server behaviour -----------------------------------------------------------------

    def limit_lock_wait(self, connection: Connection | Session, seconds: float) -> None:
        # Whole seconds, at least 1.
        _set_for_transaction(connection, {"innodb_lock_wait_timeout": max(1, math.ceil(seconds))})

    def transaction_limits(self, connection: Connection) -> list[str]:
        # MariaDB ends a transaction that waits for its client longer than these (MySQL has no
        # such setting: its wait_timeout, 8 hours by default, bounds any idle connection).
        names = ", ".join(f"'{name}'" for name in IDLE_TRANSACTION_LIMITS)
        rows = connection.exec_driver_sql(f"SHOW SESSION VARIABLES WHERE Variable_name IN ({names}) AND Value <> '0'")
        return sorted(str(name) for name, _ in rows)

    def lift_transaction_limits(self, connection: Connection | Session, names: Sequence[str]) -> None:
        _set_for_transaction(connection, {name: 0 for name in names if name in IDLE_TRANSACTION_LIMITS})

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        return _error_number(error) == ER_LOCK_WAIT_TIMEOUT

    def is_schema_error(self, error: DBAPIError) -> bool:
        # PyMySQL raises an unknown column as OperationalError, as it does a lost connection.
        return _error_number(error) in (ER_NO_SUCH_TABLE, ER_BAD_FIELD_ERROR)

    def is_deadlock(self, error: DBAPIError) -> bool:
        # InnoDB breaks a deadlock by rolling back one transaction whole (a lock wait timeout
        # undoes only the statement). The deadlock may have hit a handler's own statement, and
        # what reaches the run loop is then the error of rolling back the handler's savepoint,
        # which went with the transaction: so the errors it arose from count too.
        seen: BaseException | None = error
        for _ in range(10):
            if seen is None:
                return False
            orig = seen.orig if isinstance(seen, DBAPIError) else seen
            args = getattr(orig, "args", ())
            if args and args[0] == ER_LOCK_DEADLOCK:
                return True
            seen = seen.__cause__ or seen.__context__
        return False

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

    # -- seeking in the pending index ---------------------------------------------------------------

    def seek_index(self, connection: Connection | Session, table: Table, flag: Column[Any], key: Column[Any]) -> str | None:
        """The quoted name of an index on (flag, key, ...) of ``table``, if it has one.

        For ``flag = false AND key > :after ... ORDER BY key LIMIT n`` MariaDB reads the pending
        index from the start of ``flag = false`` and filters the keys (ref access), so each chunk
        of a long walk would pass every entry before its position. Told to use that index, it
        seeks to the position (range access). Asked of the database rather than taken from the
        models: forcing an index that does not exist is an error, and forcing one on other
        columns would walk the whole table. Asked once per table and flag for this Store.
        """
        found = self._seek_indexes.get((table, flag.name))
        if found is None:
            bound = connection.get_bind() if isinstance(connection, Session) else connection
            quote = bound.dialect.identifier_preparer.quote
            # SHOW INDEX reads this one table's definition. A query of information_schema.STATISTICS
            # may open every table of every database on the server, waiting on their metadata locks.
            where = f" FROM {quote(table.schema)}" if table.schema else ""
            columns: dict[str, dict[int, str]] = {}
            for row in connection.execute(text(f"SHOW INDEX FROM {quote(table.name)}{where}")).mappings():
                columns.setdefault(row["Key_name"], {})[int(row["Seq_in_index"])] = row["Column_name"]
            names = sorted(name for name, seq in columns.items() if seq.get(1) == flag.name and seq.get(2) == key.name)
            found = self._seek_indexes[table, flag.name] = str(quote(names[0])) if names else ""
        return found or None

    def _seeking(self, connection: Connection | Session, stmt: Select[Any], key: Column[Any], condition: Any) -> Select[Any]:
        """``stmt`` told to walk the pending index of a flag that ``condition`` requires pending."""
        table = key.table
        if not isinstance(table, Table) or condition is None:
            return stmt
        for flag in _pending_flags(condition, table):
            index = self.seek_index(connection, table, flag, key)
            if index is not None:
                # "*": the hint is for this store's own dialects, MySQL and MariaDB alike.
                return stmt.with_hint(table, f"FORCE INDEX ({index})", "*")
        return stmt

    def row_keys(
        self, connection: Connection | Session, job: FlagJob, condition: ColumnElement[bool], limit: int, after: Any = None
    ) -> list[tuple[Any, str]]:
        # mark-done walks pending rows only: in the pending index, like a run's claims.
        walk = keyset(select(job.primary_key, row_key_sql(job)).where(condition), job.primary_key, after)
        walk = self._seeking(connection, walk, job.primary_key, condition)
        return [(key, row_key) for key, row_key in connection.execute(walk.limit(limit))]

    def next_objects(self, session: Session, query: Select[Any], key: Column[Any], after: Any, limit: int) -> list[Any]:
        # A backfill of rows whose flag is pending walks the pending index, like a run's claims.
        walk = self._seeking(session, keyset(query.order_by(None), key, after), key, query.whereclause)
        return list(session.scalars(walk.limit(limit)))

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
    """The chunk statements, with a keyset claim that seeks in the pending index (see
    :meth:`MySQLStore.seek_index`)."""

    #: Whether the database was asked for an index to seek in (once per run, at the first keyset claim).
    looked_up = False

    # The re-check's keys travel as one JSON array, read by JSON_TABLE, rather than as a hundred
    # parameters of an IN list: the statement text is the same for every chunk, and the driver
    # escapes one string instead of a hundred. Not so the mark: an UPDATE joined to JSON_TABLE
    # may read the table first, and wait for rows another run holds; MariaDB before 11.1 runs
    # "IN (subquery)" of a single-table UPDATE for every row of the table.

    def failure_keys(self) -> ColumnElement[bool]:
        return FAILURES.c.row_key.in_(select(_json_keys("VARCHAR(255)").c.k))

    def failure_keys_value(self, keys: Sequence[str], bound: Dialect) -> Any:
        return json.dumps(list(keys))

    def claim_statement(self, limit: int, *, keyset_walk: bool = False) -> Select[Any]:
        """The claim of :meth:`ChunkStatements.claim_statement`, whose per-row failure lookup runs
        only when the job has failure records at all.

        MariaDB evaluates the uncorrelated "any record of this job" once, when it plans the
        statement; when there is none, the per-row lookup (a dependent subquery, one probe of
        the failure table per row read) is planned away. Where the job has records, each row is
        looked up as before. The re-check after the claim (``failure_states``) is unchanged.
        """
        job = self.job
        of_this_row = and_(Failure.job == job.name, Failure.row_key == row_key_sql(job))
        held_back = select(true()).where(of_this_row, held_back_condition()).scalar_subquery()
        has_records = select(literal(1)).where(Failure.job == job.name).exists()
        loaded: list[Any] = list(job.columns) if job.columns else [job.model]
        stmt = keyset(
            select(*loaded, row_key_sql(job).label(ROW_KEY)).where(job.pending(), or_(~has_records, held_back.is_not(true()))),
            job.primary_key,
            bound=keyset_walk,
        ).limit(literal_column(str(int(limit)), Integer()))
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
        if after is not None and keys is None and not self.looked_up:
            self.looked_up = True
            job = self.job
            assert isinstance(self.store, MySQLStore)
            index = self.store.seek_index(connection, job.table, job.flag, job.primary_key)
            if index is not None:
                # "*": the hint is for this store's own dialects, MySQL and MariaDB alike.
                self.claim_after = self.claim_after.with_hint(self.job.table, f"FORCE INDEX ({index})", "*")
        return super().claim_rows(connection, session, now, run_started, after, suspect=suspect, keys=keys)


def _json_keys(sql_type: str) -> Subquery:
    """The keys of a JSON array bound as :data:`KEYS`, as a derived table of one column, ``k``."""
    rows = text(f"SELECT k FROM JSON_TABLE(:{KEYS}, '$[*]' COLUMNS (k {sql_type} PATH '$')) AS batchjobs_json")
    return rows.bindparams(bindparam(KEYS, type_=String())).columns(column("k")).subquery("batchjobs_keys")


def _pending_flags(condition: ColumnElement[bool], table: Table) -> list[Column[Any]]:
    """Columns of ``table`` that ``condition`` requires to be false or NULL, as pending flags
    are, among the conditions it ANDs together."""
    found: list[Column[Any]] = []
    clauses: list[Any] = [condition]
    while clauses:
        clause = clauses.pop()
        if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
            clauses.extend(clause.clauses)
        elif (
            isinstance(clause, BinaryExpression)
            and isinstance(clause.left, Column)
            and clause.left.table is table
            # "= false" and "IS NULL" seek in an index; MariaDB reads "IS false" as a truth test
            # and cannot.
            and (
                (clause.operator is operators.eq and isinstance(clause.right, False_))
                or (clause.operator is operators.is_ and isinstance(clause.right, Null))
            )
        ):
            found.append(clause.left)
    return found


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


def _pymysql_connect(pymysql: Any, cparams: dict[str, Any]) -> Any:
    """A PyMySQL connection whose handshake gives up after ``connect_timeout`` seconds.

    The socket is batchjobs' own, handed to PyMySQL's ``connect(sock)``: if the server has not
    finished the handshake by then, the socket is shut down, which ends PyMySQL's wait for it.
    Once connected, the socket is PyMySQL's as usual (no timeout on statements).
    """
    seconds = float(cparams["connect_timeout"])
    connection = pymysql.connect(**cparams, defer_connect=True)
    try:
        if connection.unix_socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(seconds)
            sock.connect(connection.unix_socket)
        else:
            sock = socket.create_connection((connection.host, connection.port), seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as error:
        # As PyMySQL words it when it connects by itself.
        where = connection.unix_socket or connection.host
        raise pymysql.OperationalError(2003, f"Can't connect to MySQL server on {where!r} ({error})") from error
    lock = threading.Lock()
    state = {"connected": False, "timed_out": False}

    def give_up() -> None:
        with lock:
            if not state["connected"]:
                state["timed_out"] = True
                sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        connection.connect(sock)
        with lock:
            state["connected"] = not state["timed_out"]
    except pymysql.Error as error:
        if state["timed_out"]:
            raise pymysql.OperationalError(
                2013, f"timed out after {seconds:g}s waiting for the server to answer the connection"
            ) from error
        raise
    finally:
        timer.cancel()
    if not state["connected"]:
        with contextlib.suppress(pymysql.Error, OSError):
            connection.close()
        raise pymysql.OperationalError(2013, f"timed out after {seconds:g}s waiting for the server to answer the connection")
    return connection


def _set_for_transaction(connection: Connection | Session, settings: dict[str, int]) -> None:
    """Change session settings for the current transaction only.

    MySQL has no setting that ends with the transaction (PostgreSQL's SET LOCAL), so each
    session value is saved, changed, and put back when this transaction ends: a pooled
    connection (perhaps the app's own) keeps its own settings. ``settings`` names come from this
    module, never from input.
    """
    if not settings:
        return
    conn = connection if isinstance(connection, Connection) else connection.connection()
    # A setting changed twice in one transaction keeps the value saved the first time.
    changed: set[str] = conn.info.setdefault(_RESTORE, set())
    assignments = [
        *(f"@batchjobs_{name} = @@SESSION.{name}" for name in settings if name not in changed),
        *(f"SESSION {name} = {int(value)}" for name, value in settings.items()),
    ]
    conn.exec_driver_sql("SET " + ", ".join(assignments))
    changed.update(settings)
    # One listener per connection, however many transactions it runs (a run's connection runs
    # one per chunk); it does nothing unless this transaction changed something.
    for end in ("commit", "rollback"):
        if not event.contains(conn, end, _restore_session):
            event.listen(conn, end, _restore_session)


def _restore_session(ended: Connection) -> None:
    changed = ended.info.pop(_RESTORE, None)
    if not changed:
        return
    restore = ", ".join(f"SESSION {name} = @batchjobs_{name}" for name in sorted(changed))
    # Straight to the driver: the transaction is ending, SQLAlchemy's is no place for a
    # statement now. SET is not transactional, so it holds whether the end commits or not.
    cursor = ended.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"SET {restore}")
    finally:
        cursor.close()


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
