"""`run-pending --concurrency N`: several workers in one invocation, each claiming with SKIP LOCKED.

It is the same mechanism as N cron hosts: every worker runs the ordinary run loop on its own
database connection, and the database hands each one different rows. Processes suit CPU-bound
handlers; threads suit handlers that wait on the network (email, remote APIs), where two or more
workers per core pay off.

A worker that dies (kill -9, OOM) loses nothing: its chunk's transaction rolls back, its rows
are pending again, and the other workers carry on.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine

from batchjobs.errors import BatchJobsError
from batchjobs.history import RunRecorder, record_run
from batchjobs.registry import Registry
from batchjobs.runner import run_pending
from batchjobs.signals import StopRequest, stop_on_signals
from batchjobs.store import store_for
from batchjobs.summary import JobStats, RunSummary
from batchjobs.timeutil import utcnow

POOLS = ("process", "thread")


def run_concurrently(
    registry: Registry,
    engine: Engine,
    *,
    concurrency: int,
    pool: str = "process",
    stop: StopRequest | None = None,
    jobs: Sequence[str] = (),
    queues: Sequence[str] = (),
    **options: Any,
) -> RunSummary:
    """Run ``concurrency`` workers over the same selection and add up what they did.

    ``options`` are passed to :func:`batchjobs.run_pending` (``max_runtime``, ``batch_size``,
    ``commit_interval``). ``stop`` reaches every worker: with processes, a signal received here
    is passed on to the children. The invocation is recorded as one run in the run history.

    Every worker works through ``engine`` as it is (its creator, connect arguments, pool settings
    and listeners): threads share its pool, which must hold ``concurrency`` + 1 connections
    (:func:`batchjobs.create_engine` takes ``pool_size``); each process gets a fresh pool of its
    own.
    """
    if concurrency < 1:
        raise BatchJobsError(f"concurrency must be at least 1, got {concurrency}")
    if pool not in POOLS:
        raise BatchJobsError(f"unknown pool {pool!r} (use one of: {', '.join(POOLS)})")
    # Unknown job or queue names fail here, once, not in every worker.
    selected = registry.select(jobs=jobs, queues=queues)
    stop = stop if stop is not None else StopRequest()
    total = RunSummary(jobs={job.name: JobStats() for job in selected})
    work = dict(jobs=jobs, queues=queues, record=False, **options)
    if pool == "thread":
        _run_threads(registry, engine, concurrency, stop, work, total)
    else:
        _run_processes(registry, engine, concurrency, stop, work, total)
    return total


def _run_threads(
    registry: Registry, engine: Engine, count: int, stop: StopRequest, work: dict[str, Any], total: RunSummary
) -> None:
    parts: list[RunSummary] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            parts.append(run_pending(registry, engine, stop=stop, **work))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            errors.append(exc)
            stop.set("worker error")

    threads = [threading.Thread(target=worker, name=f"batchjobs-worker-{i}") for i in range(count)]
    with record_run(store_for(engine), total, work["queues"], utcnow, keep_for=registry.keep_history):
        for thread in threads:
            thread.start()
        for thread in threads:
            # join() with a timeout keeps the main thread able to take SIGTERM and Ctrl-C.
            while thread.is_alive():
                thread.join(0.2)
        for part in parts:
            total.add(part)
    if errors:
        raise errors[0]


def _child(registry: Registry, engine: Engine, work: dict[str, Any], results: Any) -> None:
    # The parent's pooled connections must not be shared: drop them without closing them
    # (closing would end the parent's sessions), as SQLAlchemy advises for forked processes.
    engine.dispose(close=False)
    with stop_on_signals() as stop:
        results.put(run_pending(registry, engine, stop=stop, **work).as_json())


def _run_processes(
    registry: Registry, engine: Engine, count: int, stop: StopRequest, work: dict[str, Any], total: RunSummary
) -> None:
    # The run is recorded before forking: on SQLite the parent's INSERT would otherwise queue for
    # the write lock behind its busy children, and a parent stuck there cannot react to SIGTERM.
    store = store_for(engine)
    recorder = RunRecorder(store, total, work["queues"], utcnow, keep_for=registry.keep_history)
    recorder.open()
    # fork: the app's registry, models and handlers are inherited as they are, nothing is pickled.
    # The heartbeat thread starts only after the fork, so no child inherits a thread's locks.
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    store.engine.dispose(close=False)
    children = [
        context.Process(target=_child, args=(registry, store.engine, work, results), name=f"batchjobs-worker-{i}")
        for i in range(count)
    ]
    for child in children:
        child.start()
    recorder.start_heartbeat()
    outcome = "failed"
    try:
        forwarded = False
        while any(child.is_alive() for child in children):
            if stop and not forwarded:
                for child in children:
                    if child.is_alive():
                        child.terminate()  # SIGTERM: finish the current row, commit, exit
                forwarded = True
            for child in children:
                child.join(0.1)
        # A child that exited cleanly has put its counts on the queue before it ended.
        for child in children:
            if child.exitcode == 0:
                total.add(RunSummary.from_json(results.get(timeout=30)))
        total.workers_lost = sum(1 for child in children if child.exitcode != 0)
        outcome = total.outcome
    finally:
        recorder.close(outcome)
