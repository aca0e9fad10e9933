"""`batchjobs worker`: real worker processes on real databases, woken by triggers or polling."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jobapp
import psycopg
import pytest
from conftest import blocking_env, cli_env, effects, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Engine, event, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from test_run_pending import add_items, processed

from batchjobs.signals import StopRequest
from batchjobs.store.tables import Failure, RunRecord
from batchjobs.worker import run_worker, trigger_sql


def install_triggers(engine: Engine) -> None:
    with engine.begin() as connection:
        for statement in trigger_sql(jobapp.jobs, engine):
            connection.exec_driver_sql(statement)


def stop(worker: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[str, str]:
    worker.send_signal(sig)
    return worker.communicate(timeout=60)


def done_rows(engine: Engine) -> int:
    return sum(processed(engine).values())


def test_a_row_is_picked_up_on_its_commit_not_at_the_next_poll(pg_engine: Engine, tmp_path: Path) -> None:
    install_triggers(pg_engine)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine), JOBAPP_EFFECTS=str(effects_file), BATCHJOBS_HEARTBEAT_EVERY="200ms")
    worker = start_cli("-A", "jobapp:jobs", "worker", "-q", "items", "--backstop-interval", "60s", env=env)
    try:
        # The worker has drained and waits: its run is in the history, and its first drain found nothing.
        wait_for(lambda: "worker" in run_cli("-A", "jobapp:jobs", "status", env=env).stdout, "the worker to start", worker)
        for row in (1, 2, 3):
            add_items(pg_engine, 1, start=row)
            # Well inside the 60 s backstop: only the trigger's notification can have woken it.
            wait_for(lambda row=row: row in effects(effects_file), f"row {row} to be handled", worker, timeout=2)
        # The heartbeat brings the worker's counts to `status`.
        wait_for(
            lambda: "worker (items) on" in (out := run_cli("-A", "jobapp:jobs", "status", env=env).stdout) and "3 done" in out,
            "status to show the worker's 3 rows",
            worker,
            timeout=10,
        )
        check = run_cli("-A", "jobapp:jobs", "check", "--min-workers", "1", "--queue", "items", env=env)
        assert check.returncode == 0 and "1 live worker(s)" in check.stdout, check.stdout
        too_few = run_cli("-A", "jobapp:jobs", "check", "--min-workers", "2", env=env)
        assert too_few.returncode == 2 and "1 live worker(s), fewer than 2" in too_few.stdout
    finally:
        out, err = stop(worker)
    assert worker.returncode == 0, err
    assert "Traceback" not in err and "has no pending trigger" not in err, err
    assert "3 done" in out and "stopped by SIGTERM" in out


def test_a_table_without_the_trigger_gets_one_warning_and_is_polled(engine: Engine, tmp_path: Path) -> None:
    """SQLite has no notifications; a PostgreSQL table without the trigger is polled as well."""
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine), JOBAPP_EFFECTS=str(effects_file))
    worker = start_cli("-A", "jobapp:jobs", "worker", "-q", "items", "--poll-interval", "200ms", env=env)
    try:
        wait_for(lambda: "worker" in run_cli("-A", "jobapp:jobs", "status", env=env).stdout, "the worker to start", worker)
        add_items(engine, 5)
        wait_for(lambda: len(effects(effects_file)) == 5, "the rows to be polled up", worker, timeout=10)
    finally:
        out, err = stop(worker)
    assert worker.returncode == 0, err
    warnings = [line for line in err.splitlines() if "has no pending trigger" in line]
    assert len(warnings) == (1 if engine.dialect.name == "postgresql" else 0), err
    assert Counter(effects(effects_file)) == Counter(range(1, 6))


def test_a_bulk_insert_notifies_once(pg_engine: Engine) -> None:
    install_triggers(pg_engine)
    with psycopg.connect(url_of(pg_engine).replace("postgresql+psycopg", "postgresql"), autocommit=True) as listener:
        listener.execute("LISTEN batchjobs")
        add_items(pg_engine, 10_000)
        with Session(pg_engine) as session, session.begin():
            session.execute(text("UPDATE items SET processed = true WHERE id <= 5000"))  # marked done: no wake-up
            session.execute(text("UPDATE items SET note = 'x'"))  # the flag untouched: no wake-up
        with Session(pg_engine) as session, session.begin():
            session.execute(text("UPDATE items SET processed = false WHERE id <= 10"))  # requeued: a wake-up
        notes = list(listener.notifies(timeout=1))
    # One for the INSERT statement, one for the requeue transaction (PostgreSQL folds repeats).
    assert [note.payload for note in notes] == ["items", "items"]


def test_sighup_and_sigterm_finish_the_row_and_exit_0(pg_engine: Engine, tmp_path: Path) -> None:
    add_items(pg_engine, 5)
    env = blocking_env(pg_engine, tmp_path, 3)
    worker = start_cli("-A", "jobapp:jobs", "worker", "-q", "items", "--commit-interval", "1h", env=env)
    wait_for(lambda: (tmp_path / "reached-3").exists(), "row 3 to be in progress", worker)
    worker.send_signal(signal.SIGHUP)
    (tmp_path / "release-3").touch()
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    assert "stopped by SIGHUP" in out
    assert done_rows(pg_engine) == 3  # rows 1 to 3 committed; 4 and 5 wait for the next worker


def test_a_worker_and_two_cron_runs_handle_each_row_once(engine: Engine, tmp_path: Path) -> None:
    if engine.dialect.name == "postgresql":
        install_triggers(engine)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine), JOBAPP_EFFECTS=str(effects_file))
    worker = start_cli("-A", "jobapp:jobs", "worker", "-q", "items", "--poll-interval", "200ms", env=env)
    try:
        with Session(engine) as session, session.begin():
            session.execute(insert(jobapp.Item), [{"id": i} for i in range(1, 5001)])
        runs = [start_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", env=env) for _ in range(2)]
        for run in runs:
            out, err = run.communicate(timeout=300)
            assert run.returncode == 0, err
        wait_for(lambda: done_rows(engine) == 5000, "every row to be done", worker, timeout=120)
    finally:
        out, err = stop(worker)
    assert worker.returncode == 0, err
    handled = Counter(effects(effects_file))
    assert len(handled) == 5000 and set(handled.values()) == {1}


def test_a_long_backlog_does_not_starve_another_job(pg_engine: Engine, tmp_path: Path) -> None:
    """While a worker drains 20,000 rows of one job, another job's new row is handled within a chunk or so."""
    install_triggers(pg_engine)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine), JOBAPP_EFFECTS=str(effects_file), JOBAPP_SLEEP="0.001")
    worker = start_cli("-A", "jobapp:jobs", "worker", "-q", "items", "-q", "mail", "--backstop-interval", "60s", env=env)
    try:
        wait_for(lambda: "worker" in run_cli("-A", "jobapp:jobs", "status", env=env).stdout, "the worker to start", worker)
        add_items(pg_engine, 20_000)
        wait_for(lambda: len(effects(effects_file, "process_item")) >= 200, "the backlog to be under way", worker)
        with Session(pg_engine) as session, session.begin():
            session.add(jobapp.Order(id=1))
        wait_for(lambda: effects(effects_file, "send_receipt") == [1], "the order's receipt", worker, timeout=30)
        items_before = len(effects(effects_file, "process_item"))
    finally:
        stop(worker)
    # The receipt went out long before the items' backlog was through.
    assert items_before < 20_000 - 1000, items_before


@pytest.mark.parametrize("lost", ["listener", "worker"])
def test_a_lost_connection_is_one_line_and_the_worker_carries_on(pg_engine: Engine, tmp_path: Path, lost: str) -> None:
    install_triggers(pg_engine)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine), JOBAPP_EFFECTS=str(effects_file))
    worker = start_cli("-A", "jobapp:jobs", "worker", "-q", "items", "--backstop-interval", "60s", env=env)
    try:
        wait_for(lambda: "worker" in run_cli("-A", "jobapp:jobs", "status", env=env).stdout, "the worker to start", worker)
        add_items(pg_engine, 1)
        # Handled and committed: the handler's effect alone comes before its chunk's COMMIT.
        wait_for(lambda: processed(pg_engine) == {1: True}, "row 1", worker, timeout=5)
        # The LISTEN connection is the one that ran LISTEN; the working one is idle otherwise.
        which = "query LIKE 'LISTEN%'" if lost == "listener" else "query NOT LIKE 'LISTEN%' AND application_name = ''"

        def terminated() -> bool:
            with pg_engine.connect() as conn:
                ended = conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                        f"AND pid <> pg_backend_pid() AND state = 'idle' AND {which}"
                    )
                ).scalars().all()
            return bool(ended) and all(ended)

        # Idle between the worker's statements: asked until one of its connections is caught so.
        wait_for(terminated, f"the {lost}'s connection to be ended", worker, timeout=10)
        assert effects(effects_file) == [1]
        add_items(pg_engine, 2, start=2)
        # Picked up again: after the reconnect the worker drains once, then listens as before.
        wait_for(lambda: sorted(effects(effects_file)) == [1, 2, 3], "rows 2 and 3", worker, timeout=30)
    finally:
        out, err = stop(worker)
    assert worker.returncode == 0, err
    assert "Traceback" not in err
    lost_lines = [line for line in err.splitlines() if "lost its database connection" in line]
    assert len(lost_lines) <= 1, err
    assert all(processed(pg_engine).values())


def test_the_alembic_helpers_install_and_remove_the_trigger(engine: Engine) -> None:
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from batchjobs.alembic import add_pending_trigger, drop_pending_trigger
    from batchjobs.store import store_for

    store = store_for(engine)
    with engine.begin() as connection:
        add_pending_trigger(Operations(MigrationContext.configure(connection)), "items", "processed")
    with engine.connect() as connection:
        # Only PostgreSQL notifies; elsewhere the helper does nothing and workers poll.
        assert store.has_pending_trigger(connection, "items", "processed") is (engine.dialect.name == "postgresql")
    with engine.begin() as connection:
        drop_pending_trigger(Operations(MigrationContext.configure(connection)), "items", "processed")
    with engine.connect() as connection:
        assert not store.has_pending_trigger(connection, "items", "processed")


def test_an_idle_worker_polls_without_beating_every_few_seconds(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """While it waits for rows a worker writes its heartbeat twice a minute, not every beat (its
    polls of an empty table are no progress); once rows flow it beats as often as ever, with
    their counts."""
    monkeypatch.setenv("BATCHJOBS_HEARTBEAT_EVERY", "50ms")
    sent: Counter[str] = Counter()

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        words = " ".join(statement.split())
        if words.startswith("UPDATE batchjobs_runs"):
            sent["beats"] += 1
        elif "AS batchjobs_row_key FROM items" in words:
            sent["polls"] += 1

    event.listen(engine, "before_cursor_execute", count)
    stop = StopRequest()
    # Polled every 100ms (no trigger on SQLite and MySQL; none installed on PostgreSQL either).
    worker = threading.Thread(target=run_worker, args=(jobapp.jobs, engine), kwargs={"queues": ["items"], "poll_every": 0.1, "stop": stop})
    worker.start()
    try:
        wait_for(lambda: sent["polls"] >= 10, "ten polls of an empty table")
        # Ten polls took over a second: twenty beats at the old rate; the first idle beat is due after 30 s.
        assert sent["beats"] == 0, sent
        add_items(engine, 3)
        wait_for(lambda: sum(processed(engine).values()) == 3, "the rows to be handled")
        wait_for(lambda: _worker_done(engine) == 3, "a beat with the new counts")
    finally:
        stop.set("test")
        worker.join(timeout=30)
        event.remove(engine, "before_cursor_execute", count)
    assert not worker.is_alive()


def _worker_done(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(RunRecord.rows_done).where(RunRecord.kind == "worker")) or 0)


def test_a_worker_deployed_before_its_migration_stops_with_the_error(engine: Engine) -> None:
    """SQLite and MySQL report a missing column as an operational error, as they do a lost
    connection: the worker must stop with it rather than reconnect forever (the database answers)."""
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE items RENAME COLUMN processed TO processed_later")
    # Without the fix the worker logs a reconnect a second until max_runtime, then returns.
    with pytest.raises(DBAPIError, match="processed"):
        run_worker(jobapp.jobs, engine, queues=["items"], poll_every=0.1, max_runtime=10)


def test_a_worker_tries_a_failed_row_again_once_its_backoff_is_over(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    """A failed row waits out its backoff, not the worker's life: each pass of a worker is a run of its own."""
    now = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    behaviour.poison = {1}
    add_items(engine, 1)
    stop = StopRequest()
    kwargs = {"queues": ["items"], "poll_every": 0.05, "stop": stop, "clock": lambda: now[0], "record": False}
    worker = threading.Thread(target=run_worker, args=(jobapp.jobs, engine), kwargs=kwargs)
    worker.start()
    try:
        wait_for(lambda: _attempts(engine) == 1, "the first attempt to fail")
        behaviour.poison = set()
        now[0] += timedelta(hours=1)  # the backoff after a first failure is about 30 s
        wait_for(lambda: processed(engine) == {1: True}, "the row to be tried again", timeout=20)
    finally:
        stop.set("test")
        worker.join(timeout=60)


def _attempts(engine: Engine) -> int:
    with engine.connect() as connection:
        return connection.scalar(select(Failure.attempts).where(Failure.row_key == "1")) or 0


def test_a_worker_says_once_that_a_table_stays_locked(pg_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """A worker tries a locked table at every pass: one line per time the table is locked, not one a pass."""
    claims: Counter[str] = Counter()

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "SKIP LOCKED" in statement and "FROM items" in statement:
            claims["items"] += 1

    event.listen(pg_engine, "before_cursor_execute", count)
    stop = StopRequest()
    kwargs = {"queues": ["items"], "poll_every": 0.05, "lock_timeout": 0.1, "stop": stop, "record": False}
    worker = threading.Thread(target=run_worker, args=(jobapp.jobs, pg_engine), kwargs=kwargs)
    try:
        with pg_engine.connect() as migration:
            migration.begin()
            migration.execute(text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
            worker.start()
            wait_for(lambda: claims["items"] >= 5, "five claims on the locked table")
            migration.rollback()
        add_items(pg_engine, 1)
        wait_for(lambda: processed(pg_engine) == {1: True}, "the row once the table is free")
        with pg_engine.connect() as migration:
            migration.begin()
            migration.execute(text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
            tried = claims["items"]
            wait_for(lambda: claims["items"] >= tried + 3, "more claims on the table locked again")
            migration.rollback()
    finally:
        stop.set("test")
        worker.join(timeout=60)
        event.remove(pg_engine, "before_cursor_execute", count)
    said = [r.getMessage() for r in caplog.records if "its table stayed locked" in r.getMessage()]
    assert said == ["job process_item: its table stayed locked for 100ms (a migration?); skipped in this run"] * 2, said
