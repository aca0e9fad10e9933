"""PostgreSQL (production): every statement and psycopg detail batchjobs needs there.

Claims lock rows with ``FOR NO KEY UPDATE SKIP LOCKED``, so any number of runners on any number
of hosts take disjoint rows, and inserts into tables that reference a claimed row go on.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import uuid
from collections.abc import Iterable, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Numeric,
    Select,
    SmallInteger,
    String,
    Table,
    any_,
    bindparam,
    case,
    cast,
    column,
    event,
    func,
    literal_column,
    null,
    select,
    text,
)
from sqlalchemy import Dialect as SQLADialect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.dml import Insert

from batchjobs.errors import BatchJobsError
from batchjobs.store.base import KEYS, ROW_KEY, ChunkStatements, Listener, Store, value_type
from batchjobs.store.base import held_back as held_back_condition
from batchjobs.store.tables import FAILURES

if TYPE_CHECKING:
    from batchjobs.registry import FlagJob


#: The channel batchjobs' triggers notify and workers LISTEN on; the payload is the table's name.
CHANNEL = "batchjobs"
#: How a listener's notification to itself starts (see _Listener.hears_itself): no table's name.
_PROBE = "batchjobs-probe:"
#: Connection record info key: whether the URL or connect_args set prepare_threshold.
_THRESHOLD_CHOSEN = "batchjobs_prepare_threshold_chosen"
#: psycopg's own default: a statement is prepared on the server after its fifth run.
PREPARE_AFTER = 5
#: The function a claim reads its rows' failure records through (created by migration 0007),
#: and the columns of the records it returns, with their PostgreSQL types.
FAILURES_NOW = "batchjobs_failures_now"
FAILURES_NOW_COLUMNS = {
    "row_key": "varchar",
    "attempts": "integer",
    "dead": "boolean",
    "next_attempt_at": "timestamptz",
    "last_failed_at": "timestamptz",
    "crashes": "integer",
}


def _quote(name: str) -> str:
    # Always quoted: the name is then exactly the one SQLAlchemy created the table or column with.
    return '"' + name.replace('"', '""') + '"'


def _trigger(flag: str, kind: str) -> str:
    # Trigger names are per table, so the flag column tells a table's triggers apart.
    return f"batchjobs_{flag}_{kind}"[:63]


def _prepare_when_direct(dbapi_connection: Any, record: Any) -> None:
    """Let psycopg prepare statements again on a connection that reaches PostgreSQL itself.

    Prepared statements spare the server parsing and planning each claim, a good part of a
    chunk's time; only a pooler between client and server makes them unsafe. Whatever cannot be
    told keeps the safe side: nothing prepared.
    """
    if record.info.get(_THRESHOLD_CHOSEN, True):
        return
    import psycopg

    try:
        direct = _reaches_server_directly(dbapi_connection)
        dbapi_connection.rollback()
    except (OSError, psycopg.Error):
        return
    if direct:
        dbapi_connection.prepare_threshold = PREPARE_AFTER


def _reaches_server_directly(dbapi_connection: Any) -> bool:
    """Whether this connection's socket leads to the server process itself, not to a pooler.

    Over TCP the server sees a direct client's socket as its peer: the address and port it
    reports for this session are this socket's own; through a pooler or a proxy they are the
    pooler's. Over a Unix socket (Linux) the peer is the process that listens, the postmaster,
    whose child this session's backend is; through a pooler it is the pooler.
    """
    # A duplicate of the descriptor: a socket object made from the original would close it.
    with socket.socket(fileno=os.dup(dbapi_connection.pgconn.socket)) as sock:
        family = sock.family
        local = sock.getsockname() if family in (socket.AF_INET, socket.AF_INET6) else None
        peer_pid = 0
        if family == socket.AF_UNIX and hasattr(socket, "SO_PEERCRED"):
            peer_pid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT host(client_addr), client_port, pid FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        seen = cursor.fetchone()
    if seen is None:
        return False
    address, port, backend_pid = seen
    if local is not None:
        return address is not None and (ip_address(address), port) == (ip_address(local[0]), local[1])
    if peer_pid <= 0:
        return False  # no Unix socket, or its listener is not visible from here (another container)
    try:
        # /proc/<pid>/stat: "pid (name) state ppid ..."; the name may hold spaces, not ")".
        parent = int(Path(f"/proc/{backend_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return parent == peer_pid


class _Listener:
    """LISTEN on a connection of its own, in autocommit mode, and wait with psycopg's notifies()."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.connection.exec_driver_sql(f"LISTEN {CHANNEL}")
        self.driver = self.connection.connection.driver_connection
        #: Tables notified while hears_itself() waited for its own notification.
        self.early: set[str] = set()

    def _collect(self, timeout: float) -> set[str]:
        import psycopg

        assert self.driver is not None
        tables, self.early = self.early, set()
        try:
            # The first notification ends the wait; whatever else already arrived comes with it.
            for notify in self.driver.notifies(timeout=0.0 if tables else timeout, stop_after=1):
                tables.add(notify.payload)
            for notify in self.driver.notifies(timeout=0):
                tables.add(notify.payload)
        except psycopg.Error as error:
            # Raised as SQLAlchemy raises a driver's errors, so that callers handle one kind:
            # whatever the error, this connection is done for.
            self.connection.invalidate()
            raise OperationalError(f"LISTEN {CHANNEL}", None, error, connection_invalidated=True) from error
        # Other workers' probes (see hears_itself) name no table.
        return {table for table in tables if not table.startswith(_PROBE)}

    def wait(self, timeout: float) -> set[str]:
        return self._collect(max(timeout, 0.0))

    def poll(self) -> set[str]:
        return self._collect(0.0)

    def hears_itself(self, timeout: float) -> bool:
        import psycopg

        probe = f"{_PROBE}{uuid.uuid4().hex}"
        with self.engine.begin() as other:
            other.execute(text("SELECT pg_notify(:channel, :probe)"), {"channel": CHANNEL, "probe": probe})
        assert self.driver is not None
        try:
            for notify in self.driver.notifies(timeout=timeout):
                if notify.payload == probe:
                    return True
                self.early.add(notify.payload)
        except psycopg.Error as error:
            self.connection.invalidate()
            raise OperationalError(f"LISTEN {CHANNEL}", None, error, connection_invalidated=True) from error
        return False

    def close(self) -> None:
        self.connection.close()


class PostgreSQLStore(Store):
    name = "postgresql"
    schemes = ("postgres", "postgresql")
    # Adding a column with a constant default rewrites nothing (PostgreSQL 11+).
    instant_column_defaults = True
    # psycopg 3, which batchjobs depends on; a URL naming another driver keeps it.
    default_driver = "psycopg"

    def chunk_statements(self, job: FlagJob, limit: int) -> ChunkStatements:
        return PostgreSQLChunkStatements(self, job, limit)

    @classmethod
    def create_functions_sql(cls) -> list[str]:
        # VOLATILE: the function's query takes a snapshot of its own when it starts, so it sees
        # every record committed by then; a STABLE one would share its caller's snapshot, and
        # PostgreSQL would inline it as SQL, with the same effect. It returns the columns the
        # held-back test reads, not the table's row type: no traceback travels with each claim,
        # and the table can be dropped or recreated without the function.
        columns = ", ".join(f"{name} {FAILURES_NOW_COLUMNS[name]}" for name in FAILURES_NOW_COLUMNS)
        selected = ", ".join(f"f.{name}" for name in FAILURES_NOW_COLUMNS)
        return [
            f"""CREATE OR REPLACE FUNCTION {FAILURES_NOW}(job_name varchar, row_keys varchar[])
RETURNS TABLE ({columns}) LANGUAGE sql VOLATILE AS $$
    SELECT {selected} FROM {FAILURES.name} AS f WHERE f.job = job_name AND f.row_key = ANY(row_keys)
$$"""
        ]

    @classmethod
    def drop_functions_sql(cls) -> list[str]:
        return [f"DROP FUNCTION IF EXISTS {FAILURES_NOW}(varchar, varchar[])"]

    # SKIP LOCKED and the failure re-check after locking rely on each statement seeing what
    # committed before it; a database defaulting to REPEATABLE READ would break both.
    claim_isolation_level = "READ COMMITTED"

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

    def key_from_text(self, key: ColumnElement[Any], text_key: ColumnElement[str]) -> ColumnElement[Any]:
        # PostgreSQL's casts raise on text that is no such value (MySQL's and SQLite's do not): a
        # record whose key cannot be the job's (written by hand, or before the key's type
        # changed) would fail every statement that looks its row up. Whole numbers in their
        # type's range and UUIDs are checked first; other types keep the cast.
        python_type = value_type(key.type)
        if python_type is uuid.UUID:
            is_uuid = text_key.regexp_match("^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
            return case((is_uuid, cast(text_key, key.type)), else_=null())
        if python_type is not int:
            return cast(text_key, key.type)
        if isinstance(key.type, SmallInteger):
            bits = 16
        elif isinstance(key.type, Integer) and not isinstance(key.type, BigInteger):
            bits = 32
        else:
            bits = 64
        # The digits first, then the range through numeric, which any such text casts to. The
        # CASEs nest: for a column or a bound parameter, as here, PostgreSQL evaluates a CASE's
        # result only where its condition holds (an untyped literal it would cast at once).
        lowest = literal_column(str(-(2 ** (bits - 1))), Numeric())
        in_range = cast(text_key, Numeric()).between(lowest, literal_column(str(2 ** (bits - 1) - 1), Numeric()))
        whole_number = text_key.regexp_match("^[+-]?[0-9]{1,19}$")
        return case((whole_number, case((in_range, cast(text_key, key.type)), else_=null())), else_=null())

    def key_list(self, column: ColumnElement[Any], keys: Iterable[Any], bound: SQLADialect) -> Any:
        # The column type's own conversion first, as for any parameter: a UUID stored as 32 hex
        # digits, a TypeDecorator or an Enum is sent as the database stores it. default=str then
        # writes what JSON has no type for (UUIDs, dates, decimals) as text PostgreSQL casts back.
        process = column.type.dialect_impl(bound).bind_processor(bound)
        return json.dumps([process(key) for key in keys] if process else list(keys), default=str)

    def limit_lock_wait(self, connection: Connection | Session, seconds: float) -> None:
        # Whole milliseconds, at least 1: PostgreSQL reads 0 as no limit at all.
        connection.execute(text(f"SET LOCAL lock_timeout = '{max(1, math.ceil(seconds * 1000))}ms'"))

    def is_lock_timeout(self, error: DBAPIError) -> bool:
        return getattr(error.orig, "sqlstate", None) == "55P03"  # lock_not_available

    def is_schema_error(self, error: DBAPIError) -> bool:
        return getattr(error.orig, "sqlstate", None) in ("42P01", "42703")  # undefined_table, undefined_column

    def transaction_limits(self, connection: Connection) -> list[str]:
        # transaction_timeout exists from PostgreSQL 17 on; pg_settings lists what this server has.
        rows = connection.execute(
            text(
                "SELECT name FROM pg_settings WHERE name IN "
                "('idle_in_transaction_session_timeout', 'transaction_timeout') AND setting <> '0' ORDER BY name"
            )
        )
        return list(rows.scalars())

    def lift_transaction_limits(self, connection: Connection | Session, names: Sequence[str]) -> None:
        # set_config(..., true) is SET LOCAL: it ends with the transaction, so the server's setting
        # stays in force for every other transaction, batchjobs' own short ones included.
        calls = ", ".join(f"set_config(:name_{i}, '0', true)" for i in range(len(names)))
        connection.execute(text(f"SELECT {calls}"), {f"name_{i}": name for i, name in enumerate(names)})

    @classmethod
    def pending_trigger_sql(cls, table: str, flag: str, *, boolean: bool) -> list[str]:
        quote = _quote
        became_pending = f"NEW.{quote(flag)} = false" if boolean else f"NEW.{quote(flag)} IS NULL"
        return [
            # One function for every table: the payload names the table, the channel is shared.
            f"""CREATE OR REPLACE FUNCTION batchjobs_notify_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME);
    RETURN NULL;
END $$""",
            *cls.drop_pending_trigger_sql(table, flag),
            # Per statement, not per row: a 10,000-row INSERT notifies once. Rows are nearly always
            # inserted pending; one inserted done costs a worker one empty claim.
            f"CREATE TRIGGER {quote(_trigger(flag, 'insert'))} AFTER INSERT ON {quote(table)} "
            "FOR EACH STATEMENT EXECUTE FUNCTION batchjobs_notify_pending()",
            # Per row, but filtered by WHEN in the server's C code: batchjobs marking rows done,
            # and every update that leaves the flag alone, call nothing.
            f"CREATE TRIGGER {quote(_trigger(flag, 'requeue'))} AFTER UPDATE OF {quote(flag)} ON {quote(table)} "
            f"FOR EACH ROW WHEN ({became_pending} AND OLD.{quote(flag)} IS DISTINCT FROM NEW.{quote(flag)}) "
            "EXECUTE FUNCTION batchjobs_notify_pending()",
        ]

    @classmethod
    def drop_pending_trigger_sql(cls, table: str, flag: str) -> list[str]:
        return [f"DROP TRIGGER IF EXISTS {_quote(_trigger(flag, kind))} ON {_quote(table)}" for kind in ("insert", "requeue")]

    def has_pending_trigger(self, connection: Connection, table: str, flag: str) -> bool:
        found = connection.execute(
            text("SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(:table) AND tgname IN (:insert, :requeue)"),
            {"table": _quote(table), "insert": _trigger(flag, "insert"), "requeue": _trigger(flag, "requeue")},
        ).scalar_one()
        return bool(found == 2)

    def listener(self) -> Listener:
        return _Listener(self.engine)

    def in_failed_transaction(self, dbapi_connection: Any) -> bool:
        from psycopg import pq

        return bool(dbapi_connection.pgconn.transaction_status == pq.TransactionStatus.INERROR)

    # libpq's transaction status says ACTIVE while a statement runs.
    sees_statement_in_flight = True

    def cancel_running_statement(self, dbapi_connection: Any, in_flight: bool) -> bool:
        # psycopg waits for results in Python, so an exception raised there would leave the
        # connection mid-exchange. libpq's cancel request is made for signal handlers: the
        # statement fails with QueryCanceled and the connection stays usable.
        from psycopg import pq

        if dbapi_connection.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            return False
        dbapi_connection.cancel()
        return True

    @classmethod
    def create_pending_index(cls, op: Any, name: str, table: str, key: str, pending: ColumnElement[bool]) -> None:
        # CONCURRENTLY, in an autocommit block: the app keeps writing while the index is built.
        with op.get_context().autocommit_block():
            op.create_index(name, table, [key], postgresql_where=pending, postgresql_concurrently=True)

    @classmethod
    def configure(cls, engine: Engine, *, connect_timeout: float | None = None) -> None:
        if engine.dialect.driver != "psycopg":
            return  # another driver has its own names for both settings below
        # Checked now, so that a mistyped URL fails before anything runs, not at the first connect.
        cls.prepare_threshold(engine.url.query.get("prepare_threshold"))
        # An empty value in the URL (?prepare_threshold=) never reaches connect's parameters.
        chosen_in_url = "prepare_threshold" in engine.url.query
        timeout = connect_timeout

        @event.listens_for(engine, "do_connect")
        def _connect(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
            # Without a timeout psycopg waits 130 s on a server that accepts and never answers.
            # psycopg enforces it in Python, so it bounds the startup exchange too, not only the
            # TCP connect. The URL, connect_args or $PGCONNECT_TIMEOUT win over batchjobs' default.
            if timeout is not None and "connect_timeout" not in cparams and "PGCONNECT_TIMEOUT" not in os.environ:
                cparams["connect_timeout"] = timeout
            # psycopg prepares a statement on the server after its fifth run. Behind a pooler in
            # transaction mode (pgbouncer) the next transaction may run on another server
            # connection, where that name is unknown or is another client's statement; so a new
            # connection prepares nothing until it is known to reach the server directly (see
            # _prepare_when_direct), unless the URL or connect_args chose. A URL's value arrives
            # as text, which psycopg would keep.
            _record.info[_THRESHOLD_CHOSEN] = chosen_in_url or "prepare_threshold" in cparams
            cparams["prepare_threshold"] = cls.prepare_threshold(cparams.get("prepare_threshold"))

        event.listen(engine, "connect", _prepare_when_direct)

    @staticmethod
    def prepare_threshold(value: Any) -> int | None:
        """psycopg's ``prepare_threshold`` from a URL's text or ``connect_args``; None (the
        default, also for ``none`` or an empty value) prepares nothing on the server."""
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        text_value = str(value).strip()
        if text_value.lower() in ("", "none"):
            return None
        try:
            return int(text_value)
        except ValueError:
            raise BatchJobsError(
                f"prepare_threshold={value!r}: use a whole number (runs of a statement before psycopg "
                "prepares it on the server), or none to prepare nothing"
            ) from None


class PostgreSQLChunkStatements(ChunkStatements):
    """The chunk statements, with the failure re-check inside the claim: one round trip fewer."""

    states_in_claim = True

    def with_states(self, claim: Select[Any], *, suspects: bool) -> Select[Any]:
        """The claim, locking its rows in a WITH query, joined to their failure records as they
        are once the rows are locked.

        The re-check must see a record another run committed after this statement's snapshot
        was taken (that run held the row until then, and SKIP LOCKED passed it by or reached it
        after). A subquery reads the statement's snapshot; the VOLATILE function reads one taken
        when it starts, and it starts only once every row is locked: its argument is the array
        of all the claimed keys, so the WITH query has run to its end.
        """
        job = self.job
        claimed = claim.cte("batchjobs_claimed")
        row_key = claimed.c[ROW_KEY]
        # correlate(None): the keys come from the WITH query itself, not from the enclosing row.
        keys = func.array(select(row_key).correlate(None).scalar_subquery())
        records = getattr(func, FAILURES_NOW)(job.name, keys).table_valued(
            *(column(name, FAILURES.c[name].type) for name in FAILURES_NOW_COLUMNS), name="batchjobs_records"
        )
        loaded: list[Any] = [claimed.c[c.name] for c in job.columns] if job.columns else [aliased(job.model, claimed)]
        return (
            select(*loaded, row_key, records.c.attempts, held_back_condition(records.c, suspects=suspects))
            .select_from(claimed)
            .outerjoin(records, records.c.row_key == row_key)
            .order_by(claimed.c[job.primary_key.name])
        )
