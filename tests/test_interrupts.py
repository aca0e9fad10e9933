"""Ctrl-C, twice, and SIGHUP, on real `batchjobs run-pending` and `batchjobs worker` processes.

The terminal sends Ctrl-C to its whole foreground process group: these tests start each command
in a process group of its own and signal the group, as the terminal does. A handler blocks on a
chosen row (it touches ``reached-<row>`` and waits for ``release-<row>``, see ``jobapp``), so
every step waits for a condition, never for time to pass.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jobapp
import pytest
from conftest import BATCHJOBS, blocking_env, cli_env, run_cli, url_of, wait_for
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from test_run_pending import add_items

from batchjobs.signals import ABORTED_LINE, STOPPING_LINE
from batchjobs.store.tables import Failure

STOPPING = STOPPING_LINE.decode().strip()
ABORTED = ABORTED_LINE.decode().strip()
#: The blocking row is in the second chunk (chunks of 50): the first has committed by then.
ROW = 60

COMMANDS = {
    "run-pending": ["run-pending", "--queue", "items", "--commit-interval", "1h"],
    "worker": ["worker", "--queue", "items", "--commit-interval", "1h", "--poll-interval", "100ms"],
}


class Run:
    """A command in a process group of its own, its stderr in a file the test can read as it grows."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path) -> None:
        self.stderr_path = folder / "stderr.txt"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [BATCHJOBS, *args], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def said(self) -> list[str]:
        """The lines on stderr that are not log records (those start with their time)."""
        assert "Traceback" not in self.stderr, self.stderr
        return [line for line in self.stderr.splitlines() if line.startswith("batchjobs: ")]

    def ctrl_c(self, sig: int = signal.SIGINT) -> None:
        os.killpg(self.process.pid, sig)

    def finish(self, timeout: float = 60) -> str:
        """Its stdout once it has ended; a run that does not end in time is killed, and the test fails."""
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the command did not end within {timeout} s:\n{self.stderr}")
        return out

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.communicate(timeout=30)


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    """Commands a test started; any still running when it ends (a failed test) is killed."""
    started: list[Run] = []
    yield started
    for run in started:
        if run.process.poll() is None:
            run.kill()


def start(runs: list[Run], engine: Engine, folder: Path, args: list[str], **extra: str) -> Run:
    env = blocking_env(engine, folder, ROW, JOBAPP_EFFECTS=str(folder / "effects.txt"), JOBAPP_WRITE_NOTE="1", **extra)
    run = Run(["-A", "jobapp:jobs", *args], env, folder)
    runs.append(run)
    wait_for(lambda: (folder / f"reached-{ROW}").exists(), f"row {ROW} to be in progress", run.process)
    return run


def first_ctrl_c(run: Run) -> None:
    """Ctrl-C, and its line, said while the row is still in progress."""
    run.ctrl_c()
    wait_for(lambda: STOPPING in run.stderr, "the line saying the run stops after the current row", run.process)


def done_and_noted(engine: Engine) -> tuple[set[int], set[int]]:
    with Session(engine) as session:
        done = set(session.scalars(select(jobapp.Item.id).where(jobapp.Item.processed.is_(True))))
        noted = set(session.scalars(select(jobapp.Item.id).where(jobapp.Item.note.is_not(None))))
    return done, noted


def failure_records(engine: Engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Failure)) or 0


def assert_aborted_cleanly(engine: Engine, run: Run, tmp_path: Path) -> None:
    """Exit 130 with two lines; the aborted chunk rolled back, no failure and no crash counted,
    and the next run handles every row."""
    out = run.finish(timeout=30)
    assert run.process.returncode == 130, run.stderr
    assert run.said == [STOPPING, ABORTED]
    assert out == ""
    done, noted = done_and_noted(engine)
    assert ROW not in done and noted == done  # the handler's own write was rolled back with its chunk
    assert failure_records(engine) == 0

    again = run_cli(
        "-A", "jobapp:jobs", "run-pending", "--queue", "items",
        env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine), JOBAPP_EFFECTS=str(tmp_path / "effects.txt")),
    )
    assert again.returncode == 0, again.stderr
    assert "crash" not in again.stderr.lower() and "went away" not in again.stderr, again.stderr
    assert done_and_noted(engine)[0] == set(range(1, 121))
    assert failure_records(engine) == 0


@pytest.mark.parametrize("command", list(COMMANDS))
def test_ctrl_c_says_so_at_once_then_finishes_the_row(engine: Engine, tmp_path: Path, runs: list[Run], command: str) -> None:
    add_items(engine, 120)
    run = start(runs, engine, tmp_path, COMMANDS[command])
    first_ctrl_c(run)
    (tmp_path / f"release-{ROW}").touch()
    out = run.finish()
    assert run.process.returncode == 0, run.stderr
    assert run.said == [STOPPING]
    assert "stopped by SIGINT" in out
    assert done_and_noted(engine)[0] == set(range(1, ROW + 1))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_second_ctrl_c_aborts_the_chunk(engine: Engine, tmp_path: Path, runs: list[Run], command: str) -> None:
    add_items(engine, 120)
    run = start(runs, engine, tmp_path, COMMANDS[command])
    first_ctrl_c(run)
    run.ctrl_c()
    assert_aborted_cleanly(engine, run, tmp_path)
    assert done_and_noted(engine)[0] == set(range(1, 121))


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_ctrl_c_to_several_workers_is_one_line_and_reported_as_sigint(
    engine: Engine, tmp_path: Path, runs: list[Run], pool: str
) -> None:
    add_items(engine, 120)
    run = start(runs, engine, tmp_path, [*COMMANDS["run-pending"], "-c", "2", "--pool", pool])
    first_ctrl_c(run)
    (tmp_path / f"release-{ROW}").touch()
    out = run.finish()
    assert run.process.returncode == 0, run.stderr
    assert run.said == [STOPPING]
    assert "stopped by SIGINT" in out and "SIGTERM" not in out
    assert ROW in done_and_noted(engine)[0]


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_a_second_ctrl_c_aborts_every_workers_chunk(engine: Engine, tmp_path: Path, runs: list[Run], pool: str) -> None:
    add_items(engine, 120)
    run = start(runs, engine, tmp_path, [*COMMANDS["run-pending"], "-c", "2", "--pool", pool])
    first_ctrl_c(run)
    run.ctrl_c()
    assert_aborted_cleanly(engine, run, tmp_path)


@pytest.fixture(params=["postgresql", "mysql"])
def server_engine(request: pytest.FixtureRequest) -> Engine:
    """PostgreSQL, and MySQL/MariaDB where one answers: databases where a statement can wait."""
    return request.getfixturevalue("pg_engine" if request.param == "postgresql" else "mysql_engine")  # type: ignore[no-any-return]


def test_a_second_ctrl_c_ends_a_handler_waiting_on_the_database(server_engine: Engine, tmp_path: Path, runs: list[Run]) -> None:
    # The handler waits in pg_sleep(600) / SLEEP(600): the abort cancels it on the server, or
    # the row would stay locked for ten minutes and the next run would skip it.
    engine = server_engine
    add_items(engine, 120)
    run = start(runs, engine, tmp_path, COMMANDS["run-pending"], JOBAPP_BLOCK_IN_DB="1")
    first_ctrl_c(run)
    run.ctrl_c()
    assert_aborted_cleanly(engine, run, tmp_path)


@pytest.mark.parametrize("workers", [[], ["-c", "2"]])
def test_sighup_stops_a_run_politely_and_is_no_crash(pg_engine: Engine, tmp_path: Path, runs: list[Run], workers: list[str]) -> None:
    add_items(pg_engine, 120)
    run = start(runs, pg_engine, tmp_path, [*COMMANDS["run-pending"], *workers])
    run.ctrl_c(signal.SIGHUP)  # the terminal was closed
    (tmp_path / f"release-{ROW}").touch()
    out = run.finish()
    assert run.process.returncode == 0, run.stderr
    assert "stopped by SIGHUP" in out
    assert ROW in done_and_noted(pg_engine)[0]
    again = run_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(pg_engine)))
    assert again.returncode == 0 and "crash" not in again.stderr.lower(), again.stderr
    assert failure_records(pg_engine) == 0
