"""mark-done and requeue: every selection kind, dry runs, confirmation, and the app writing meanwhile."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

import jobapp
import pytest
from conftest import cli_env, run_cli, start_cli, url_of
from sqlalchemy import Engine, insert, select, text, update
from sqlalchemy.orm import Session
from test_run_pending import add_items, processed

from batchjobs import BatchJobsError, Selection, change_rows, preview_change, run_pending
from batchjobs.store.tables import Failure
from batchjobs.worker import run_worker

JOB = "process_item"


def _done(engine: Engine) -> list[int]:
    return sorted(k for k, done in processed(engine).items() if done)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (Selection(keys=("3", "5", "999")), [3, 5]),
        (Selection(id_range=("4", "7")), [4, 5, 6, 7]),
        (Selection(where="category = :c AND id > :low", params={"c": "b", "low": "15"}), [16, 18, 20]),
        (Selection(everything=True), list(range(1, 21))),
    ],
)
def test_mark_done_each_selection(engine: Engine, selection: Selection, expected: list[int]) -> None:
    add_items(engine, 20)
    with engine.begin() as conn:
        conn.execute(text("UPDATE items SET category = 'b' WHERE id % 2 = 0"))

    assert preview_change(jobapp.jobs, engine, JOB, selection, "mark-done").rows == len(expected)
    result = change_rows(jobapp.jobs, engine, JOB, selection, "mark-done", chunk_size=3)

    assert result.rows == len(expected)
    assert result.chunks == -(-len(expected) // 3)
    assert _done(engine) == expected
    with Session(engine) as session:
        stamped = session.scalars(select(jobapp.Item.id).where(jobapp.Item.processed_at.is_not(None)))
        assert sorted(stamped) == expected  # done_at is set as if the handler had run
    # Again: nothing left to change, so it counts nothing.
    assert change_rows(jobapp.jobs, engine, JOB, selection, "mark-done").rows == 0


def test_requeue_sets_pending_and_forgets_failures(engine: Engine) -> None:
    add_items(engine, 10)
    change_rows(jobapp.jobs, engine, JOB, Selection(everything=True), "mark-done")
    now = datetime.now(timezone.utc)
    with Session(engine) as session, session.begin():
        session.add(Failure(job="process_item", row_key="4", attempts=10, first_failed_at=now, last_failed_at=now,
                            next_attempt_at=None, dead=True, error_type="E", error_message="", traceback=""))
    result = change_rows(jobapp.jobs, engine, JOB, Selection(id_range=("2", "4")), "requeue")
    assert (result.rows, result.failures_cleared) == (3, 1)
    assert _done(engine) == [1, 5, 6, 7, 8, 9, 10]
    with Session(engine) as session:
        assert session.scalars(select(Failure)).all() == []
        assert session.scalar(select(jobapp.Item.processed_at).where(jobapp.Item.id == 3)) is None


def test_selection_must_be_exactly_one() -> None:
    with pytest.raises(BatchJobsError, match="exactly one selection"):
        Selection().clause(jobapp.jobs.job(JOB))
    with pytest.raises(BatchJobsError, match="exactly one selection"):
        Selection(keys=("1",), everything=True).clause(jobapp.jobs.job(JOB))
    with pytest.raises(BatchJobsError, match="not a valid key"):
        Selection(keys=("abc",)).clause(jobapp.jobs.job(JOB))


def test_cli_dry_run_changes_nothing(engine: Engine) -> None:
    add_items(engine, 30)
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    result = run_cli("-A", "jobapp:jobs", "mark-done", "process_item", "--id-range", "5:25", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "mark-done process_item (dry run): 21 rows would be marked done; first keys: 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, ...",
        "nothing was changed",
    ]
    as_json = json.loads(run_cli("-A", "jobapp:jobs", "requeue", "process_item", "--all", "--dry-run", "--json", env=env).stdout)
    assert as_json == {"action": "requeue", "job": "process_item", "dry_run": True, "rows": 0, "sample": []}
    assert _done(engine) == []


def test_cli_where_with_param(engine: Engine) -> None:
    add_items(engine, 12)
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    result = run_cli("-A", "jobapp:jobs", "mark-done", "process_item", "--where", "id <= :last", "--param", "last=4", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 4
    assert _done(engine) == [1, 2, 3, 4]
    again = run_cli("-A", "jobapp:jobs", "requeue", "process_item", "--row", "2", env=env)
    assert again.stdout.strip() == "requeue process_item: 1 rows requeued in 1 chunk(s)"
    assert _done(engine) == [1, 3, 4]


def test_cli_big_change_needs_yes_without_a_terminal(engine: Engine) -> None:
    add_items(engine, 10_001)
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    refused = run_cli("-A", "jobapp:jobs", "mark-done", "process_item", "--all", env=env)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "Error: this would change 10,001 rows; pass --yes to confirm (no terminal to ask on)"
    assert _done(engine) == []
    done = run_cli("-A", "jobapp:jobs", "mark-done", "process_item", "--all", "--yes", env=env)
    assert done.returncode == 0 and "10,001 rows marked done in 3 chunk(s)" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mark-done", "process_item"], "choose exactly one selection"),
        (["mark-done", "process_item", "--id-range", "5"], "use FIRST:LAST"),
        (["requeue", "process_item", "--id-range", "30:1"], "the key range 30:1 is empty: its first key is above its last (write 1:30)"),
        (["mark-done", "process_item", "--where", "id = :x", "--param", "x"], "use name=value"),
        (["mark-done", "process_item", "--all", "--param", "x=1"], "--param only goes with --where"),
        (["mark-done", "nope", "--all"], "unknown job 'nope'"),
        (["requeue", "process_item", "--where", "no_such_column = 1"], "database error"),
    ],
)
def test_cli_errors(engine: Engine, args: list[str], message: str) -> None:
    result = run_cli("-A", "jobapp:jobs", *args, env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_app_keeps_writing_during_mark_done(pg_engine: Engine) -> None:
    """Each chunk is its own short transaction: app writes never wait long for row locks."""
    engine = pg_engine
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO items (id, category, processed) SELECT g, 'a', false FROM generate_series(1, 200000) g"))
    mark = start_cli("-A", "jobapp:jobs", "mark-done", "process_item", "--all", "--yes", "--chunk-size", "2000",
                     env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    writes = 0
    progress_seen: set[int] = set()
    # The app updates rows all over the table, with a lock timeout a whole-table lock would trip.
    with engine.connect() as conn:
        conn.exec_driver_sql("SET lock_timeout = '3s'")
        while mark.poll() is None:
            row = (writes * 7919) % 200000 + 1
            conn.execute(update(jobapp.Item).where(jobapp.Item.id == row).values(note="app write"))
            conn.execute(insert(jobapp.ItemComment).values(id=writes + 1, item_id=row))
            progress_seen.add(conn.execute(text("SELECT count(*) FROM items WHERE processed")).scalar())
            conn.commit()
            writes += 1
    out, err = mark.communicate()
    assert mark.returncode == 0, err
    assert "200,000 rows marked done in 100 chunk(s)" in out
    assert writes > 0
    assert any(0 < n < 200000 for n in progress_seen), "the app saw chunks commit one by one"


def test_mark_done_waits_for_a_claimed_row_then_finishes(pg_engine: Engine) -> None:
    """A row held by a run is waited for (briefly), not skipped and not failed."""
    engine = pg_engine
    add_items(engine, 5)
    holder = engine.connect()
    holder.execute(text("SELECT id FROM items WHERE id = 3 FOR NO KEY UPDATE"))
    released = threading.Timer(0.5, holder.commit)
    released.start()
    try:
        result = change_rows(jobapp.jobs, engine, JOB, Selection(everything=True), "mark-done", lock_timeout=5)
    finally:
        released.join()
        holder.close()
    assert result.rows == 5


def test_where_with_or_is_one_condition(engine: Engine) -> None:
    """The admin's SQL is parenthesised: "a OR b" must not swallow batchjobs' own conditions."""
    add_items(engine, 5)
    change_rows(jobapp.jobs, engine, JOB, Selection(keys=("1",)), "mark-done")
    assert preview_change(jobapp.jobs, engine, JOB, Selection(where="id = 1 OR id = 3"), "mark-done").sample == ["3"]
    assert change_rows(jobapp.jobs, engine, JOB, Selection(where="id = 1 OR id = 3"), "mark-done", chunk_size=1).rows == 1
    assert _done(engine) == [1, 3]
    assert change_rows(jobapp.jobs, engine, JOB, Selection(where="id = 4 OR id = 1"), "requeue").rows == 1
    assert _done(engine) == [3]


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (Selection(where="id > :a"), "the where clause uses :a; give each a value"),
        (Selection(where="id > :a", params={"a": "1", "b": "2"}), "a value is given for b, but the where clause has no :b"),
        (Selection(where="  "), "the where clause is empty"),
    ],
)
def test_where_checks(engine: Engine, selection: Selection, message: str) -> None:
    with pytest.raises(BatchJobsError, match=message):
        preview_change(jobapp.jobs, engine, JOB, selection, "mark-done")


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf")])
def test_lock_timeout_must_be_positive(engine: Engine, seconds: float) -> None:
    with pytest.raises(BatchJobsError, match="more than 0"):
        change_rows(jobapp.jobs, engine, JOB, Selection(everything=True), "mark-done", lock_timeout=seconds)
    with pytest.raises(BatchJobsError, match="more than 0"):
        run_pending(jobapp.jobs, engine, lock_timeout=seconds)
    with pytest.raises(BatchJobsError, match="more than 0"):
        run_worker(jobapp.jobs, engine, lock_timeout=seconds, max_runtime=1)


def test_a_run_time_limit_must_be_a_number(engine: Engine) -> None:
    with pytest.raises(BatchJobsError, match="must be a number of seconds"):
        run_pending(jobapp.jobs, engine, max_runtime=float("nan"))
