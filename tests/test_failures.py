"""Retries with backoff, dead rows, and the operator commands around them."""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jobapp
import pytest
from conftest import blocking_env, cli_env, effects, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session
from test_run_pending import add_items, processed

from batchjobs import Registry, run_pending
from batchjobs.failures import retry
from batchjobs.store.tables import Failure

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A wall clock the test moves by hand, so backoff is tested without waiting."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _failure(engine: Engine, job: str, key: str) -> Failure | None:
    with Session(engine) as session:
        return session.get(Failure, (job, key))


def test_poison_row_backs_off_dies_and_is_revived(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    registry = Registry()
    broken = {"yes": True}

    @registry.flag_job(jobapp.Item.processed, max_attempts=3, backoff=lambda attempt: 60.0 * attempt)
    def handle(item: jobapp.Item) -> None:
        jobapp.effect("handle", item.id)
        if item.id == 500 and broken["yes"]:
            raise RuntimeError("template is broken")

    add_items(engine, 1000)
    clock = Clock(T0)

    def run(at: datetime) -> tuple[int, int]:
        clock.now = at
        summary = run_pending(registry, engine, clock=clock)
        return summary.done, summary.failed

    assert run(T0) == (999, 1)
    first = _failure(engine, "handle", "500")
    assert first is not None and (first.attempts, first.dead) == (1, False)
    assert first.next_attempt_at == T0 + timedelta(seconds=60)

    assert run(T0 + timedelta(seconds=59)) == (0, 0)  # still backing off: not claimed
    assert run(T0 + timedelta(seconds=60)) == (0, 1)  # due: attempt 2, next wait is 120s
    second = _failure(engine, "handle", "500")
    assert second is not None and second.attempts == 2
    assert second.next_attempt_at == T0 + timedelta(seconds=180)
    assert run(T0 + timedelta(seconds=179)) == (0, 0)
    assert run(T0 + timedelta(seconds=180)) == (0, 1)  # attempt 3 of 3: dead

    dead = _failure(engine, "handle", "500")
    assert dead is not None and (dead.attempts, dead.dead, dead.next_attempt_at) == (3, True, None)
    assert dead.first_failed_at == T0 and dead.last_failed_at == T0 + timedelta(seconds=180)
    assert run(T0 + timedelta(days=30)) == (0, 0)  # dead rows are never claimed
    assert Counter(effects(behaviour.effects))[500] == 3

    assert retry(registry, engine, "handle", all_dead=True) == 1
    broken["yes"] = False
    assert run(T0 + timedelta(days=30, seconds=1)) == (1, 0)
    assert _failure(engine, "handle", "500") is None  # success forgets the failure
    assert all(processed(engine).values())


def test_batch_failure_counts_one_attempt_per_row(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    behaviour.poison = {7}
    with Session(engine) as session, session.begin():
        session.execute(insert(jobapp.Image), [{"id": i} for i in range(1, 31)])
    summary = run_pending(jobapp.jobs, engine, jobs=["make_thumbnails"])
    # Chunks of 20: the one holding image 7 failed as a whole, the next one succeeded.
    assert (summary.done, summary.failed) == (10, 20)
    with Session(engine) as session:
        rows = session.scalars(select(Failure).order_by(Failure.row_key)).all()
    assert sorted(int(f.row_key) for f in rows) == list(range(1, 21))
    assert {f.attempts for f in rows} == {1}


def test_on_failure_hook_and_hook_errors(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    calls: list[tuple[str, str, str]] = []

    def hook(job: object, key: str, error: BaseException) -> None:
        calls.append((job.name, key, str(error)))  # type: ignore[attr-defined]
        raise RuntimeError("the hook itself is broken")

    registry = Registry(on_failure=hook)

    @registry.flag_job(jobapp.Item.processed)
    def handle(item: jobapp.Item) -> None:
        if item.id == 2:
            raise KeyError("missing")

    add_items(engine, 3)
    summary = run_pending(registry, engine)
    assert (summary.done, summary.failed) == (2, 1)
    assert calls == [("handle", "2", "'missing'")]
    assert _failure(engine, "handle", "2") is not None  # a broken hook loses nothing


def test_kill_9_with_a_failed_row_in_the_chunk_records_no_failure(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 20)
    env = blocking_env(engine, tmp_path, 5, JOBAPP_POISON="2")
    run = start_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", "--commit-interval", "1h", env=env)
    wait_for(lambda: (tmp_path / "reached-5").exists(), "row 5 to be in progress", run)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)

    with Session(engine) as session:
        assert session.scalars(select(Failure)).all() == []
    assert not any(processed(engine).values())


def test_concurrent_runners_count_each_real_attempt_once(engine: Engine, tmp_path: Path) -> None:
    add_items(engine, 2000)
    poison = set(range(50, 2001, 50))
    effects_file = tmp_path / "effects.txt"
    env = cli_env(
        JOBAPP_EFFECTS=str(effects_file),
        JOBAPP_POISON=",".join(map(str, poison)),
        BATCHJOBS_DATABASE_URL=url_of(engine),
    )
    for _round in range(2):
        runs = [start_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", env=env) for _ in range(4)]
        for run in runs:
            _, err = run.communicate(timeout=300)
            assert run.returncode == 0, err
        attempts_made = Counter(effects(effects_file))
        with Session(engine) as session:
            recorded = dict(session.execute(select(Failure.row_key, Failure.attempts)).all())
        assert {int(k) for k in recorded} == poison
        assert {int(k): n for k, n in recorded.items()} == {k: attempts_made[k] for k in poison}
        assert all(n == 1 for k, n in attempts_made.items() if k not in poison)
        # Let the backoff pass, then go again: every runner sees the rows due at once.
        with Session(engine) as session, session.begin():
            session.execute(update(Failure).values(next_attempt_at=datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert {n for k, n in attempts_made.items() if k in poison} == {2}



def test_a_failure_committed_after_the_claims_snapshot_still_holds_its_row_back(pg_engine: Engine) -> None:
    """Another run records a failure (and its backoff) for a row and releases it after this run's
    claim took its snapshot but before the claim reached the row: the claim locks the row, and
    its failure re-check must see the record all the same, or the row runs again at once.

    The claim is held at its first row by an advisory lock the test holds, so the record is
    committed exactly in that gap.
    """
    from sqlalchemy import Text, case, cast, func, text

    lock = 73_001
    handled: list[int] = []
    jobs = Registry()
    # Evaluated for the walk's first row only; the transaction-level shared lock waits for the test's.
    held_at_row_1 = case((jobapp.Item.id == 1, cast(func.pg_advisory_xact_lock_shared(lock), Text) == ""), else_=True)

    @jobs.flag_job(jobapp.Item.processed, where=held_at_row_1, batch_size=10)
    def gated(item: jobapp.Item) -> None:
        handled.append(item.id)

    add_items(pg_engine, 5)
    result: list[object] = []
    with pg_engine.connect() as gate:
        gate.execute(text("SELECT pg_advisory_lock(:lock)"), {"lock": lock})
        gate.commit()
        run = threading.Thread(target=lambda: result.append(run_pending(jobs, pg_engine)))
        run.start()
        try:
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' AND query LIKE '%FOR NO KEY UPDATE%'"
            )

            def claim_waits() -> bool:
                # A transaction of its own each time: pg_stat_activity is read once per transaction.
                with pg_engine.connect() as conn:
                    return bool(conn.execute(waiting).scalar_one() == 1)

            wait_for(claim_waits, timeout=30, what="the claim to wait at row 1")
            now = datetime.now(timezone.utc)
            with Session(pg_engine) as session, session.begin():
                session.add(Failure(job="gated", row_key="3", attempts=1, first_failed_at=now, last_failed_at=now,
                                    next_attempt_at=now + timedelta(hours=1), dead=False, error_type="ValueError",
                                    error_message="failed in another run", traceback=""))
        finally:
            gate.execute(text("SELECT pg_advisory_unlock(:lock)"), {"lock": lock})
            gate.commit()
            run.join(timeout=60)
    assert not run.is_alive() and result, "the run did not end"
    assert sorted(handled) == [1, 2, 4, 5]
    assert processed(pg_engine) == {1: True, 2: True, 3: False, 4: True, 5: True}
    record = _failure(pg_engine, "gated", "3")
    assert record is not None and record.attempts == 1

# --- the operator commands -------------------------------------------------------------------


@pytest.fixture
def failing(engine: Engine, behaviour: jobapp.Behaviour) -> Engine:
    """Items 1-10 with item 3 failing (1 attempt) and item 7 dead."""
    behaviour.poison = {3, 7}
    add_items(engine, 10)
    run_pending(jobapp.jobs, engine, jobs=["process_item"])
    with Session(engine) as session, session.begin():
        session.execute(
            update(Failure).where(Failure.row_key == "7").values(dead=True, next_attempt_at=None, attempts=10)
        )
    return engine


def test_failures_lists_failing_and_dead_rows(failing: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(failing))
    table = run_cli("-A", "jobapp:jobs", "failures", env=env)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["JOB", "ROW", "ATTEMPTS", "NEXT"]
    assert [r.split()[:4] for r in rows] == [
        ["process_item", "3", "1", "in"],
        ["process_item", "7", "10", "dead"],
    ]
    assert all("ValueError: poison row" in r for r in rows)

    data = json.loads(run_cli("-A", "jobapp:jobs", "failures", "process_item", "--dead", "--json", env=env).stdout)
    assert [(d["row_key"], d["attempts"], d["dead"]) for d in data] == [("7", 10, True)]
    assert data[0]["error_type"] == "ValueError" and data[0]["next_attempt_at"] is None

    none = run_cli("-A", "jobapp:jobs", "failures", "send_receipt", env=env)
    assert none.stdout.strip() == "no failing rows"


def test_show_failure_prints_the_traceback(failing: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(failing))
    result = run_cli("-A", "jobapp:jobs", "show-failure", "process_item", "3", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("job process_item, row 3: 1 attempt(s), next attempt at ")
    assert "Traceback (most recent call last)" in result.stdout
    assert result.stdout.rstrip().endswith("ValueError: poison row 3")


def test_retry_clears_records(failing: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(failing))
    dead = run_cli("-A", "jobapp:jobs", "retry", "process_item", "--all-dead", env=env)
    assert dead.stdout.strip() == "1 row(s) of process_item will be tried again on the next run"
    assert _failure(failing, "process_item", "7") is None
    assert _failure(failing, "process_item", "3") is not None
    one = run_cli("-A", "jobapp:jobs", "retry", "process_item", "--row", "3", env=env)
    assert one.returncode == 0 and one.stdout.startswith("1 row(s)")
    assert _failure(failing, "process_item", "3") is None


def test_retry_all(failing: Engine) -> None:
    result = run_cli("-A", "jobapp:jobs", "retry", "process_item", "--all", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(failing)))
    assert result.stdout.startswith("2 row(s)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["retry", "nope", "--all"], "unknown job 'nope'"),
        (["retry", "process_item", "--row", "3", "--row", "4"], "no failure recorded for row(s) 4; nothing retried"),
        (["retry", "process_item"], "choose exactly one of"),
        (["retry", "process_item", "--all", "--all-dead"], "choose exactly one of"),
        (["show-failure", "process_item", "4"], "no failure recorded for row '4'"),
        (["failures", "nope"], "unknown job 'nope'"),
    ],
)
def test_operator_command_errors(failing: Engine, args: list[str], message: str) -> None:
    result = run_cli("-A", "jobapp:jobs", *args, env=cli_env(BATCHJOBS_DATABASE_URL=url_of(failing)))
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _failure(failing, "process_item", "3") is not None  # nothing was half-done


def test_failures_of_equal_times_sort_by_key_value_and_dead_says_dead(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    # One chunk fails rows 61 and 101 at the same instant: 61 comes first, not "101" < "61".
    behaviour.poison = {61, 101, 7}
    add_items(engine, 120)
    run_pending(jobapp.jobs, engine, jobs=["process_item"], batch_size=200, clock=Clock(T0))
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    listed = run_cli("-A", "jobapp:jobs", "failures", "process_item", "--json", env=env)
    assert [row["row_key"] for row in json.loads(listed.stdout)] == ["7", "61", "101"], listed.stderr
    none_dead = run_cli("-A", "jobapp:jobs", "failures", "--dead", env=env)
    assert (none_dead.returncode, none_dead.stdout) == (0, "no dead rows\n"), none_dead.stderr
