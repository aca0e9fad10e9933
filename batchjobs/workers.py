"""`run-pending --concurrency N`: several workers in one invocation, each claiming with SKIP LOCKED.

It is the same mechanism as N cron hosts: every worker runs the ordinary run loop on its own
database connection, and the database hands each one different rows. Processes suit CPU-bound
handlers; threads suit handlers that wait on the network (email, remote APIs), where two or more
workers per core pay off.

A worker that dies (kill -9, OOM) loses nothing: its chunk's transaction rolls back, its rows
are pending again, and the other workers carry on. A worker that stops on an error (its
connection lost, say) is not a death: it hands back what it committed and its error, the other
workers are stopped as with a signal, and the invocation fails with that error, in one line,
whichever the pool.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from batchjobs.errors import BatchJobsError
from batchjobs.history import RunRecorder, error_line, partial_summary, record_run
from batchjobs.registry import Registry
from batchjobs.runner import run_pending
from batchjobs.signals import RELAYED_ABORT, RELAYED_STOP, StopRequest, on_abort, stop_on_signals
from batchjobs.store import store_for
from batchjobs.summary import JobStats, RunSummary
from batchjobs.timeutil import utcnow

POOLS = ("process", "thread")
#: The reason a worker's error gives the others to stop.
WORKER_ERROR = "worker error"
#: The reason a worker's death gives the others to stop (long-running workers only).
WORKER_DIED = "worker died"

logger = logging.getLogger("batchjobs")


class WorkerFailed(BatchJobsError):
    """A worker process stopped on an error; the message is that error's line."""


def run_concurrently(
    registry: Registry,
    engine: Engine,
    *,
    concurrency: int,
    pool: str = "process",
    stop: StopRequest | None = None,
    jobs: Sequence[str] = (),
    queues: Sequence[str] = (),
    target: Callable[..., RunSummary] = run_pending,
    kind: str = "run",
    **options: Any,
) -> RunSummary:
    """Run ``concurrency`` workers over the same selection and add up what they did.

    Each worker calls ``target`` (:func:`batchjobs.run_pending`, or
    :func:`batchjobs.worker.run_worker` for long-running workers) with ``options``
    (``max_runtime``, ``batch_size``, ``commit_interval``, ...). ``stop`` reaches every worker:
    with processes, a signal received here is passed on to the children. The invocation is
    recorded as one run (of ``kind``) in the run history.

    If a worker stops on an error, the others are stopped, and its error is raised once they
    are done (with processes, as :class:`WorkerFailed` with the error's line), carrying what
    every worker committed (:func:`batchjobs.history.partial_summary`).

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
        _run_threads(registry, engine, concurrency, stop, work, total, target, kind)
    else:
        _run_processes(registry, engine, concurrency, stop, work, total, target, kind)
    return total


def _run_threads(
    registry: Registry,
    engine: Engine,
    count: int,
    stop: StopRequest,
    work: dict[str, Any],
    total: RunSummary,
    target: Callable[..., RunSummary],
    kind: str,
) -> None:
    parts: list[RunSummary] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            parts.append(target(registry, engine, stop=stop, **work))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            # What the worker committed before its error counts like any other worker's rows.
            part = partial_summary(exc)
            if part is not None:
                parts.append(part)
            errors.append(exc)
            stop.set(WORKER_ERROR)

    threads = [threading.Thread(target=worker, name=f"batchjobs-worker-{i}") for i in range(count)]
    backlog = registry.select(jobs=work["jobs"], queues=work["queues"])
    with record_run(store_for(engine), total, work["queues"], utcnow, keep_for=registry.keep_history, kind=kind, backlog=backlog):
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


def _child(
    registry: Registry, engine: Engine, work: dict[str, Any], results: Any, target: Callable[..., RunSummary]
) -> None:
    # The parent's pooled connections must not be shared: drop them without closing them
    # (closing would end the parent's sessions), as SQLAlchemy advises for forked processes.
    engine.dispose(close=False)
    report: dict[str, Any] = {"pid": os.getpid(), "error": None}
    try:
        # Ctrl-C reaches every process of the terminal's group: the parent decides and relays.
        with stop_on_signals(hangup=True, relayed=True) as stop:
            summary = target(registry, engine, stop=stop, **work)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it
        # Left alone, multiprocessing would print the error's whole traceback here; the parent
        # reports it in one line instead, like a thread worker's. Only an unexpected error (a
        # bug, not a database or configuration problem) keeps its traceback.
        if not isinstance(exc, (BatchJobsError, DBAPIError)):
            logger.error("worker %d stopped on an unexpected error", os.getpid(), exc_info=exc)
        summary = partial_summary(exc) or RunSummary()
        report["error"] = error_line(exc, engine.url)
    report["summary"] = summary.as_json()
    results.put(report)
    if report["error"] is not None:
        sys.exit(1)  # multiprocessing takes SystemExit as the exit status, without a traceback


def _run_processes(
    registry: Registry,
    engine: Engine,
    count: int,
    stop: StopRequest,
    work: dict[str, Any],
    total: RunSummary,
    target: Callable[..., RunSummary],
    kind: str,
) -> None:
    # The run is recorded before forking: on SQLite the parent's INSERT would otherwise queue for
    # the write lock behind its busy children, and a parent stuck there cannot react to SIGTERM.
    store = store_for(engine)
    backlog = registry.select(jobs=work["jobs"], queues=work["queues"])
    recorder = RunRecorder(store, total, work["queues"], utcnow, keep_for=registry.keep_history, kind=kind, backlog=backlog)
    recorder.open()
    with recorder.running():
        # fork: the app's registry, models and handlers are inherited as they are, nothing is pickled.
        # The heartbeat thread starts only after the fork, so no child inherits a thread's locks.
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        store.engine.dispose(close=False)
        children = [
            context.Process(
                target=_child, args=(registry, store.engine, work, results, target), name=f"batchjobs-worker-{i}"
            )
            for i in range(count)
        ]
        for child in children:
            child.start()
        recorder.start_heartbeat()
        started = time.monotonic()
        # A worker invocation lives on: with one process gone it would work on at part strength,
        # unseen. It stops instead, and its supervisor (systemd's Restart=) starts it afresh.
        stop_when_one_dies = kind == "worker"
        with on_abort(lambda: _abort_children(children)):
            reports = _collect(children, results, stop, stop_when_one_dies)
        total.seconds = time.monotonic() - started
        # The parent's own reason first: with SIGTERM forwarded, every child reports SIGTERM.
        total.stopped_by = stop.reason
        errors = []
        for child in children:
            report = reports.get(child.pid)
            if report is None:
                # Gone without a word: killed (kill -9, OOM) before it could report.
                total.workers_lost += 1
                continue
            total.add(RunSummary.from_json(report["summary"]))
            if report["error"] is not None:
                errors.append(report["error"])
        if errors:
            raise WorkerFailed(errors[0])


#: How long an abort waits for the workers to end before it kills them.
ABORT_WAIT = 10.0


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it has just ended


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _abort_children(children: list[Any]) -> None:
    """A second Ctrl-C: every worker aborts its chunk and ends; one that cannot is killed."""
    for child in children:
        if child.pid is not None:
            _signal(child.pid, RELAYED_ABORT)
    deadline = time.monotonic() + ABORT_WAIT
    for child in children:
        child.join(max(deadline - time.monotonic(), 0.0))
        if child.is_alive() and child.pid is not None:
            _signal(child.pid, signal.SIGKILL)


def _collect(
    children: list[Any], results: Any, stop: StopRequest, stop_when_one_dies: bool = False
) -> dict[int | None, dict[str, Any]]:
    """Every child's report, by pid, once all have ended; a worker's error stops the others, and
    with ``stop_when_one_dies`` so does a worker's death. A death is said when it happens."""
    reports: dict[int | None, dict[str, Any]] = {}
    forwarded = False
    mourned: set[int] = set()
    while any(child.is_alive() for child in children):
        for child in children:
            # Killed by a signal (kill -9, the OOM killer): it could not report.
            if child.exitcode is not None and child.exitcode < 0 and child.pid not in mourned and not stop:
                mourned.add(child.pid)
                logger.error(
                    "worker process %s (pid %d) was killed by %s; the rows it had claimed are pending again%s",
                    child.name,
                    child.pid,
                    _signal_name(-child.exitcode),
                    "; stopping the others" if stop_when_one_dies else "",
                )
                if stop_when_one_dies:
                    stop.set(WORKER_DIED)
        if stop and not forwarded:
            # Finish the current row, commit, exit; after Ctrl-C, as after Ctrl-C.
            relay = RELAYED_STOP if stop.reason == "SIGINT" else signal.SIGTERM
            for child in children:
                if child.is_alive() and child.pid is not None:
                    _signal(child.pid, relay)
            forwarded = True
        # Reading while the children run, not after: a child cannot exit before the pipe has
        # taken its report, and a large report (many jobs) would not fit in it.
        try:
            report = results.get(timeout=0.1)
        except queue.Empty:
            continue
        reports[report["pid"]] = report
        if report["error"] is not None and not stop:
            stop.set(WORKER_ERROR)
    for child in children:
        child.join()
    # A child that ended had handed its report to the pipe before it exited.
    while True:
        try:
            report = results.get_nowait()
        except queue.Empty:
            break
        reports[report["pid"]] = report
    return reports
