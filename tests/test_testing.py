"""Eager mode for app tests: insert, commit, and the job has run."""

from __future__ import annotations

import jobapp
import pytest
from conftest import effects
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session

from batchjobs.testing import drain, eager


def test_run_pending_returns_what_each_job_did(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    behaviour.poison = {2}
    with Session(engine) as session:
        session.add_all([jobapp.Item(id=1), jobapp.Item(id=2), jobapp.Order(id=1)])
        session.commit()
        summary = drain(jobapp.jobs, session)
    assert (summary.jobs["process_item"].done, summary.jobs["process_item"].failed) == (1, 1)
    assert summary.jobs["send_receipt"].done == 1
    assert sorted(effects(behaviour.effects)) == [1, 1, 2]
    # raise_errors: the handler's exception reaches the test, after its failure was recorded.
    with Session(engine) as session:
        session.add(jobapp.Item(id=7))
        session.commit()
    behaviour.poison = {7}
    with pytest.raises(ValueError, match="poison row 7"):
        drain(jobapp.jobs, engine, queues=["items"], raise_errors=True)
    with Session(engine) as session:
        from batchjobs.store.tables import Failure

        assert session.get(Failure, ("process_item", "7")) is not None


def test_eager_runs_jobs_on_commit(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    with Session(engine) as session, eager(jobapp.jobs, session):
        session.add(jobapp.Item(id=1))
        session.commit()
        assert effects(behaviour.effects, "process_item") == [1]  # right after the commit
        session.execute(insert(jobapp.Image), [{"id": 1}, {"id": 2}])
        session.commit()
        assert sorted(effects(behaviour.effects, "make_thumbnails")) == [1, 2]  # the batch job
        # Flipping the flag back to pending runs the job again.
        item = session.get(jobapp.Item, 1)
        assert item is not None and item.processed
        item.processed = False
        session.commit()
        assert effects(behaviour.effects, "process_item") == [1, 1]
    # Outside the block, commits run nothing.
    with Session(engine) as session:
        session.add(jobapp.Item(id=2))
        session.commit()
    assert effects(behaviour.effects, "process_item") == [1, 1]


def test_eager_raises_the_handlers_exception(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    behaviour.poison = {5}
    with Session(engine) as session, eager(jobapp.jobs, session):
        session.add(jobapp.Item(id=5))
        with pytest.raises(ValueError, match="poison row 5"):
            session.commit()
        # A rolled-back change runs nothing.
        session.add(jobapp.Item(id=6))
        session.flush()
        session.rollback()
    assert effects(behaviour.effects, "process_item") == [5]


def test_pytest_fixture(engine: Engine, behaviour: jobapp.Behaviour, batchjobs_eager: object) -> None:
    with Session(engine) as session:
        batchjobs_eager(jobapp.jobs, session)  # type: ignore[operator]
        session.add(jobapp.Order(id=9))
        session.commit()
    assert effects(behaviour.effects, "send_receipt") == [9]
