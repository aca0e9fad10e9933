"""Crash pills and lost transactions: counted, set apart, and finally dead, so the rest gets through.

Real `batchjobs run-pending` processes on every database: a handler that kills its own process,
a chunk whose connection the server ends, a table a migration keeps locked.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jobapp
import pytest
import sqlalchemy
from conftest import BATCHJOBS, blocking_env, cli_env, effects, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session
from test_run_pending import add_items, processed

from batchjobs.crashes import AbandonedMarker, InflightMarker, _take, marker_dir, take_abandoned
from batchjobs.runner import run_pending
from batchjobs.schema import migrate
from batchjobs.store import store_for
from batchjobs.store.tables import Failure

JOBS = ["process_item"]


def failure(engine: Engine, row_key: str) -> Failure | None:
    with Session(engine) as session:
        return session.scalars(select(Failure).where(Failure.job == "process_item", Failure.row_key == row_key)).first()


def test_a_row_that_kills_its_process_dies_and_the_rest_get_through(engine: Engine, tmp_path: Path) -> None:
    """100 rows in one chunk, row 50's handler kills its process, cron runs 8 times."""
    add_items(engine, 100)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine), JOBAPP_EFFECTS=str(effects_file), JOBAPP_KILL="50")
    outputs = []
    for _ in range(8):
        result = run_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", "--batch-size", "100", env=env)
        assert result.returncode in (0, -signal.SIGKILL), result.stderr
        outputs.append(result)

    done = processed(engine)
    assert sorted(key for key, is_done in done.items() if not is_done) == [50]
    pill = failure(engine, "50")
    assert pill is not None and pill.dead and pill.crashes == 3, pill
    assert pill.error_type == "batchjobs.Crashed" and "went away" in pill.error_message
    # The good rows of the crashed chunk ran apart once and succeeded: no failure record is left.
    with Session(engine) as session:
        assert session.scalars(select(Failure.row_key)).all() == ["50"]
    handled = Counter(effects(effects_file))
    assert max(handled.values()) <= 4, handled
    assert handled[50] == 3  # the pill's third crash made it dead; it never ran again
    # The run that found the crash said so in one line, and `failures` shows why the pill is dead.
    assert any("went away while handling rows" in result.stderr for result in outputs)
    shown = run_cli("-A", "jobapp:jobs", "show-failure", "process_item", "50", env=env)
    assert shown.returncode == 0 and "batchjobs.Crashed" in shown.stdout, shown.stderr
    assert "row 50: 3 attempt(s) (3 ended their worker), dead" in shown.stdout


@pytest.mark.parametrize(
    "keys",
    [["7"], ["a\nb", "c"], ["a\rb", "c"], ["x\r", "y\r\n", "z"], ["", " x ", "ü"]],
    ids=["one", "line-break", "carriage-return", "line-ends", "odd"],
)
def test_a_marker_gives_back_the_keys_of_its_last_chunk(tmp_path: Path, keys: list[str]) -> None:
    """Keys are written a line each, over a longer marker of an earlier chunk; a key with a line
    break cannot be read back from lines, and is not."""
    marker = InflightMarker(tmp_path)
    marker.set("process_item", [str(n) for n in range(1000, 1100)], datetime.now(timezone.utc))
    marker.set("process_item", keys, datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    marker.close(ended_well=False)
    taken = _take(marker.path, JOBS, JOBS)
    assert isinstance(taken, AbandonedMarker)
    assert (taken.job, taken.row_keys, taken.started_at) == ("process_item", keys, datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert not marker.path.exists()  # taken: no second run counts it again
    taken.drop()


def test_a_marker_cut_short_by_the_death_of_its_writer_is_not_misread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A write killed after its first page leaves the new header over the last chunk's keys:
    the reader says so rather than count crashes for rows of neither chunk."""
    now = datetime.now(timezone.utc)
    marker = InflightMarker(tmp_path / "worker")
    marker.set("process_item", [f"{n:08d}" for n in range(1000)], now)
    elsewhere = InflightMarker(tmp_path / "elsewhere")
    elsewhere.set("process_item", [f"{n:08d}" for n in range(5000, 6000)], now)
    next_chunk = elsewhere.path.read_bytes()
    assert len(next_chunk) > 4096
    with marker.path.open("r+b") as written:
        written.write(next_chunk[:4096])
    marker.close(ended_well=False)
    elsewhere.close(ended_well=True)
    assert _take(marker.path, JOBS, JOBS) is None
    assert "could not be read" in caplog.text and "not counted" in caplog.text


def test_the_empty_marker_of_a_worker_that_never_started_a_chunk_is_skipped_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = InflightMarker(tmp_path)
    marker.close(ended_well=False)
    assert _take(marker.path, JOBS, JOBS) is None
    assert not marker.path.exists() and caplog.text == ""


def test_a_marker_of_the_format_before_is_read(tmp_path: Path) -> None:
    """A worker of the previous release wrote its marker as one JSON object."""
    path = tmp_path / "1-2-3.json"
    path.write_text('{"pid": 7, "job": "process_item", "row_keys": ["1", "2"], "started_at": "2026-01-02T03:04:05+00:00"}')
    taken = _take(path, JOBS, JOBS)
    assert isinstance(taken, AbandonedMarker) and (taken.pid, taken.row_keys) == (7, ["1", "2"])
    taken.drop()


def test_a_worker_that_is_pid_1_of_a_container_has_its_crashes_counted(engine: Engine, tmp_path: Path) -> None:
    """Every run is pid 1 of a pid namespace of its own, as a worker restarted in a container is:
    its dead predecessor's marker names the same pid, which is alive (it is the run itself)."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot make a pid namespace here (unshare: {probe.stderr.decode().strip() or probe.returncode})")
    add_items(engine, 20)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine), JOBAPP_EFFECTS=str(effects_file), JOBAPP_KILL="10")
    as_pid_1 = ["unshare", "--pid", "--fork", "--mount-proc", BATCHJOBS, "-A", "jobapp:jobs"]
    for _ in range(6):
        result = subprocess.run([*as_pid_1, "run-pending", "--queue", "items", "--batch-size", "20"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode in (0, 137), result.stderr

    done = processed(engine)
    assert sorted(key for key, is_done in done.items() if not is_done) == [10]
    pill = failure(engine, "10")
    assert pill is not None and pill.dead and pill.crashes == 3, pill
    assert Counter(effects(effects_file))[10] == 3


def test_a_chunk_whose_connection_the_server_ends_is_counted(pg_engine: Engine, tmp_path: Path) -> None:
    """The server ends the chunk's session while row 3's handler runs: the run fails in one line,
    and the next run counts the rows that were in flight instead of repeating them blindly."""
    add_items(pg_engine, 10)
    effects_file = tmp_path / "effects.txt"
    env = blocking_env(pg_engine, tmp_path, 3, JOBAPP_EFFECTS=str(effects_file))
    run = start_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", "--commit-interval", "1h", env=env)
    wait_for(lambda: (tmp_path / "reached-3").exists(), "row 3 to be in progress", run)
    with pg_engine.connect() as conn:
        ended = conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle in transaction'"
            )
        ).scalars().all()
    assert ended == [True]
    (tmp_path / "release-3").touch()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err

    again = run_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=env)
    assert again.returncode == 0, again.stderr
    assert "went away while handling rows 1, 2, 3, 4, 5, 6, 7, 8, 9, 10" in again.stderr
    assert all(processed(pg_engine).values())
    # Every row's handler ran in the lost chunk (handlers that leave the database alone do not
    # notice it is gone), then once more apart, and that is all.
    assert Counter(effects(effects_file)) == Counter({i: 2 for i in range(1, 11)})
    assert failure(pg_engine, "3") is None  # done: its crash record was cleared


def test_handlers_longer_than_the_servers_idle_timeout_finish(pg_engine: Engine, tmp_path: Path) -> None:
    """idle_in_transaction_session_timeout shorter than a handler would end every chunk; batchjobs
    lifts it for its own chunk transactions, so each row is handled once."""
    database = pg_engine.url.database
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" SET idle_in_transaction_session_timeout = 300'))
    add_items(pg_engine, 3)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine), JOBAPP_EFFECTS=str(effects_file), JOBAPP_SLEEP="0.6")
    result = run_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=env)
    assert result.returncode == 0, result.stderr
    assert all(processed(pg_engine).values())
    assert Counter(effects(effects_file)) == Counter({1: 1, 2: 1, 3: 1})
    # The server's own setting is left as it was for everyone else.
    with sqlalchemy.create_engine(pg_engine.url).connect() as conn:
        assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "300ms"


def test_a_claim_waits_for_a_locked_table_no_longer_than_the_lock_timeout(pg_engine: Engine, tmp_path: Path) -> None:
    """A migration holds the items table: the run skips that job after its wait, in one line,
    and handles the other jobs' rows."""
    add_items(pg_engine, 5)
    with Session(pg_engine) as session, session.begin():
        session.add(jobapp.Order(id=1))
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine))
    with pg_engine.connect() as migration:
        migration.execute(text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        # --max-runtime bounds the wait too; then the default lock timeout of 5 s does.
        short = run_cli("-A", "jobapp:jobs", "run-pending", "--max-runtime", "2s", env=env)
        default = run_cli("-A", "jobapp:jobs", "run-pending", env=env)
        took = time.monotonic() - started
        migration.rollback()
    assert short.returncode == 0 and default.returncode == 0, (short.stderr, default.stderr)
    # What is left of --max-runtime once the run has started up: just under 2 s, on a busy machine less.
    assert re.search(r"job process_item: its table stayed locked for (1\.\d|2\.0)s \(a migration\?\); skipped in this run", short.stderr), short.stderr
    assert "job process_item: its table stayed locked for 5.0s (a migration?); skipped in this run" in default.stderr
    assert "send_receipt 1 done" in default.stdout
    assert not any(processed(pg_engine).values())
    assert took < 60, took  # not as long as a migration may hold the table


def test_crash_accounting_on_sqlite_beside_another_writer(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead worker's marker is counted while another process writes to the database between
    accounting's read and its write: the accounting holds the write lock from its start, so the
    other writer waits (here: gives up) instead of the accounting failing with "database is locked"."""
    monkeypatch.setenv("BATCHJOBS_STATE_DIR", str(tmp_path / "state"))
    engine = sqlalchemy.create_engine(sqlite_url)
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    add_items(engine, 3)
    store = store_for(engine)
    dead_worker = InflightMarker(marker_dir(store))
    dead_worker.set("process_item", ["2"], datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    dead_worker.close(ended_well=False)
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=0.1, isolation_level=None)
    writes: list[str] = []

    def another_writer(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT") and not writes:
            try:
                other.execute("UPDATE items SET processed = processed WHERE id = 1")
                writes.append("written")
            except sqlite3.OperationalError as error:
                writes.append(str(error))

    event.listen(store.engine, "before_cursor_execute", another_writer)
    try:
        [taken], _ = take_abandoned(store, JOBS, JOBS)
        # On the connection a run claims on, as a run counts crashes.
        with store.claiming_connection() as connection, connection.begin():
            assert taken.count(store, connection, jobapp.jobs.job("process_item"), datetime.now(timezone.utc)) == 1
        taken.drop()
    finally:
        event.remove(store.engine, "before_cursor_execute", another_writer)
        other.close()
        engine.dispose()
    assert writes == ["database is locked"]
    pill = failure(store.engine, "2")
    assert pill is not None and pill.crashes == 1


@pytest.mark.parametrize("db_url", ["postgresql", "mysql"], indirect=True)
def test_crashes_on_a_locked_table_wait_for_a_later_run_and_hold_up_no_other_job(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Counting a crash reads the job's table: bounded by the lock timeout as a claim is. Until it
    is counted the job sits out (its pill would take good rows down again) and the marker stays;
    the other jobs go on."""
    monkeypatch.setenv("BATCHJOBS_STATE_DIR", str(tmp_path / "state"))
    add_items(engine, 3)
    with Session(engine) as session, session.begin():
        session.add_all([jobapp.Order(id=n) for n in (1, 2)])
    store = store_for(engine)
    dead_worker = InflightMarker(marker_dir(store))
    dead_worker.set("process_item", ["2"], datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    dead_worker.close(ended_well=False)

    with engine.connect() as migration:
        # A migration holds the items table, so that nothing may even read it.
        migration.begin()
        if engine.dialect.name == "postgresql":
            migration.execute(text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
        else:
            migration.execute(text("LOCK TABLES items WRITE"))
        try:
            summary = run_pending(jobapp.jobs, engine, jobs=["process_item", "send_receipt"], lock_timeout=0.5, record=False)
        finally:
            if engine.dialect.name != "postgresql":
                migration.execute(text("UNLOCK TABLES"))
            migration.rollback()

    assert summary.jobs["send_receipt"].done == 2 and summary.jobs["process_item"].done == 0
    assert "its crashes are counted next time" in caplog.text
    assert dead_worker.path.exists() and failure(engine, "2") is None

    again = run_pending(jobapp.jobs, engine, jobs=["process_item"], record=False)
    assert again.done == 3 and not dead_worker.path.exists()
    assert "went away while handling rows 2" in caplog.text


@pytest.mark.parametrize("fault", ["not-a-folder", "file-too-large"])
def test_a_marker_that_cannot_be_written_stops_the_run_in_one_line(pg_engine: Engine, tmp_path: Path, fault: str) -> None:
    """No marker, no protection from a row that takes its worker down: the run stops before any
    handler runs, in one line, and the rows stay pending."""
    add_items(pg_engine, 5)
    effects_file = tmp_path / "effects.txt"
    state = tmp_path / "state"
    limit: Any = None
    if fault == "not-a-folder":
        state.write_text("a file where the state folder should be")
        state = state / "below"
    else:
        import resource

        # Writes past 64 bytes fail with EFBIG (Python ignores SIGXFSZ): a marker is longer.
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine), BATCHJOBS_STATE_DIR=str(state), JOBAPP_EFFECTS=str(effects_file))
    result = subprocess.run(
        [BATCHJOBS, "-A", "jobapp:jobs", "run-pending", "--queue", "items"],
        env=env, capture_output=True, text=True, timeout=120, preexec_fn=limit,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"Error: cannot write crash markers in {state}"), result.stderr
    assert not effects_file.exists() and not any(processed(pg_engine).values())


def _dead_worker_marker(engine: Engine, row_key: str) -> InflightMarker:
    """The marker a worker of process_item left when it died in the chunk of this row."""
    marker = InflightMarker(marker_dir(store_for(engine)))
    marker.set("process_item", [row_key], datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    marker.close(ended_well=False)
    return marker


def test_a_marker_whose_count_another_run_is_making_holds_its_job_back(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one run counts a crash, another (a sibling starting beside it) must not run the
    crashed chunk's rows in an ordinary chunk; once the first dies uncounted, the next run
    takes the count over, and the crash is counted once."""
    monkeypatch.setenv("BATCHJOBS_STATE_DIR", str(tmp_path / "state"))
    add_items(engine, 3)
    with Session(engine) as session, session.begin():
        session.add(jobapp.Order(id=1))
    _dead_worker_marker(engine, "2")
    [counting], _ = take_abandoned(store_for(engine), JOBS, JOBS)

    beside = run_pending(jobapp.jobs, engine, jobs=["process_item", "send_receipt"], record=False)
    assert (beside.jobs["process_item"].done, beside.jobs["send_receipt"].done) == (0, 1)

    os.close(counting.fd)  # the counting run dies before its count commits: its lock goes with it
    after = run_pending(jobapp.jobs, engine, jobs=["process_item"], record=False)
    assert after.done == 3 and not list(counting.taken.parent.iterdir())
    record = failure(engine, "2")
    assert record is None  # counted, run apart, done: its record was cleared


def test_markers_of_jobs_a_run_does_not_run_are_left_alone(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of other jobs neither counts nor reads the table of a marker's job (it may be gone)."""
    monkeypatch.setenv("BATCHJOBS_STATE_DIR", str(tmp_path / "state"))
    marker = _dead_worker_marker(engine, "2")
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE item_comments")
        connection.exec_driver_sql("DROP TABLE items")
    with Session(engine) as session, session.begin():
        session.add(jobapp.Order(id=1))
    assert run_pending(jobapp.jobs, engine, jobs=["send_receipt"], record=False).done == 1
    assert marker.path.exists()


@pytest.mark.parametrize("db_url", ["postgresql", "mysql"], indirect=True)
def test_rows_whose_crash_is_being_counted_are_passed_by(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until a crash count commits, its rows are locked as a claim locks them: a run that claims
    meanwhile (on another host: markers are per host) passes them by instead of running them in
    an ordinary chunk."""
    monkeypatch.setenv("BATCHJOBS_STATE_DIR", str(tmp_path / "state"))
    add_items(engine, 3)
    _dead_worker_marker(engine, "2")
    store = store_for(engine)
    [taken], _ = take_abandoned(store, JOBS, JOBS)
    with store.claiming_connection() as connection, connection.begin():
        assert taken.count(store, connection, jobapp.jobs.job("process_item"), datetime.now(timezone.utc)) == 1
        monkeypatch.setenv("BATCHJOBS_STATE_DIR", str(tmp_path / "another-host"))
        beside = run_pending(jobapp.jobs, engine, jobs=["process_item"], record=False)
        assert beside.done == 2 and processed(engine) == {1: True, 2: False, 3: True}
    taken.drop()
    pill = failure(engine, "2")
    assert pill is not None and pill.crashes == 1
