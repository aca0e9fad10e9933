"""The run loop's semantics, in-process, on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import jobapp
import pytest
from conftest import count_claims, effects
from sqlalchemy import Engine, insert, select, text
from sqlalchemy.orm import Session

from batchjobs import JobContext, run_pending
from batchjobs.errors import BatchJobsError
from batchjobs.store.tables import Failure


def add_items(engine: Engine, count: int, start: int = 1, **values: object) -> None:
    with Session(engine) as session, session.begin():
        session.execute(insert(jobapp.Item), [{"id": i, **values} for i in range(start, start + count)])


def processed(engine: Engine) -> dict[int, bool]:
    with Session(engine) as session:
        return dict(session.execute(select(jobapp.Item.id, jobapp.Item.processed)).all())


def test_pending_rows_are_handled_once_and_marked_done(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    add_items(engine, 120)
    before = datetime.now(timezone.utc)

    summary = run_pending(jobapp.jobs, engine, jobs=["process_item"])

    assert summary.done == 120 and summary.failed == 0
    assert sorted(effects(behaviour.effects)) == list(range(1, 121))
    with Session(engine) as session:
        rows = session.execute(select(jobapp.Item.processed, jobapp.Item.processed_at)).all()
    assert all(done for done, _ in rows)
    assert all(at is not None and at.replace(tzinfo=at.tzinfo or timezone.utc) >= before - timedelta(seconds=1) for _, at in rows)


def test_a_second_run_finds_nothing(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    add_items(engine, 10)
    run_pending(jobapp.jobs, engine)
    again = run_pending(jobapp.jobs, engine)
    assert again.done == 0 and again.failed == 0
    assert len(effects(behaviour.effects)) == 10


def test_rows_inserted_by_plain_sql_are_pending(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    # The flag's server default makes every insert path an enqueue, not just the ORM.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO items (id, category) VALUES (7, 'a'), (8, 'a')"))
    assert run_pending(jobapp.jobs, engine, jobs=["process_item"]).done == 2


def test_datetime_flag_is_set_to_now(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    with Session(engine) as session, session.begin():
        session.execute(insert(jobapp.Order), [{"id": 1}, {"id": 2}])
    summary = run_pending(jobapp.jobs, engine, queues=["mail"])
    assert summary.jobs["send_receipt"].done == 2
    with Session(engine) as session:
        assert None not in session.scalars(select(jobapp.Order.receipt_sent_at)).all()


def test_where_filter_leaves_other_rows_pending(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    from batchjobs import Registry

    registry = Registry()

    @registry.flag_job(jobapp.Item.processed, where=jobapp.Item.category == "b")
    def only_b(item: jobapp.Item) -> None:
        jobapp.effect("only_b", item.id)

    add_items(engine, 5, category="a")
    add_items(engine, 5, start=6, category="b")
    assert run_pending(registry, engine).done == 5
    assert sorted(effects(behaviour.effects)) == [6, 7, 8, 9, 10]
    assert [k for k, done in processed(engine).items() if not done] == [1, 2, 3, 4, 5]


def test_batch_handler_gets_lists(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    with Session(engine) as session, session.begin():
        session.execute(insert(jobapp.Image), [{"id": i} for i in range(1, 46)])
    summary = run_pending(jobapp.jobs, engine, jobs=["make_thumbnails"])
    assert summary.done == 45
    assert sorted(effects(behaviour.effects)) == list(range(1, 46))


def test_failing_row_does_not_block_the_others(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    behaviour.poison = {3, 40}
    behaviour.write_note = True
    add_items(engine, 60)

    summary = run_pending(jobapp.jobs, engine, jobs=["process_item"])

    assert (summary.done, summary.failed) == (58, 2)
    state = processed(engine)
    assert [k for k, done in state.items() if not done] == [3, 40]
    with Session(engine) as session:
        notes = dict(session.execute(select(jobapp.Item.id, jobapp.Item.note)).all())
    # The poison rows' own writes were rolled back with their savepoint; the others' kept.
    assert notes[3] is None and notes[40] is None
    assert all(note and note.startswith("handled") for k, note in notes.items() if k not in (3, 40))
    # Not retried within the same run.
    assert effects(behaviour.effects).count(3) == 1


def test_failed_row_is_logged_with_traceback(engine: Engine, behaviour: jobapp.Behaviour, caplog: pytest.LogCaptureFixture) -> None:
    behaviour.poison = {2}
    add_items(engine, 3)
    run_pending(jobapp.jobs, engine, jobs=["process_item"])
    [record] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert record.name == "batchjobs"
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "process_item" in record.getMessage() and "row 2" in record.getMessage()


def test_commit_interval_releases_unhandled_rows(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    """With commit_interval=0 every row is committed before the next starts; with a long one, not."""
    add_items(engine, 6)
    seen_done_before: dict[int, bool] = {}

    from batchjobs import Registry

    def visible_done(row_id: int) -> bool:
        # A separate connection only sees what was committed.
        with engine.connect() as conn:
            return bool(conn.execute(text("SELECT processed FROM items WHERE id = :id"), {"id": row_id}).scalar())

    for interval, expected in ((0.0, True), (3600.0, False)):
        registry = Registry()

        @registry.flag_job(jobapp.Item.processed, batch_size=10)
        def check(item: jobapp.Item) -> None:
            if item.id > 1 and item.id not in seen_done_before:
                seen_done_before[item.id] = visible_done(item.id - 1)

        seen_done_before.clear()
        with engine.begin() as conn:
            conn.execute(text("UPDATE items SET processed = false"))
        summary = run_pending(registry, engine, commit_interval=interval)
        assert summary.done == 6
        assert set(seen_done_before.values()) == {expected}, interval


def test_a_chunk_that_commits_early_continues_after_its_last_row(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    """The walk continues after the last row a chunk reached, not after the last it claimed:
    rows a chunk released unhandled by committing early come next, in key order."""
    from batchjobs import Registry

    add_items(engine, 30)
    handled: list[int] = []
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed, batch_size=10)
    def note(item: jobapp.Item) -> None:
        handled.append(item.id)

    claims = count_claims(engine, "items")
    # commit_interval=0 commits after every row: each chunk of 10 handles just its first row.
    summary = run_pending(registry, engine, commit_interval=0.0)
    assert summary.done == 30
    assert handled == list(range(1, 31))
    # Rows 2-22 continue the walk. The claim for row 22 comes back short (9 rows left), so from
    # row 23 on each claim starts over, and the last one finds nothing.
    assert claims == {"after": 21, "start": 10}, claims


def test_rows_passed_by_are_handled_once_the_walk_ends(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    """Each claim continues after the previous chunk; a row that becomes pending behind the walk
    is found by the claim from the start that follows the end of the walk, in the same run."""
    from batchjobs import Registry

    add_items(engine, 30)
    handled: list[int] = []
    registry = Registry()

    @registry.flag_job(jobapp.Item.processed, batch_size=10)
    def requeue_behind(item: jobapp.Item, ctx: JobContext) -> None:
        handled.append(item.id)
        if item.id == 15:
            # Row 3 was done a chunk ago; flip it back to pending, as an admin might.
            ctx.session.execute(text("UPDATE items SET processed = false WHERE id = 3"))

    claims = count_claims(engine, "items")
    summary = run_pending(registry, engine)
    assert summary.done == 31
    # Claiming from the start every time would have taken row 3 right after row 20.
    assert handled == [*range(1, 31), 3]
    assert all(processed(engine).values())
    # Chunks 2 and 3 and the empty end of the walk continue; then two claims start over: the
    # one that finds row 3, and the one that finds nothing and ends the run.
    assert claims == {"start": 3, "after": 3}, claims


@pytest.mark.parametrize("row_locks", ["pg_engine", "mysql_engine"])
def test_a_row_locked_during_the_walk_is_handled_once_it_is_free(
    row_locks: str, request: pytest.FixtureRequest, behaviour: jobapp.Behaviour
) -> None:
    """SKIP LOCKED passes a row another transaction holds; once that lets go, the same run takes it.

    On the databases with row locks (SQLite takes the whole database for a chunk)."""
    from batchjobs import Registry

    engine: Engine = request.getfixturevalue(row_locks)
    add_items(engine, 30)
    handled: list[int] = []
    registry = Registry()
    holder = engine.connect()
    holder.execute(text("SELECT id FROM items WHERE id = 5 FOR UPDATE"))

    @registry.flag_job(jobapp.Item.processed, batch_size=10)
    def note(item: jobapp.Item) -> None:
        handled.append(item.id)
        if item.id == 20:
            holder.rollback()  # the other transaction ends; row 5 is free

    try:
        summary = run_pending(registry, engine)
    finally:
        holder.close()
    assert summary.done == 30
    assert handled == [*(i for i in range(1, 31) if i != 5), 5]


def test_a_run_takes_one_connection_for_all_its_chunks(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    """Chunks are transactions on one connection; taking one from the pool per chunk costs
    more client time than a small chunk's claim."""
    from sqlalchemy import event

    from batchjobs.store import store_for

    add_items(engine, 100)
    checkouts: list[object] = []

    def checkout(dbapi_connection: object, *_args: object) -> None:
        checkouts.append(dbapi_connection)

    pool = store_for(engine).engine.pool
    event.listen(pool, "checkout", checkout)
    try:
        summary = run_pending(jobapp.jobs, engine, jobs=["process_item"], batch_size=10, record=False)
    finally:
        event.remove(pool, "checkout", checkout)
    assert summary.done == 100
    # One for the schema check before the run, one for the run's eleven chunks.
    assert len(checkouts) == 2, checkouts


def test_max_runtime_stops_the_run(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    add_items(engine, 30)
    behaviour.sleep = 0.1
    summary = run_pending(jobapp.jobs, engine, jobs=["process_item"], max_runtime=1.0, batch_size=5)
    assert 0 < summary.done < 30
    assert summary.stopped_by == "max-runtime"
    assert sum(not done for done in processed(engine).values()) == 30 - summary.done


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.5])
def test_a_max_runtime_too_short_to_handle_a_row_is_refused(engine: Engine, seconds: float) -> None:
    add_items(engine, 3)
    with pytest.raises(BatchJobsError, match="too short to handle any row; use at least 1s"):
        run_pending(jobapp.jobs, engine, jobs=["process_item"], max_runtime=seconds)
    assert sum(not done for done in processed(engine).values()) == 3


def test_failure_record_written_in_chunk(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    behaviour.poison = {5}
    add_items(engine, 5)
    run_pending(jobapp.jobs, engine, jobs=["process_item"])
    with Session(engine) as session:
        [failure] = session.scalars(select(Failure)).all()
    assert (failure.job, failure.row_key, failure.attempts, failure.dead) == ("process_item", "5", 1, False)
    assert failure.error_type == "ValueError" and "poison row 5" in failure.traceback


def test_timeout_interrupts_a_slow_handler(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    from batchjobs import Registry

    registry = Registry()

    @registry.flag_job(jobapp.Item.processed, timeout=0.2)
    def slow(item: jobapp.Item) -> None:
        import time

        if item.id == 2:
            time.sleep(30)

    add_items(engine, 3)
    summary = run_pending(registry, engine)
    assert (summary.done, summary.failed) == (2, 1)
    with Session(engine) as session:
        failure = session.get(Failure, ("slow", "2"))
    assert failure is not None and failure.error_type == "batchjobs.JobTimeout"



def test_objects_a_handler_adds_or_deletes_belong_to_its_row(engine: Engine) -> None:
    """Without a flush or a statement of its own, what a handler adds to, merges into or deletes
    from ``ctx.session`` is flushed within its row's savepoint: kept when the row is done, even
    when the next row fails at once (before it, handlers that leave the session alone share one
    savepoint, which a failure rolls back)."""
    from batchjobs import Registry
    from batchjobs.savepoints import ChunkSession

    jobs = Registry()

    # Rows 1 to 8 in pairs: the first of each pair changes the session without a statement, the
    # second fails at once. SQLAlchemy 2.1's delete_all() and merge_all() go around delete() and
    # merge(); on 2.0 those rows use delete() and merge().
    delete_all = getattr(ChunkSession, "delete_all", None) and ChunkSession.delete_all
    merge_all = getattr(ChunkSession, "merge_all", None) and ChunkSession.merge_all

    @jobs.flag_job(jobapp.Item.processed)
    def annotate(item: jobapp.Item, ctx: JobContext) -> None:
        session = ctx.session
        # No primary key: merged, it is simply added, without a SELECT.
        comment = jobapp.ItemComment(item_id=item.id)
        if item.id == 1:
            session.add(comment)
        elif item.id == 3:
            session.merge(comment)
        elif item.id == 5:
            # The claimed row itself: it is in the session already.
            delete_all(session, [item]) if delete_all else session.delete(item)
        elif item.id == 7:
            merge_all(session, [comment]) if merge_all else session.merge(comment)
        if item.id % 2 == 0:
            raise ValueError(f"row {item.id} fails")

    add_items(engine, 8)
    summary = run_pending(jobs, engine)
    assert (summary.done, summary.failed) == (4, 4)
    with Session(engine) as session:
        commented = session.scalars(select(jobapp.ItemComment.item_id).order_by(jobapp.ItemComment.item_id)).all()
    assert commented == [1, 3, 7]
    assert processed(engine) == {1: True, 2: False, 3: True, 4: False, 6: False, 7: True, 8: False}
