"""A failure record belongs to the row it was recorded for: deleted rows stop counting, and a new
row that reuses a key starts with a clean slate. On every database."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jobapp
from conftest import cli_env, run_cli, url_of
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.orm import Session
from test_run_pending import add_items

from batchjobs import Registry, run_pending
from batchjobs.check import CRITICAL, OK, Threshold, run_check
from batchjobs.failures import list_failures, retry
from batchjobs.metrics import collect, render
from batchjobs.monitoring import status
from batchjobs.store.tables import Failure
from batchjobs.testing import eager

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def failing_registry(broken: set[int], *, max_attempts: int = 1, where: bool = False) -> Registry:
    """process_item's twin: rows in ``broken`` fail; with max_attempts=1 a failure is death."""
    registry = Registry()

    @registry.flag_job(
        jobapp.Item.processed,
        name="process_item",
        max_attempts=max_attempts,
        where=jobapp.Item.category != "archived" if where else None,
    )
    def handle(item: jobapp.Item) -> None:
        if item.id in broken:
            raise ValueError(f"row {item.id} is broken")

    return registry


def records(engine: Engine) -> dict[str, bool]:
    """Row key -> dead, of every failure record."""
    with Session(engine) as session:
        return {key: bool(dead) for key, dead in session.execute(select(Failure.row_key, Failure.dead))}


def counts(registry: Registry, engine: Engine) -> tuple[int, int, int]:
    job = status(registry, engine).jobs[0]
    return job.pending, job.backoff, job.dead


def delete_item(engine: Engine, key: int) -> None:
    with engine.begin() as conn:
        conn.execute(delete(jobapp.Item).where(jobapp.Item.id == key))


def test_a_deleted_dead_row_stops_counting_everywhere(engine: Engine) -> None:
    registry = failing_registry({3})
    add_items(engine, 5)
    run_pending(registry, engine)
    assert counts(registry, engine) == (1, 0, 1)
    assert run_check(registry, engine, max_dead=Threshold.parse("0", "--max-dead")).code == CRITICAL

    delete_item(engine, 3)
    # Operators' views count only rows that exist, before any run has tidied up.
    assert counts(registry, engine) == (0, 0, 0)
    assert run_check(registry, engine, max_dead=Threshold.parse("0", "--max-dead")).code == OK
    assert 'batchjobs_dead_rows{job="process_item",queue="default"} 0.0' in render(collect(registry, engine))
    assert list_failures(registry, engine, "process_item", dead_only=True) == []
    # retry reports the rows it gave back, and a deleted row is none of them.
    assert retry(registry, engine, "process_item", all_dead=True) == 0
    assert records(engine) == {}


def test_a_deleted_row_in_backoff_is_neither_pending_nor_backing_off(engine: Engine) -> None:
    registry = failing_registry({2}, max_attempts=5)
    add_items(engine, 3)
    run_pending(registry, engine, clock=lambda: T0)
    assert counts(registry, engine) == (1, 1, 0)
    delete_item(engine, 2)
    assert counts(registry, engine) == (0, 0, 0)
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    shown = run_cli("-A", "jobapp:jobs", "status", "--json", env=env)
    item = next(job for job in json.loads(shown.stdout)["jobs"] if job["name"] == "process_item")
    assert (item["pending"], item["backoff"], item["dead"]) == (0, 0, 0), shown.stderr
    # The next run forgets the record.
    run_pending(registry, engine, clock=lambda: T0)
    assert records(engine) == {}


def test_rows_left_out_by_where_are_not_counted_as_failing(engine: Engine) -> None:
    registry = failing_registry({1, 2}, where=True)
    add_items(engine, 2)
    run_pending(registry, engine)
    assert counts(registry, engine) == (2, 0, 2)
    with engine.begin() as conn:
        conn.execute(update(jobapp.Item).where(jobapp.Item.id == 1).values(category="archived"))
    assert counts(registry, engine) == (1, 0, 1)
    assert [f.row_key for f in list_failures(registry, engine, "process_item")] == ["2"]


def test_a_new_row_reusing_a_dead_rows_key_starts_clean(engine: Engine) -> None:
    registry = failing_registry({7})
    add_items(engine, 10)
    run_pending(registry, engine)
    assert records(engine) == {"7": True}
    # The table is emptied and filled again (a test recreating its tables, SQLite reusing a
    # rowid): row 7 is a new row, with other contents, and nothing ran in between.
    with engine.begin() as conn:
        conn.execute(delete(jobapp.Item))
    add_items(engine, 10, note="second life")
    registry = failing_registry(set())
    summary = run_pending(registry, engine)
    assert summary.done == 10
    assert records(engine) == {}


def test_eager_runs_a_new_row_that_reuses_a_dead_rows_key(engine: Engine) -> None:
    registry = failing_registry({1})
    add_items(engine, 1)
    run_pending(registry, engine)
    assert records(engine) == {"1": True}
    delete_item(engine, 1)
    handled: list[int] = []
    fixed = Registry()

    @fixed.flag_job(jobapp.Item.processed, name="process_item")
    def handle(item: jobapp.Item) -> None:
        handled.append(item.id)

    with Session(engine) as session, eager(fixed, session):
        session.add(jobapp.Item(id=1, note="a new row"))
        session.commit()
    assert handled == [1]
    assert records(engine) == {}


def test_a_failing_row_the_app_changes_is_tried_afresh(engine: Engine) -> None:
    registry = failing_registry({4})
    add_items(engine, 5)
    run_pending(registry, engine)
    assert records(engine) == {"4": True}
    run_pending(registry, engine)
    assert records(engine) == {"4": True}  # unchanged, it stays dead: not retried
    with engine.begin() as conn:
        conn.execute(update(jobapp.Item).where(jobapp.Item.id == 4).values(note="address fixed"))
    summary = run_pending(failing_registry(set()), engine)
    assert summary.done == 1 and records(engine) == {}


def test_a_row_done_by_others_loses_its_record(engine: Engine, tmp_path: Path) -> None:
    registry = failing_registry({5}, max_attempts=5)
    add_items(engine, 5)
    run_pending(registry, engine, clock=lambda: T0)
    with engine.begin() as conn:
        conn.execute(update(jobapp.Item).where(jobapp.Item.id == 5).values(processed=True))
        conn.execute(insert(jobapp.Item), [{"id": 6}])
    assert counts(registry, engine) == (1, 0, 0)
    run_pending(registry, engine, clock=lambda: T0)
    # Requeued later, row 5 is due at once, not after the old backoff.
    with engine.begin() as conn:
        conn.execute(update(jobapp.Item).where(jobapp.Item.id == 5).values(processed=False))
    assert run_pending(failing_registry(set()), engine, clock=lambda: T0).done == 1


def test_keys_up_to_the_largest_of_their_type_keep_their_records(engine: Engine) -> None:
    """Integer keys of ten digits, up to 2,147,483,647, find their rows: a dead row stays dead
    and counted, run after run, and its record is kept."""
    largest = 2**31 - 1
    registry = failing_registry({2_000_000_000, largest})
    add_items(engine, 1, start=2_000_000_000)
    add_items(engine, 1, start=largest)
    for _ in range(2):
        summary = run_pending(registry, engine)
    assert (summary.done, summary.failed) == (0, 0)  # the second run found both dead
    assert counts(registry, engine) == (2, 0, 2)
    assert records(engine) == {"2000000000": True, str(largest): True}
