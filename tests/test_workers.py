"""run-pending --concurrency: process and thread workers, and a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import blocking_env, cli_env, effects, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Engine
from test_run_pending import add_items, processed


@pytest.mark.parametrize(("pool", "workers"), [("process", 4), ("thread", 8)])
def test_workers_handle_every_row_once(engine: Engine, tmp_path: Path, pool: str, workers: int) -> None:
    add_items(engine, 5000)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(JOBAPP_EFFECTS=str(effects_file), BATCHJOBS_DATABASE_URL=url_of(engine))
    result = run_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", "--concurrency", str(workers), "--pool", pool, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("batchjobs: 5000 done, 0 failed in ")
    handled = Counter(effects(effects_file))
    assert set(handled) == set(range(1, 5001)) and set(handled.values()) == {1}
    if pool == "process" and engine.dialect.name == "postgresql":
        # On PostgreSQL the work really is shared. (SQLite serialises chunks on its write lock,
        # so one fast worker may legitimately take every chunk.)
        pids = {line.split()[2] for line in effects_file.read_text().splitlines()}
        assert len(pids) > 1
    assert all(processed(engine).values())


def _with_row_60_killed(engine: Engine, tmp_path: Path, rows: int, *args: str) -> tuple[subprocess.Popen[str], str, str, str]:
    """The CLI with ``args`` over ``rows`` new items, its worker process in row 60's handler
    killed with kill -9, run to its end: (the run, the pid killed, stdout, stderr). The handlers'
    effects are in ``tmp_path/effects.txt``."""
    add_items(engine, rows)
    effects_file = tmp_path / "effects.txt"
    run = start_cli("-A", "jobapp:jobs", *args, env=blocking_env(engine, tmp_path, 60, JOBAPP_EFFECTS=str(effects_file)))
    wait_for(lambda: (tmp_path / "reached-60").exists(), "row 60 to be in progress", run)
    [victim] = {line.split()[2] for line in effects_file.read_text().splitlines() if line.split()[1] == "60"}
    os.kill(int(victim), signal.SIGKILL)
    out, err = run.communicate(timeout=300)
    return run, victim, out, err


def test_a_killed_worker_does_not_take_the_others_down(engine: Engine, tmp_path: Path) -> None:
    run, victim, out, err = _with_row_60_killed(engine, tmp_path, 2000, "run-pending", "-q", "items", "-c", "4", "--commit-interval", "1h")
    effects_file = tmp_path / "effects.txt"

    assert run.returncode == 1
    assert err.strip().splitlines()[-1] == "Error: 1 of 4 workers died; their rows are pending again"
    assert f"(pid {victim}) was killed by SIGKILL; the rows it had claimed are pending again\n" in err, err
    assert "1 worker(s) died" in out

    # The killed worker's chunk rolled back; the surviving workers or this later run take it over.
    again = run_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", env=cli_env(
        JOBAPP_EFFECTS=str(effects_file), BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert again.returncode == 0, again.stderr
    assert all(processed(engine).values())
    handled = Counter(effects(effects_file))
    assert set(handled) == set(range(1, 2001))
    # Only rows the killed worker had started (its chunk is 51-100, it died in row 60) ran twice.
    assert {k for k, n in handled.items() if n > 1} == set(range(51, 61))


def test_a_worker_invocation_stops_when_one_of_its_processes_dies(engine: Engine, tmp_path: Path) -> None:
    """A long-running invocation would work on at part strength, unseen: it says so and stops,
    for its supervisor to start it afresh (which counts the dead process's crash)."""
    run, victim, out, err = _with_row_60_killed(engine, tmp_path, 100, "worker", "-q", "items", "-c", "2", "--poll-interval", "100ms")

    assert run.returncode == 1, err
    assert f"(pid {victim}) was killed by SIGKILL; the rows it had claimed are pending again; stopping the others" in err
    assert err.strip().splitlines()[-1] == "Error: 1 of 2 workers died; their rows are pending again"
    assert "stopped by worker died" in out


def test_sigterm_reaches_every_worker(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 500)
    env = blocking_env(engine, tmp_path, 10, JOBAPP_SLEEP="0.01")
    run = start_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", "-c", "3", env=env)
    wait_for(lambda: (tmp_path / "reached-10").exists(), "row 10 to be in progress", run)
    run.send_signal(signal.SIGTERM)
    (tmp_path / "release-10").touch()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert "stopped by SIGTERM" in out
    done = sum(processed(engine).values())
    assert 0 < done < 500, out + err
    assert f"batchjobs: {done} done" in out
