"""What differs on MySQL and MariaDB, on the server in $BATCHJOBS_TEST_MYSQL_URL: the pending index
without partial indexes, row and table locks, cancelling a statement with KILL QUERY, time zones,
and the refusals (an older server, a missing driver, a server that never answers)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import jobapp
import pytest
import sqlalchemy
from conftest import cli_env, run_cli, url_of
from sqlalchemy import Engine, false, func, select, text
from sqlalchemy.orm import Session
from test_connections import _timed, frozen_port  # noqa: F401 - frozen_port is a fixture
from test_plans import numbers_sql
from test_run_pending import add_items, processed

from batchjobs import BatchJobsError, Registry, run_pending
from batchjobs.admin import Selection, change_rows
from batchjobs.db import create_engine
from batchjobs.monitoring import status
from batchjobs.schema import migrate
from batchjobs.store import store_for
from batchjobs.store.mysql import check_server, server_refusal
from batchjobs.store.tables import Failure, RunRecord


def _explain(engine: Engine, stmt: Any) -> list[dict[str, Any]]:
    compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(text(f"EXPLAIN {compiled}")).mappings()]


def _shown(plan: list[dict[str, Any]]) -> str:
    return "\n".join(f"{row['table']}: type={row['type']} key={row['key']} rows={row['rows']} extra={row['Extra']}" for row in plan)


def test_claim_on_a_million_rows_with_100_pending_scans_no_table(mysql_engine: Engine) -> None:
    """Without partial indexes the pending index is (flag, key): the claim, its keyset form and the
    status queries read the pending part of it, never the table."""
    engine = mysql_engine
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO items (id, category, processed) SELECT n, 'a', n % 10000 <> 0 FROM {numbers_sql(1000000)} g"))
        conn.execute(text("ANALYZE TABLE items"))
    job = jobapp.jobs.job("process_item")
    now = datetime.now(timezone.utc)
    statements = store_for(engine).chunk_statements(job, 100)
    plans = {
        "claim": _explain(engine, statements.claim.params(now=now, run_started=now)),
        "claim after a key": _explain(engine, statements.claim_after.params(now=now, run_started=now, batchjobs_after=500000)),
        "pending count": _explain(engine, select(func.count()).select_from(job.table).where(job.pending())),
        "oldest pending": _explain(engine, select(func.min(job.pending_since)).where(job.pending())),
    }
    for name, plan in plans.items():
        print(f"{name}:\n{_shown(plan)}")
        [walk] = [row for row in plan if row["table"] == "items"]
        assert walk["key"] == "ix_items_processed_pending" and walk["type"] in ("ref", "range"), _shown(plan)
        assert int(walk["rows"]) < 1000, _shown(plan)  # the 100 pending entries, not the million rows
        assert all(row["type"] != "ALL" and "filesort" not in (row["Extra"] or "") for row in plan), _shown(plan)
    with engine.connect() as conn:
        assert store_for(engine).pending_count(conn, job) == 100


def test_the_keyset_claim_seeks_in_the_pending_index(mysql_engine: Engine) -> None:
    """Left to itself MariaDB reads "flag = false" from its start and filters the keys; a run's
    keyset claims name the pending index, found in the database, and seek to their position."""
    engine = mysql_engine
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO items (id, category, processed) SELECT n, 'a', false FROM {numbers_sql(100000)} g"))
        conn.execute(text("ANALYZE TABLE items"))
    job = jobapp.jobs.job("process_item")
    now = datetime.now(timezone.utc)
    statements = store_for(engine).chunk_statements(job, 50)
    with engine.connect() as conn, conn.begin():
        claimed, _ = statements.claim_rows(conn, Session(conn), now, now, after=90000)
    assert [row.id for row, _ in claimed] == list(range(90001, 90051))
    plan = _explain(engine, statements.claim_after.params(now=now, run_started=now, batchjobs_after=90000))
    print(_shown(plan))
    [walk] = [row for row in plan if row["table"] == "items"]
    assert walk["key"] == "ix_items_processed_pending" and walk["type"] == "range", _shown(plan)
    assert int(walk["rows"]) <= 20000, _shown(plan)  # the keys after 90,000, not all 100,000


def test_a_table_without_a_pending_index_is_still_walked(mysql_engine: Engine, behaviour: jobapp.Behaviour) -> None:
    with mysql_engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_items_processed_pending ON items"))
    add_items(mysql_engine, 30)
    assert run_pending(jobapp.jobs, mysql_engine, jobs=["process_item"], batch_size=10).done == 30
    assert all(processed(mysql_engine).values())


def _lock_wait(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT @@SESSION.innodb_lock_wait_timeout").scalar_one())


@pytest.fixture
def one_connection(mysql_engine: Engine) -> Iterator[Engine]:
    """An engine whose pool holds a single connection: whatever a command leaves set on it shows."""
    engine = create_engine(mysql_engine.url, pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()


def test_mark_done_waits_for_a_claimed_row_then_finishes(mysql_engine: Engine, one_connection: Engine) -> None:
    add_items(mysql_engine, 5)
    before = _lock_wait(one_connection)
    holder = mysql_engine.connect()
    holder.execute(text("SELECT id FROM items WHERE id = 3 FOR UPDATE"))
    released = threading.Timer(0.5, holder.commit)
    released.start()
    try:
        result = change_rows(jobapp.jobs, one_connection, "process_item", Selection(everything=True), "mark-done", lock_timeout=5)
    finally:
        released.join()
        holder.close()
    assert result.rows == 5
    # MySQL has no per-transaction setting: the session's own value is back once the chunk ends.
    assert _lock_wait(one_connection) == before


def test_mark_done_gives_up_on_a_row_locked_longer_than_the_lock_timeout(mysql_engine: Engine, one_connection: Engine) -> None:
    add_items(mysql_engine, 5)
    before = _lock_wait(one_connection)
    holder = mysql_engine.connect()
    holder.execute(text("SELECT id FROM items WHERE id = 3 FOR UPDATE"))
    started = time.monotonic()
    try:
        with pytest.raises(BatchJobsError, match=r"rows at the start stayed locked longer than 1s, 3 times; 0 rows were changed"):
            change_rows(jobapp.jobs, one_connection, "process_item", Selection(everything=True), "mark-done", lock_timeout=1)
    finally:
        holder.close()
    # Three waits of 1 s (the server's default is 50 s each), and the rolled-back chunks put the
    # session's setting back as well.
    assert time.monotonic() - started < 10
    assert _lock_wait(one_connection) == before
    assert not any(processed(mysql_engine).values())


def test_timeout_during_a_database_call_cancels_only_that_row(mysql_engine: Engine) -> None:
    """KILL QUERY from another connection ends the statement; the chunk and its connection go on."""
    engine = mysql_engine
    registry = Registry()
    calls: list[int] = []

    @registry.flag_job(jobapp.Item.processed, timeout=0.5)
    def slow_query(item: jobapp.Item, ctx: Any) -> None:
        calls.append(item.id)
        if item.id == 2:
            ctx.session.execute(text("SELECT SLEEP(30)"))
        if item.id == 4:
            try:
                ctx.session.execute(text("SELECT SLEEP(30)"))
            except Exception:  # noqa: BLE001 - a handler that swallows the cancelled statement
                pass

    add_items(engine, 5)
    started = time.monotonic()
    summary = run_pending(registry, engine)
    assert time.monotonic() - started < 20  # the sleeps were cancelled, not waited out
    assert (summary.done, summary.failed) == (3, 2)
    assert calls == [1, 2, 3, 4, 5]  # no row ran twice: the chunk was not lost
    with Session(engine) as session:
        for key in ("2", "4"):
            failure = session.get(Failure, ("slow_query", key))
            assert failure is not None and failure.error_type == "batchjobs.JobTimeout"
    assert [k for k, done in processed(engine).items() if not done] == [2, 4]


def test_a_claim_waits_for_a_locked_table_no_longer_than_the_lock_timeout(mysql_engine: Engine) -> None:
    """A migration holds the items table: the run skips that job after its wait, in one line,
    and handles the other jobs' rows."""
    engine = mysql_engine
    add_items(engine, 5)
    with Session(engine) as session, session.begin():
        session.add(jobapp.Order(id=1))
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    with engine.connect() as migration:
        migration.exec_driver_sql("LOCK TABLES items WRITE")
        started = time.monotonic()
        result = run_cli("-A", "jobapp:jobs", "run-pending", env=env)
        took = time.monotonic() - started
        migration.exec_driver_sql("UNLOCK TABLES")
    assert result.returncode == 0, result.stderr
    assert "job process_item: its table stayed locked for 5.0s (a migration?); skipped in this run" in result.stderr
    assert "send_receipt 1 done" in result.stdout
    assert not any(processed(engine).values())
    assert took < 30, took


def test_times_are_the_same_instant_whatever_the_session_time_zone(mysql_url: str) -> None:
    """DATETIME keeps no time zone: batchjobs writes and reads UTC, so sessions in other zones
    (and MySQL 8, which converts values given with an offset) agree on every instant."""
    east = create_engine(mysql_url, connect_args={"init_command": "SET time_zone = '+05:00'"})
    west = create_engine(mysql_url, connect_args={"init_command": "SET time_zone = '-08:00'"})
    jobapp.Base.metadata.create_all(east)
    migrate(east)
    add_items(east, 3)
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed, name="tz_job", backoff=lambda attempt: 30.123456)
    def fail_two(item: jobapp.Item) -> None:
        if item.id == 2:
            raise ValueError("two")

    before = datetime.now(timezone.utc)
    assert run_pending(registry, east).failed == 1
    after = datetime.now(timezone.utc)
    with Session(west) as session:
        failure = session.get(Failure, ("tz_job", "2"))
        run = session.scalars(select(RunRecord)).one()
    assert failure is not None and failure.next_attempt_at is not None
    assert before <= failure.last_failed_at <= after
    assert before <= run.started_at <= run.heartbeat_at <= after
    # Microseconds are kept: the backoff is due exactly, and "failed in this run" tells apart
    # times within one second.
    assert failure.next_attempt_at - failure.last_failed_at == timedelta(seconds=30, microseconds=123456)
    with west.connect() as conn:
        stored = conn.exec_driver_sql("SELECT CAST(last_failed_at AS CHAR) FROM batchjobs_failures").scalar()
    assert stored == failure.last_failed_at.strftime("%Y-%m-%d %H:%M:%S.%f")  # UTC wall time
    with west.connect() as conn:
        [job] = [j for j in status(registry, conn).jobs if j.name == "tz_job"]
    assert job.backoff == 1
    east.dispose()
    west.dispose()


def test_a_failure_longer_than_mysqls_text_is_recorded_whole(mysql_engine: Engine, behaviour: jobapp.Behaviour) -> None:
    """Messages and tracebacks keep up to 20,000 characters: in 4-byte characters, more than
    TEXT's 64 KiB, so batchjobs' own table has MEDIUMTEXT there."""
    message = "\N{GRINNING FACE}" * 19000
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed, name="loud")
    def loud(item: jobapp.Item) -> None:
        raise ValueError(message)

    add_items(mysql_engine, 1)
    assert run_pending(registry, mysql_engine).failed == 1
    with Session(mysql_engine) as session:
        failure = session.get(Failure, ("loud", "1"))
    assert failure is not None and failure.error_message == message
    assert len(failure.traceback.encode()) > 65535


def test_the_server_is_new_enough(mysql_engine: Engine) -> None:
    with mysql_engine.connect():
        check_server(mysql_engine.dialect)


@pytest.mark.parametrize(
    ("version", "mariadb", "refusal"),
    [
        ((10, 5, 27), True, "batchjobs needs MariaDB 10.6 or newer (for SKIP LOCKED); this server is MariaDB 10.5.27"),
        ((5, 7, 44), False, "batchjobs needs MySQL 8.0 or newer (for SKIP LOCKED); this server is MySQL 5.7.44"),
        ((10, 6, 0), True, None),
        ((11, 4, 2), True, None),
        ((8, 0, 36), False, None),
        ((9, 1, 0), False, None),
    ],
)
def test_an_older_server_is_refused_in_one_line(version: tuple[int, ...], mariadb: bool, refusal: str | None) -> None:
    assert server_refusal(version, mariadb=mariadb) == refusal


def test_a_mysql_url_without_its_driver_names_the_extra_to_install() -> None:
    """As if PyMySQL were not installed: Python refuses to import a module set to None."""
    code = "import sys; sys.modules['pymysql'] = None; from batchjobs.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "-A", "jobapp:jobs", "--database-url", "mysql://app:s3cret@127.0.0.1/app", "jobs"],
        env=cli_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: cannot use database URL 'mysql+pymysql://app:***@127.0.0.1/app': "), lines[0]
    assert lines[0].endswith("(install its driver: pip install 'batchjobs[mysql]')"), lines[0]
    assert "s3cret" not in result.stderr


def test_a_mysql_server_that_never_answers_is_given_up_on_in_one_line(frozen_port: int) -> None:  # noqa: F811
    url = f"mysql://x:s3cret@127.0.0.1:{frozen_port}/db"

    result, took = _timed("-A", "jobapp:jobs", "--database-url", url, "run-pending")
    # PyMySQL alone would wait forever for the server's greeting; batchjobs' default is 5 s.
    assert took < 15, took
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: cannot connect to mysql+pymysql://x:***@127.0.0.1:{frozen_port}/db: "), lines[0]
    assert "timed out" in lines[0]
    assert "s3cret" not in result.stderr

    check, took = _timed("-A", "jobapp:jobs", "--database-url", url, "check", "--max-pending", "10")
    assert took < 8, took
    assert check.returncode == 3 and check.stdout.startswith("BATCHJOBS UNKNOWN - cannot connect to "), check


def test_the_connect_timeout_does_not_cut_statements_short(mysql_engine: Engine) -> None:
    """The handshake's read timeout is lifted once connected."""
    engine = create_engine(mysql_engine.url, connect_timeout=1)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT SLEEP(2)").scalar() == 0
    engine.dispose()


def _updating(engine: Engine, table: str) -> bool:
    """Whether a connection to this database is running an UPDATE of ``table``."""
    with engine.connect() as conn:
        found = conn.execute(
            text("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND INFO LIKE :query"),
            {"query": f"UPDATE {table}%"},
        ).scalar_one()
    return bool(found)


def test_a_chunk_rolled_back_by_a_deadlock_runs_again(mysql_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A real deadlock between a chunk's mark and another transaction: InnoDB rolls the chunk back
    whole, and the run claims and handles those rows again instead of ending."""
    engine = mysql_engine
    add_items(engine, 5)
    registry = Registry()
    calls: list[int] = []

    @registry.flag_job(jobapp.Item.processed, columns=[jobapp.Item.id])
    def note(item: Any) -> None:
        calls.append(item.id)

    other = create_engine(engine.url, isolation_level="REPEATABLE READ")
    with other.connect() as conn:
        conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 30")
        # Heavier than the chunk (InnoDB rolls back the transaction that changed less): 2,000 rows.
        conn.execute(text(f"INSERT INTO orders (id) SELECT n FROM {numbers_sql(2000)} g"))
        # REPEATABLE READ locks the gap after the last pending-index entry: the chunk's mark,
        # which moves its rows to "processed = true" entries there, has to wait for it.
        conn.execute(text("SELECT id FROM items FORCE INDEX (ix_items_processed_pending) WHERE processed = true FOR UPDATE"))
        summary: list[Any] = []
        run = threading.Thread(target=lambda: summary.append(run_pending(registry, engine)))
        with caplog.at_level("WARNING", logger="batchjobs"):
            run.start()
            try:
                deadline = time.monotonic() + 30
                while not _updating(engine, "items"):
                    assert time.monotonic() < deadline, "the chunk's mark never waited"
                    time.sleep(0.01)
                # The chunk holds its rows and marks them (waiting for the gap, or about to): now
                # wait for one of its rows, and each waits for the other.
                assert conn.execute(text("SELECT id FROM items WHERE id = 1 FOR UPDATE")).scalar() == 1
                conn.commit()
            finally:
                run.join(60)
    other.dispose()
    assert not run.is_alive()
    assert summary and summary[0].done == 5, summary
    assert all(processed(engine).values())
    # The first attempt's rows ran again, once: nothing of that chunk had been committed.
    assert sorted(set(calls)) == [1, 2, 3, 4, 5] and len(calls) <= 10, calls
    retried = [r.getMessage() for r in caplog.records if "deadlock" in r.getMessage()]
    assert retried == ["job note: the database rolled the chunk back to break a deadlock; running it again (2 of 3)"], retried


def test_mariadbs_idle_transaction_timeout_is_lifted_in_chunks_only(mysql_url: str) -> None:
    """A server whose transactions may idle 1 s, and a handler that takes 1.5 s: each row is
    handled once, the session's limit is back after the run, and still ends other transactions."""
    limited = create_engine(
        mysql_url, pool_size=1, max_overflow=0, connect_args={"init_command": "SET SESSION idle_transaction_timeout = 1"}
    )
    with limited.connect() as conn:
        if conn.exec_driver_sql("SHOW SESSION VARIABLES LIKE 'idle_transaction_timeout'").first() is None:
            pytest.skip("this server has no idle_transaction_timeout (MySQL)")
    jobapp.Base.metadata.create_all(limited)
    migrate(limited)
    add_items(limited, 3)
    registry = Registry()
    calls: list[int] = []

    @registry.flag_job(jobapp.Item.processed, columns=[jobapp.Item.id])
    def slow(item: Any) -> None:
        calls.append(item.id)
        time.sleep(1.5)

    summary = run_pending(registry, limited)

    assert (summary.done, summary.failed) == (3, 0)
    assert calls == [1, 2, 3]
    assert all(processed(limited).values())
    with limited.connect() as conn:  # the pool's one connection, the run's
        assert conn.exec_driver_sql("SELECT @@SESSION.idle_transaction_timeout").scalar() == 1
        conn.execute(select(jobapp.Item.id).limit(1)).all()
        time.sleep(1.5)
        with pytest.raises(sqlalchemy.exc.OperationalError):
            conn.execute(select(jobapp.Item.id).limit(1)).all()
    limited.dispose()


def _explain_sent(engine: Engine, send: Any) -> list[dict[str, Any]]:
    """EXPLAIN of the one SELECT that ``send(connection)`` sends, with its own parameters."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "information_schema" not in statement:
            sent.append((statement, parameters))

    sqlalchemy.event.listen(engine, "before_cursor_execute", record)
    try:
        with engine.connect() as conn:
            send(conn)
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", record)
    [(statement, parameters)] = sent
    with engine.connect() as conn:
        return [dict(row) for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).mappings()]


def test_admin_and_backfill_walks_after_a_key_seek_in_the_pending_index(mysql_engine: Engine) -> None:
    """mark-done walks pending rows, and so does a backfill of rows whose flag is pending: each
    chunk after the first seeks to its position in the pending index, as a run's claims do,
    instead of reading "flag = false" from its start."""
    engine = mysql_engine
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO items (id, category, processed) SELECT n, 'a', false FROM {numbers_sql(100000)} g"))
        conn.execute(text("ANALYZE TABLE items"))
    job = jobapp.jobs.job("process_item")
    store = store_for(engine)
    pending = job.pending()
    walks = {
        "mark-done": lambda conn: store.row_keys(conn, job, pending, 100, after=90000),
        "mark-done of a key range": lambda conn: store.row_keys(
            conn, job, jobapp.Item.id.between(50000, 95000) & pending, 100, after=90000
        ),
        "backfill of pending rows": lambda conn: store.next_objects(
            Session(conn), select(jobapp.Item).where(jobapp.Item.processed == false()), jobapp.Item.id, 90000, 100
        ),
    }
    for name, walk in walks.items():
        plan = _explain_sent(engine, walk)
        print(f"{name}:\n{_shown(plan)}")
        [row] = plan
        assert row["key"] == "ix_items_processed_pending" and row["type"] == "range", _shown(plan)
        assert int(row["rows"]) <= 20000, _shown(plan)  # the keys after 90,000, not all 100,000
        assert "filesort" not in (row["Extra"] or ""), _shown(plan)
    with engine.connect() as conn:
        assert [key for key, _ in store.row_keys(conn, job, pending, 3, after=90000)] == [90001, 90002, 90003]


def test_the_failure_recheck_probes_the_failure_table_per_key(mysql_engine: Engine) -> None:
    """The re-check after a claim reads its keys from one JSON parameter: it probes the failure
    table's primary key for each of them, however many failure records the job has."""
    engine = mysql_engine
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batchjobs_failures (job, row_key, attempts, crashes, first_failed_at, last_failed_at,"
                " dead, error_type, error_message, traceback)"
                f" SELECT 'process_item', CAST(n AS CHAR), 1, 0, UTC_TIMESTAMP(), UTC_TIMESTAMP(), true, 'E', '', '' FROM {numbers_sql(10000)} g"
            )
        )
        conn.execute(text("ANALYZE TABLE batchjobs_failures"))
    statements = store_for(engine).chunk_statements(jobapp.jobs.job("process_item"), 100)
    now = datetime.now(timezone.utc)
    keys = [str(n) for n in range(9950, 10050)]
    plan = _explain_sent(engine, lambda conn: statements.failure_states(conn, keys, now, now))
    print(_shown(plan))
    [lookup] = [row for row in plan if row["table"] == "batchjobs_failures"]
    assert lookup["key"] == "PRIMARY" and lookup["type"] == "eq_ref", _shown(plan)
    with engine.connect() as conn:
        states = statements.failure_states(conn, keys, now, now)
    assert states == {str(n): (1, True) for n in range(9950, 10001)}
