"""batchjobs.celery: real `celery worker` processes (prefork, two workers of concurrency 2) on a real
broker (a throwaway Redis, RabbitMQ for one run) and PostgreSQL, plus eager mode in-process.

The side effects of handlers are lines in a file (see jobapp), so each row's handling is counted
outside any transaction. Celery workers need a database that several processes share, so these
tests run on PostgreSQL, and the exactly-once test on MySQL/MariaDB too where one is given. SQLite
serves workers on its own host only, taking turns at its write lock; run_rows's own tests cover it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jobapp
import pytest
from conftest import TESTS, answers, effects, free_port, url_of, wait_for
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session
from test_run_pending import processed

from batchjobs.errors import BatchJobsError
from batchjobs.store.tables import Failure

pytest.importorskip("celery", reason="Celery is not installed: pip install 'batchjobs[celery]'")

from celeryapp import make_app  # noqa: E402 - needs Celery

ITEMS = "process_item"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    if not answers(5672):
        pytest.skip("no RabbitMQ at 127.0.0.1:5672")
    return "amqp://guest:guest@127.0.0.1:5672//"


class Cluster:
    """Celery worker processes on the test app, each in a process group of its own, and an app to send with."""

    def __init__(self, engine: Engine, tmp_path: Path, broker: str, backend: str | None) -> None:
        self.engine = engine
        self.tmp_path = tmp_path
        self.broker = broker
        self.backend = backend
        # Unique queue names: the broker may be shared (RabbitMQ's default vhost, the machine's Redis).
        self.prefix = f"t{uuid.uuid4().hex[:8]}-"
        self.app, self.jobs = make_app(broker, backend, self.prefix)
        self.effects = tmp_path / "effects.txt"
        self.workers: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBAPP_", "BATCHJOBS_", "CELERYAPP_"))}
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            BATCHJOBS_DATABASE_URL=url_of(self.engine),
            BATCHJOBS_STATE_DIR=str(self.tmp_path / "state"),
            JOBAPP_EFFECTS=str(self.effects),
            CELERYAPP_BROKER=self.broker,
            CELERYAPP_BACKEND=self.backend or "",
            CELERYAPP_QUEUE_PREFIX=self.prefix,
        )
        env.update(extra)
        return env

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        """Start one worker (prefork, concurrency 2) on the items queue; returns once it is ready."""
        index = len(self.workers)
        log = self.tmp_path / f"worker-{index}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "celeryapp", "worker", "--pool", "prefork", "--concurrency", "2",
            "--queues", f"{self.prefix}items", "--hostname", f"w{index}-{self.prefix}@%h", "--loglevel", "info",
            "--without-gossip", "--without-mingle", "--without-heartbeat", *args,
        ]  # fmt: skip
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                command, env=self.env(**env), stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp_path, start_new_session=True
            )
        self.workers.append(worker)
        wait_for(lambda: b" ready." in log.read_bytes(), f"worker {index} to be ready", timeout=60)
        return worker

    def log(self, index: int) -> str:
        return (self.tmp_path / f"worker-{index}.log").read_text(errors="replace")

    def kill(self, worker: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group (its pool processes too)."""
        try:
            os.killpg(worker.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for worker in self.workers:
            self.kill(worker, signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill(worker, signal.SIGKILL)
                worker.wait(timeout=15)
            # Pool processes left behind by a killed parent are in its group.
            self.kill(worker, signal.SIGKILL)

    def delete_queues(self) -> None:
        """Leave nothing behind on a shared broker (Celery declares its queues durable)."""
        with self.app.connection_for_write() as connection:
            for queue in jobapp.jobs.queues:
                try:
                    connection.default_channel.queue_delete(self.prefix + queue)
                except Exception:  # noqa: BLE001 - a queue never declared is nothing to delete
                    connection.close()
                    connection.ensure_connection(max_retries=1)

    def sweep(self) -> None:
        self.jobs.sweep.apply_async(kwargs={"queue": "items"})

    def pids(self, worker: subprocess.Popen[bytes]) -> set[int]:
        """The worker's processes: itself and its pool."""
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == worker.pid:
                        found.add(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return found


@contextmanager
def _cluster(engine: Engine, tmp_path: Path, broker: str, backend: str | None) -> Iterator[Cluster]:
    cluster = Cluster(engine, tmp_path, broker, backend)
    try:
        yield cluster
    finally:
        cluster.stop()
        cluster.delete_queues()
        cluster.app.close()


@pytest.fixture
def cluster(pg_engine: Engine, tmp_path: Path, redis_url: str) -> Iterator[Cluster]:
    with _cluster(pg_engine, tmp_path, redis_url, redis_url) as started:
        yield started


@pytest.fixture(params=["postgresql", "mysql"])
def server_engine(request: pytest.FixtureRequest) -> Engine:
    """A database that several worker processes share: PostgreSQL, and MySQL/MariaDB where one is given."""
    return request.getfixturevalue("pg_engine" if request.param == "postgresql" else "mysql_engine")  # type: ignore[no-any-return]


def done_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).where(jobapp.Item.processed.is_(True))) or 0)


def _exactly_once(cluster: Cluster, rows: int = 5000, per_commit: int = 50) -> None:
    cluster.start()
    cluster.start()
    with Session(cluster.engine) as session:
        cluster.jobs.dispatch_on_commit(session)
        for start in range(1, rows + 1, per_commit):
            session.add_all([jobapp.Item(id=i) for i in range(start, min(start + per_commit, rows + 1))])
            session.commit()
            if start % (per_commit * 20) == 1:
                cluster.sweep()  # sweeps race the dispatched messages for the same rows
    cluster.sweep()
    wait_for(lambda: done_count(cluster.engine) == rows, f"all {rows} rows to be done", timeout=120)
    handled = Counter(effects(cluster.effects))
    assert set(handled) == set(range(1, rows + 1))
    assert [row for row, times in handled.items() if times > 1] == []


def test_every_row_once_with_dispatch_and_sweeps_together(server_engine: Engine, tmp_path: Path, redis_url: str) -> None:
    with _cluster(server_engine, tmp_path, redis_url, redis_url) as cluster:
        _exactly_once(cluster)


def test_every_row_once_on_rabbitmq(pg_engine: Engine, tmp_path: Path, rabbitmq_url: str) -> None:
    with _cluster(pg_engine, tmp_path, rabbitmq_url, "rpc://") as cluster:
        _exactly_once(cluster, rows=2000)


@pytest.mark.parametrize("how", ["kill -9", "cold shutdown"])
def test_a_killed_worker_loses_nothing(cluster: Cluster, how: str) -> None:
    rows, blocked = 300, 150
    signals = cluster.tmp_path / "signals"
    signals.mkdir()
    with cluster.engine.begin() as connection:
        connection.execute(insert(jobapp.Item), [{"id": i} for i in range(1, rows + 1)])
    env = {"JOBAPP_BLOCK_ON": str(blocked), "JOBAPP_SIGNAL_DIR": str(signals)}
    first = cluster.start(**env)
    cluster.sweep()
    wait_for(lambda: (signals / f"reached-{blocked}").exists(), f"row {blocked} to be in progress", first)
    doomed = cluster.pids(first)
    if how == "kill -9":
        cluster.kill(first)  # the worker and its pool, mid-task
    else:
        first.send_signal(signal.SIGQUIT)  # Celery's cold shutdown: the pool is terminated mid-task
    first.wait(timeout=30)
    assert not done_count(cluster.engine) == rows

    cluster.start(**env)
    cluster.sweep()
    wait_for(lambda: done_count(cluster.engine) == rows, "the second worker to finish every row", timeout=60)
    handled = Counter(effects(cluster.effects))
    assert set(handled) == set(range(1, rows + 1))
    # Only rows of the killed worker's chunk in flight ran twice: at most one chunk per pool process.
    twice = [row for row, times in handled.items() if times > 1]
    assert blocked in twice and len(twice) <= 2 * jobapp.jobs.job(ITEMS).batch_size
    first_pids = {}
    for line in cluster.effects.read_text().splitlines():
        _, row, pid = line.split()
        first_pids.setdefault(int(row), int(pid))
    assert all(first_pids[row] in doomed for row in twice)
    # The row in flight counted a crash, and ran apart once the crash was counted.
    with Session(cluster.engine) as session:
        assert session.scalars(select(Failure.row_key)).all() == []  # cleared by its success


def test_a_warm_shutdown_lets_the_running_sweep_finish_its_rows(cluster: Cluster) -> None:
    rows, blocked = 120, 30
    signals = cluster.tmp_path / "signals"
    signals.mkdir()
    with cluster.engine.begin() as connection:
        connection.execute(insert(jobapp.Item), [{"id": i} for i in range(1, rows + 1)])
    worker = cluster.start(JOBAPP_BLOCK_ON=str(blocked), JOBAPP_SIGNAL_DIR=str(signals))
    cluster.sweep()
    wait_for(lambda: (signals / f"reached-{blocked}").exists(), f"row {blocked} to be in progress", worker)
    worker.send_signal(signal.SIGTERM)  # the main process only: Celery's warm shutdown
    wait_for(lambda: "shutdown" in cluster.log(0).lower(), "the worker to begin its warm shutdown", worker)
    (signals / f"release-{blocked}").touch()
    assert worker.wait(timeout=60) == 0
    # The sweep ran to its end before the worker exited: every row once, none half-done.
    assert Counter(effects(cluster.effects)) == Counter(range(1, rows + 1))
    assert done_count(cluster.engine) == rows


def test_purged_messages_are_finished_by_the_next_sweep_from_beat(pg_engine: Engine, tmp_path: Path, redis_url: str) -> None:
    with _cluster(pg_engine, tmp_path, redis_url, redis_url) as cluster:
        with Session(cluster.engine) as session:
            cluster.jobs.dispatch_on_commit(session)
            for start in range(1, 201, 20):
                session.add_all([jobapp.Item(id=i) for i in range(start, start + 20)])
                session.commit()
        with cluster.app.connection_for_write() as connection:
            purged = connection.default_channel.queue_purge(f"{cluster.prefix}items")
        assert purged == 10  # one message per commit, none of them delivered
        # A worker with beat inside it, sweeping every second: beat replaces cron.
        cluster.start("--beat", "--schedule", str(tmp_path / "beat-schedule"), CELERYAPP_SWEEP_EVERY="1")
        wait_for(lambda: done_count(cluster.engine) == 200, "beat's sweep to finish every row", timeout=60)
        assert Counter(effects(cluster.effects)) == Counter(range(1, 201))
        assert "batchjobs.sweep" in cluster.log(0)


def test_a_message_before_the_commit_or_after_a_rollback_does_nothing(cluster: Cluster) -> None:
    cluster.start()
    run_rows = cluster.jobs.run_rows
    with Session(cluster.engine) as session:
        session.add(jobapp.Item(id=1))
        session.flush()
        # The message overtakes the commit: the row is not visible to the worker yet.
        early = run_rows.apply_async(kwargs={"job": ITEMS, "keys": [1]}).get(timeout=30)
        assert early["done"] == 0 and early["failed"] == 0
        session.commit()
    assert processed(cluster.engine) == {1: False}  # pending, for the next sweep or message

    with Session(cluster.engine) as session:
        cluster.jobs.dispatch_on_commit(session)
        session.add(jobapp.Item(id=2))
        session.flush()
        session.rollback()  # sends nothing
        late = run_rows.apply_async(kwargs={"job": ITEMS, "keys": [2]}).get(timeout=30)
        assert late["done"] == 0 and late["failed"] == 0

    cluster.sweep()
    wait_for(lambda: processed(cluster.engine) == {1: True}, "the sweep to handle row 1", timeout=30)
    assert effects(cluster.effects) == [1]
    assert "Traceback" not in cluster.log(0)


def test_eager_mode_runs_handlers_at_the_commit(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    app, jobs = make_app("memory://", None)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    jobs.engines.engine = jobs.engines.given = engine  # the test's own engine, as an app passes engine=
    with Session(engine) as session:
        jobs.dispatch_on_commit(session)
        session.add_all([jobapp.Item(id=1), jobapp.Item(id=2)])
        session.commit()
        assert effects(behaviour.effects) == [1, 2]  # handled before commit() returned

        behaviour.poison = {3}
        session.add(jobapp.Item(id=3))
        with pytest.raises(ValueError, match="poison row 3"):
            session.commit()
        assert session.scalar(select(Failure.row_key)) == "3"  # recorded first, as in production

        # Core inserts are not seen by the hook: the sweep (eager as well) takes them.
        session.execute(insert(jobapp.Item).values(id=4))
        session.commit()
        assert 4 not in effects(behaviour.effects)
    behaviour.poison = set()
    assert jobs.sweep.delay(queue="items").get()["done"] == 1
    assert effects(behaviour.effects) == [1, 2, 3, 4]


def test_install_routes_each_queue_and_schedules_its_sweep() -> None:
    app, jobs = make_app("memory://", None, queue_prefix="p-", sweep_every=30)
    assert sorted(app.conf.beat_schedule) == ["batchjobs-sweep-items", "batchjobs-sweep-mail", "batchjobs-sweep-media"]
    entry = app.conf.beat_schedule["batchjobs-sweep-mail"]
    assert entry["task"] == "batchjobs.sweep" and entry["schedule"] == 30.0
    assert entry["kwargs"] == {"queue": "mail"} and entry["options"] == {"expires": 30.0}
    router = app.amqp.router
    assert router.route({}, "batchjobs.sweep", kwargs={"queue": "media"})["queue"].name == "p-media"
    assert router.route({}, "batchjobs.run_rows", kwargs={"job": "send_receipt", "keys": [1]})["queue"].name == "p-mail"
    assert {"batchjobs.sweep", "batchjobs.run_rows"} <= set(app.tasks)


def test_a_route_the_app_gives_batchjobs_tasks_wins() -> None:
    from celery import Celery

    from batchjobs.celery import install

    app = Celery("routed", broker="memory://", set_as_current=False)
    app.conf.task_routes = {"batchjobs.run_rows": {"queue": "fast"}}
    install(app, jobapp.jobs)
    router = app.amqp.router
    assert router.route({}, "batchjobs.run_rows", kwargs={"job": "send_receipt", "keys": [1]})["queue"].name == "fast"
    assert router.route({}, "batchjobs.sweep", kwargs={"queue": "mail"})["queue"].name == "mail"


def test_a_broker_that_cannot_be_reached_costs_one_warning_not_the_commit(
    engine: Engine, behaviour: jobapp.Behaviour, caplog: pytest.LogCaptureFixture
) -> None:
    app, jobs = make_app(f"redis://127.0.0.1:{free_port()}/0", None)  # nothing listens there
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}
    with Session(engine) as session:
        jobs.dispatch_on_commit(session)
        session.add(jobapp.Item(id=1))
        session.commit()
    warnings = [r.getMessage() for r in caplog.records if r.name == "batchjobs" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "could not send 1 row(s) to Celery" in warnings[0], warnings
    assert "the next sweep handles them" in warnings[0]
    assert processed(engine) == {1: False}  # committed, pending for the next sweep
    assert effects(behaviour.effects) == []


def test_a_savepoint_rolled_back_keeps_the_rest_of_the_transaction_dispatched(engine: Engine, behaviour: jobapp.Behaviour) -> None:
    app, jobs = make_app("memory://", None)
    app.conf.update(task_always_eager=True, task_eager_propagates=True)
    jobs.engines.engine = jobs.engines.given = engine
    with Session(engine) as session:
        jobs.dispatch_on_commit(session)
        session.add(jobapp.Item(id=1))
        session.flush()
        savepoint = session.begin_nested()
        session.add(jobapp.Item(id=2))
        session.flush()
        savepoint.rollback()
        session.commit()
    assert effects(behaviour.effects) == [1]  # row 2 was never committed: its key finds nothing
    assert processed(engine) == {1: True}


def test_install_refuses_a_bad_schedule_or_an_unknown_queue_in_one_line() -> None:
    from celery import Celery

    from batchjobs.celery import install

    app = Celery("refused", broker="memory://", set_as_current=False)
    with pytest.raises(BatchJobsError, match="sweep interval must be more than 0"):
        install(app, jobapp.jobs, sweep_every=0)
    with pytest.raises(BatchJobsError, match="unknown queue 'nope'"):
        install(app, jobapp.jobs, queues=["nope"])
    assert not app.conf.beat_schedule


def test_the_welcome_example_has_its_celery_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", "memory://")
    from batchjobs.examples.welcome.celery_app import app, welcome_jobs

    assert app.conf.beat_schedule["batchjobs-sweep-mail"]["kwargs"] == {"queue": "mail"}
    route = app.amqp.router.route({}, "batchjobs.run_rows", kwargs={"job": "send_welcome_email", "keys": [1]})
    assert route["queue"].name == "mail"
    assert welcome_jobs.sweep.name in app.tasks and welcome_jobs.run_rows.name in app.tasks


def test_the_app_configured_after_install_keeps_the_sweeps_and_routes() -> None:
    from celery import Celery

    from batchjobs.celery import install

    app = Celery("configured_later", broker="memory://", set_as_current=False)
    install(app, jobapp.jobs, sweep_every=30)

    class Settings:  # as config_from_object("django.conf:settings") would bring them
        beat_schedule = {"nightly": {"task": "report", "schedule": 86400.0}, "batchjobs-sweep-mail": {"task": "mine", "schedule": 5.0}}
        task_routes = {"report": {"queue": "reports"}}

    app.config_from_object(Settings)
    schedule = app.conf.beat_schedule
    assert sorted(schedule) == ["batchjobs-sweep-items", "batchjobs-sweep-mail", "batchjobs-sweep-media", "nightly"]
    assert schedule["batchjobs-sweep-mail"]["task"] == "mine"  # the app's own entry wins
    router = app.amqp.router
    assert router.route({}, "batchjobs.sweep", kwargs={"queue": "media"})["queue"].name == "media"
    assert router.route({}, "report")["queue"].name == "reports"
