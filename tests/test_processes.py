"""Real `batchjobs run-pending` processes: overlapping runs, kill -9, SIGTERM, silence when idle."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import jobapp
from conftest import blocking_env, cli_env, effects, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session
from test_run_pending import add_items


def _counts(engine: Engine) -> tuple[int, int]:
    """(done, pending) items."""
    with Session(engine) as session:
        done = session.scalar(select(func.count()).where(jobapp.Item.processed.is_(True)))
        pending = session.scalar(select(func.count()).where(jobapp.Item.processed.is_(False)))
    return int(done or 0), int(pending or 0)


def test_four_overlapping_runs_handle_each_row_exactly_once(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 5000)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(JOBAPP_EFFECTS=str(effects_file), BATCHJOBS_DATABASE_URL=url_of(engine))

    runs = [start_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=env) for _ in range(4)]
    outputs = [run.communicate(timeout=300) for run in runs]

    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
        assert "Traceback" not in err
    handled = Counter(effects(effects_file))
    assert set(handled) == set(range(1, 5001))
    assert max(handled.values()) == 1, [k for k, n in handled.items() if n > 1][:10]
    assert _counts(engine) == (5000, 0)
    # Every summary line adds up to the total: no row was counted twice either.
    total = sum(int(out.split()[1]) for out, _ in outputs if out.strip())
    assert total == 5000


def test_kill_9_mid_chunk_loses_nothing(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 300)
    effects_file = tmp_path / "effects.txt"
    env = blocking_env(engine, tmp_path, 120, JOBAPP_EFFECTS=str(effects_file), JOBAPP_WRITE_NOTE="1")
    run = start_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", "--commit-interval", "1h", env=env)
    wait_for(lambda: (tmp_path / "reached-120").exists(), "row 120 to be in progress", run)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)

    done_before, _ = _counts(engine)
    # Chunks of 50: rows 1-100 committed; the chunk holding 101-150 was rolled back.
    assert done_before == 100
    with Session(engine) as session:
        noted = set(session.scalars(select(jobapp.Item.id).where(jobapp.Item.note.is_not(None))))
        done = set(session.scalars(select(jobapp.Item.id).where(jobapp.Item.processed.is_(True))))
    assert noted == done  # the killed chunk's handler writes were rolled back too
    assert done <= set(effects(effects_file))  # nothing is done without its side effect

    again = run_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=cli_env(
        JOBAPP_EFFECTS=str(effects_file), BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert again.returncode == 0, again.stderr
    assert _counts(engine) == (300, 0)
    handled = Counter(effects(effects_file))
    assert set(handled) == set(range(1, 301))
    # At-least-once: only the killed chunk's rows that had started (101-120) ran twice.
    assert {k for k, n in handled.items() if n > 1} == set(range(101, 121))


def test_sigterm_finishes_the_current_row_then_exits(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 100)
    effects_file = tmp_path / "effects.txt"
    env = blocking_env(engine, tmp_path, 30, JOBAPP_EFFECTS=str(effects_file))
    run = start_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", "--commit-interval", "1h", env=env)
    wait_for(lambda: (tmp_path / "reached-30").exists(), "row 30 to be in progress", run)
    run.send_signal(signal.SIGTERM)
    (tmp_path / "release-30").touch()
    out, err = run.communicate(timeout=60)

    assert run.returncode == 0, err
    assert "stopped by SIGTERM" in out and "30 done" in out
    with Session(engine) as session:
        done = list(session.scalars(select(jobapp.Item.id).where(jobapp.Item.processed.is_(True)).order_by(jobapp.Item.id)))
    assert done == list(range(1, 31))
    assert effects(effects_file) == list(range(1, 31))


def test_idle_run_prints_nothing(engine: Engine) -> None:
    result = run_cli("-A", "jobapp:jobs", "run-pending", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_busy_run_prints_one_summary_line(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 3)
    result = run_cli("-A", "jobapp:jobs", "run-pending", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [result.stdout.strip()]
    assert result.stdout.startswith("batchjobs: 3 done, 0 failed in ")


def test_claimed_rows_do_not_block_foreign_key_inserts(pg_engine: Engine, tmp_path: Path) -> None:
    """FOR NO KEY UPDATE: the app can insert rows referencing a claimed row meanwhile."""
    engine = pg_engine
    add_items(engine, 5)
    env = blocking_env(engine, tmp_path, 1)
    run = start_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=env)
    try:
        wait_for(lambda: (tmp_path / "reached-1").exists(), "row 1 to be claimed", run)
        with engine.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '2s'")
            conn.execute(insert(jobapp.ItemComment).values(id=1, item_id=1))
            conn.commit()
    finally:
        (tmp_path / "release-1").touch()
        run.communicate(timeout=60)
    assert run.returncode == 0


def test_ctrl_c_is_graceful_too(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 10)
    env = blocking_env(engine, tmp_path, 4)
    run = start_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=env)
    wait_for(lambda: (tmp_path / "reached-4").exists(), "row 4 to be in progress", run)
    os.kill(run.pid, signal.SIGINT)
    (tmp_path / "release-4").touch()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0 and "Traceback" not in err
    assert "4 done" in out and "stopped by SIGINT" in out
