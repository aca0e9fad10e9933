"""Resumable backfills: chunks, crash and resume, dry run, memory that stays flat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import jobapp
from conftest import BATCHJOBS, blocking_env, cli_env, effects, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session
from test_run_pending import add_items

from batchjobs.store.tables import BackfillState


def _unfilled(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(jobapp.Item).where(jobapp.Item.note.is_(None))) or 0)


def _state(engine: Engine) -> BackfillState:
    with Session(engine) as session:
        state = session.get(BackfillState, "fill_notes")
        assert state is not None
        session.expunge(state)
        return state


def test_backfill_runs_every_row_once_and_lists_its_state(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 250)
    env = cli_env(JOBAPP_EFFECTS=str(tmp_path / "effects.txt"), BATCHJOBS_DATABASE_URL=url_of(engine))
    before = json.loads(run_cli("-A", "jobapp:jobs", "backfills", "--json", env=env).stdout)
    assert [(b["name"], b["status"], b["rows_done"]) for b in before] == [("fill_notes", "never run", 0)]

    result = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", "--throttle", "10ms", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "backfill fill_notes: finished, 250 rows in 3 chunk(s) this run"
    assert sorted(effects(tmp_path / "effects.txt")) == list(range(1, 251))
    assert _unfilled(engine) == 0
    state = _state(engine)
    assert (state.status, state.rows_done, state.total, state.cursor) == ("finished", 250, 250, "250")
    listing = run_cli("-A", "jobapp:jobs", "backfills", env=env).stdout.splitlines()
    assert listing[0].split()[:4] == ["NAME", "STATUS", "ROWS", "CURSOR"]
    assert listing[1].split()[:4] == ["fill_notes", "finished", "250/250", "250"]


def test_kill_9_mid_backfill_then_resume(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 1000)
    effects_file = tmp_path / "effects.txt"
    env = blocking_env(engine, tmp_path, 450, JOBAPP_EFFECTS=str(effects_file))
    run = start_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=env)
    wait_for(lambda: (tmp_path / "reached-450").exists(), "row 450 to be in progress", run)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    state = _state(engine)
    assert (state.status, state.rows_done, state.cursor) == ("running", 400, "400")
    assert _unfilled(engine) == 600

    again = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=cli_env(
        JOBAPP_EFFECTS=str(effects_file), BATCHJOBS_DATABASE_URL=url_of(engine)))

    assert again.returncode == 0, again.stderr
    assert "600 rows in 6 chunk(s)" in again.stdout
    assert _unfilled(engine) == 0
    seen = Counter(effects(effects_file))
    assert set(seen) == set(range(1, 1001))
    # Only the chunk that was killed (401-500) ran twice, up to the row it was killed on.
    assert {k for k, n in seen.items() if n > 1} == set(range(401, 451))
    assert _state(engine).rows_done == 1000


def test_ctrl_c_interrupts_between_chunks_and_resume_continues(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 500)
    env = blocking_env(engine, tmp_path, 150)
    run = start_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=env)
    wait_for(lambda: (tmp_path / "reached-150").exists(), "row 150 to be in progress", run)
    os.kill(run.pid, signal.SIGINT)
    (tmp_path / "release-150").touch()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert out.strip() == "backfill fill_notes: interrupted after 200 rows this run; run it again to resume"
    assert (_state(engine).status, _unfilled(engine)) == ("interrupted", 300)

    resumed = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert "finished, 300 rows" in resumed.stdout and _unfilled(engine) == 0


def test_failure_is_recorded_and_resume_starts_at_the_failed_chunk(engine: Engine) -> None:
    add_items(engine, 300)
    env = cli_env(JOBAPP_POISON="250", BATCHJOBS_DATABASE_URL=url_of(engine))
    failed = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=env)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        "Error: backfill fill_notes failed after 200 rows this run: ValueError: poison row 250; "
        "fix it and run again to resume at the failed chunk"
    )
    state = _state(engine)
    assert (state.status, state.cursor, state.last_error) == ("failed", "200", "ValueError: poison row 250")
    listing = run_cli("-A", "jobapp:jobs", "backfills", env=env).stdout
    assert "ValueError: poison row 250" in listing

    fixed = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert "finished, 100 rows in 1 chunk(s)" in fixed.stdout
    assert _state(engine).last_error is None


def test_dry_run_reports_changes_and_changes_nothing(engine: Engine) -> None:
    add_items(engine, 150)
    result = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", "--dry-run", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "backfill fill_notes (dry run): the next chunk has 100 of 150 remaining rows",
        "  items: 100 rows updated",
        "nothing was changed (rolled back)",
    ]
    assert _unfilled(engine) == 150
    with Session(engine) as session:
        assert session.get(BackfillState, "fill_notes") is None


def test_restart_starts_over(engine: Engine) -> None:
    add_items(engine, 120)
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=env)
    with Session(engine) as session, session.begin():
        session.execute(update(jobapp.Item).where(jobapp.Item.id.in_([5, 110])).values(note=None))
    # Resuming a finished backfill only looks past its cursor: rows 5 and 110 are behind it.
    resumed = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", env=env)
    assert "finished, 0 rows" in resumed.stdout and _unfilled(engine) == 2
    restarted = run_cli("-A", "jobapp:jobs", "backfill", "fill_notes", "--restart", env=env)
    assert "finished, 2 rows in 1 chunk(s)" in restarted.stdout and _unfilled(engine) == 0
    assert _state(engine).rows_done == 2


def test_unknown_backfill(engine: Engine) -> None:
    result = run_cli("-A", "jobapp:jobs", "backfill", "nope", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert result.returncode == 1 and result.stderr.strip() == "Error: unknown backfill 'nope' (known backfills: fill_notes)"


def _peak_rss_kib(*args: str, env: dict[str, str]) -> int:
    process = subprocess.Popen([BATCHJOBS, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, process.stderr.read() if process.stderr else ""
    return usage.ru_maxrss


def test_memory_stays_flat_as_the_table_grows(pg_engine: Engine) -> None:
    engine = pg_engine
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    peaks = {}
    for rows in (20_000, 200_000):
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM items"))
            conn.execute(text("INSERT INTO items (id, category, processed) SELECT g, 'a', true FROM generate_series(1, :n) g"), {"n": rows})
        peaks[rows] = _peak_rss_kib("-A", "jobapp:jobs", "backfill", "fill_notes", "--restart", env=env)
        assert _unfilled(engine) == 0
    # Ten times the rows, the same memory: within 8 MiB (one chunk is 100 rows).
    assert peaks[200_000] - peaks[20_000] < 8 * 1024, peaks
