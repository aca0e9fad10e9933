"""run_rows: the run loop's chunk on given keys only, on every database."""

from __future__ import annotations

import jobapp
import pytest
from conftest import effects
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session
from test_run_pending import add_items, processed

from batchjobs.runner import run_pending, run_rows
from batchjobs.store.tables import Failure


def test_only_the_given_pending_rows_are_handled(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    add_items(engine, 10)
    with engine.begin() as connection:
        connection.execute(update(jobapp.Item).where(jobapp.Item.id == 3).values(processed=True))

    # 3 is done already, 99 does not exist, 5 is given twice and as text (as a failure record shows it).
    summary = run_rows(jobapp.jobs, engine, "process_item", [2, 3, 5, "5", 7, 99])

    assert summary.done == 3 and summary.failed == 0
    assert sorted(effects(behaviour.effects)) == [2, 5, 7]
    assert [key for key, done in sorted(processed(engine).items()) if done] == [2, 3, 5, 7]
    assert run_rows(jobapp.jobs, engine, "process_item", [2, 5, 7]).done == 0
    assert sorted(effects(behaviour.effects)) == [2, 5, 7]


def test_a_failed_row_waits_for_its_backoff(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    add_items(engine, 3)
    behaviour.poison = {2}

    first = run_rows(jobapp.jobs, engine, "process_item", [1, 2, 3])
    again = run_rows(jobapp.jobs, engine, "process_item", [2])

    assert (first.done, first.failed) == (2, 1)
    assert (again.done, again.failed) == (0, 0)  # held back until its next attempt is due
    assert effects(behaviour.effects).count(2) == 1
    with Session(engine) as session:
        assert session.execute(select(Failure.row_key, Failure.attempts)).all() == [("2", 1)]


def test_a_batch_job_gets_its_rows_in_one_call(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    with engine.begin() as connection:
        connection.execute(insert(jobapp.Image), [{"id": i} for i in range(1, 6)])
    assert run_rows(jobapp.jobs, engine, "make_thumbnails", [1, 4, 5]).done == 3
    assert sorted(effects(behaviour.effects)) == [1, 4, 5]
    assert run_pending(jobapp.jobs, engine, jobs=["make_thumbnails"]).done == 2


def test_more_keys_than_a_chunk_are_claimed_a_chunk_at_a_time(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    from conftest import count_claims

    add_items(engine, 120)
    claims = count_claims(engine, "items")
    summary = run_rows(jobapp.jobs, engine, "process_item", list(range(1, 121)), batch_size=50)
    assert summary.done == 120
    assert sorted(effects(behaviour.effects)) == list(range(1, 121))
    assert claims["start"] == 3  # 50 + 50 + 20: one claim each, nothing left to claim again


def test_rows_locked_or_not_yet_committed_are_skipped(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no row locks: a claim waits for the other writer's commit")
    add_items(engine, 4)
    with engine.connect() as other:
        with other.begin():
            # Another run holds row 1; row 5 is inserted and not committed yet.
            other.execute(select(jobapp.Item.id).where(jobapp.Item.id == 1).with_for_update())
            other.execute(insert(jobapp.Item).values(id=5))
            summary = run_rows(jobapp.jobs, engine, "process_item", [1, 2, 5], lock_timeout=5)
            assert summary.done == 1
            assert effects(behaviour.effects) == [2]
        # Committed now: row 5 is pending, and the next message or sweep takes both.
    assert run_rows(jobapp.jobs, engine, "process_item", [1, 5]).done == 2
    assert sorted(effects(behaviour.effects)) == [1, 2, 5]


def test_an_unknown_job_is_one_clear_error(engine: Engine) -> None:
    from batchjobs.errors import BatchJobsError

    with pytest.raises(BatchJobsError, match="unknown job 'nope'"):
        run_rows(jobapp.jobs, engine, "nope", [1])
