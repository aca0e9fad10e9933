"""The run loop behind `batchjobs run-pending`.

One chunk is one transaction: claim up to ``batch_size`` pending rows (locked), run the handler on
each while the rows stay locked, then mark the successful rows done with one UPDATE, write failure
records, and commit. A crash at any point rolls the chunk back and its rows are pending again.

Handlers run inside savepoints (see :class:`_Handler`) that cost nothing until a handler touches
the database, so a handler that sends an email or calls an API costs no round trip per row,
while one that writes and then raises has its writes undone without hurting its neighbours.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy import Dialect as SQLADialect
from sqlalchemy.orm import Session

from batchjobs.claim import ChunkStatements
from batchjobs.db import ensure_schema, prepare
from batchjobs.dialects import Dialect
from batchjobs.direct import direct_allowed
from batchjobs.durations import format_duration
from batchjobs.errors import BatchJobsError
from batchjobs.failures import RowFailure, clear_failures, record_failures, utcnow
from batchjobs.history import record_run
from batchjobs.registry import FlagJob, JobContext, Registry

logger = logging.getLogger("batchjobs")


class JobTimeout(BaseException):
    """A handler ran longer than its job's ``timeout``.

    A BaseException, like KeyboardInterrupt, so that a handler's ``except Exception`` cannot
    swallow it and carry on; ``finally`` blocks still run.
    """


class _ChunkSession(Session):
    """The chunk's session, as handlers see it through ``ctx.session``.

    Committing, rolling back or closing it inside a handler would release the chunk's row locks
    (another run could take the same rows) or undo rows already handled, so it is refused.
    """

    in_handler = False

    def _refuse(self, what: str) -> None:
        if self.in_handler:
            raise BatchJobsError(f"handlers must not {what} the session: batchjobs commits the chunk itself")

    def commit(self) -> None:
        self._refuse("commit")
        super().commit()

    def rollback(self) -> None:
        self._refuse("roll back")
        super().rollback()

    def close(self) -> None:
        self._refuse("close")
        super().close()


class StopRequest:
    """Set from a signal handler (or another thread); the loop stops after the current row."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return self.reason is not None


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """While active, SIGTERM and SIGINT ask the run to finish its current row, commit, and return."""

    def handle(signum: int, _frame: FrameType | None) -> None:
        stop.set(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class JobStats:
    done: int = 0
    failed: int = 0


@dataclass
class RunSummary:
    """What one run did, per job."""

    jobs: dict[str, JobStats] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_by: str | None = None
    #: With --concurrency: workers that died (kill -9, OOM); their rows are pending again.
    workers_lost: int = 0

    @property
    def done(self) -> int:
        return sum(s.done for s in self.jobs.values())

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.jobs.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "stopped_by": self.stopped_by,
            "workers_lost": self.workers_lost,
            "jobs": {name: {"done": s.done, "failed": s.failed} for name, s in self.jobs.items()},
        }

    def line(self) -> str:
        """One line for cron's mail: totals, then per job."""
        per_job = ", ".join(
            f"{name} {s.done} done" + (f"/{s.failed} failed" if s.failed else "")
            for name, s in self.jobs.items()
            if s.done or s.failed
        )
        stopped = f", stopped by {self.stopped_by}" if self.stopped_by else ""
        if self.workers_lost:
            stopped += f", {self.workers_lost} worker(s) died"
        details = f" ({per_job})" if per_job else ""
        return f"batchjobs: {self.done} done, {self.failed} failed in {format_duration(self.seconds)}{stopped}{details}"


def run_pending(
    registry: Registry,
    engine: Engine,
    *,
    jobs: Sequence[str] = (),
    queues: Sequence[str] = (),
    max_runtime: float | None = None,
    batch_size: int | None = None,
    commit_interval: float = 1.0,
    stop: StopRequest | None = None,
    clock: Callable[[], datetime] = utcnow,
    record: bool = True,
    raise_errors: bool = False,
) -> RunSummary:
    """Handle pending rows of the selected jobs until none is left, time is up, or ``stop`` is set.

    Jobs take turns one chunk at a time, so one big backlog does not starve the others. A row
    that fails is not tried again in the same run; ``clock`` is the wall clock for backoff times.
    With ``record`` the run is kept in batchjobs' run history (see :mod:`batchjobs.history`).
    With ``raise_errors`` the first handler exception is raised once its chunk has committed
    (the failure is recorded as usual); tests use it to fail loudly.
    """
    selected = registry.select(jobs=jobs, queues=queues)
    engine, dialect = prepare(engine)
    ensure_schema(engine)
    stop = stop if stop is not None else StopRequest()
    started = time.monotonic()
    deadline = started + max_runtime if max_runtime is not None else None
    run_started = clock()
    bind = dialect.claiming(engine)
    summary = RunSummary(jobs={job.name: JobStats() for job in selected})
    # One connection for the whole run, a transaction per chunk: taking a connection from the
    # pool and giving it back cost a tenth of a plain-row chunk's client time.
    history = record_run(engine, summary, queues, clock, keep_for=registry.keep_history) if record else nullcontext()
    with history, bind.connect() as connection:
        # Checked before batchjobs adds its own listener, which counts statements on this run's
        # connection only: a handler's among them tell that it used the database.
        direct_to = connection.dialect if dialect.direct_statements and direct_allowed(connection) else None
        run = _Run(registry, dialect, connection, run_started, commit_interval, stop, deadline, clock, raise_errors, direct_to)
        event.listen(connection, "before_cursor_execute", run.executed)
        active = list(selected)
        while active and not run.should_stop():
            for job in list(active):
                if run.should_stop():
                    break
                claimed = run.chunk(job, batch_size or job.batch_size, summary.jobs[job.name])
                if not claimed:
                    active.remove(job)
        summary.seconds = time.monotonic() - started
        summary.stopped_by = stop.reason or ("max-runtime" if active else None)
    return summary


class _StatementCounter:
    """Counts statements on the chunk's connection, to tell whether a handler used the database."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *_args: Any) -> None:
        self.count += 1


@dataclass
class _Run:
    registry: Registry
    dialect: Dialect
    connection: Connection
    run_started: datetime
    commit_interval: float
    stop: StopRequest
    deadline: float | None
    clock: Callable[[], datetime]
    raise_errors: bool = False
    #: The SQLAlchemy dialect to compile chunk statements for when they go straight to the driver.
    direct_to: SQLADialect | None = None
    statements: dict[tuple[str, int], ChunkStatements] = field(default_factory=dict)
    executed: _StatementCounter = field(default_factory=_StatementCounter)
    #: Per job, the primary key the next claim continues after.
    after: dict[str, Any] = field(default_factory=dict)

    def should_stop(self, now: float | None = None) -> bool:
        if self.stop:
            return True
        return self.deadline is not None and (now if now is not None else time.monotonic()) >= self.deadline

    def chunk(self, job: FlagJob, limit: int, stats: JobStats) -> int:
        """Claim, handle and commit one chunk; returns how many rows were claimed."""
        statements = self.statements.get((job.name, limit))
        if statements is None:
            statements = ChunkStatements(job, self.dialect, limit, self.direct_to)
            self.statements[job.name, limit] = statements
        # Handlers of plain rows that take no ctx have no handle on the chunk's transaction (their
        # rows are tuples, not objects of a session): they get no session at all.
        bare = statements.record is not None and not job.wants_context
        with self._transaction(bare) as (session, connection):
            now = self.clock()
            after = self.after.get(job.name)
            claimed = statements.claim_rows(connection, session, now, self.run_started, after)
            if not claimed and after is not None:
                # The walk reached the end. One claim from the start picks up rows it passed by:
                # locked by another run then, requeued since, or inserted with a lower key.
                del self.after[job.name]
                claimed = statements.claim_rows(connection, session, now, self.run_started)
            if not claimed:
                return 0
            # Keys are read before any handler runs: a rolled-back savepoint expires its row.
            pks = {row_key: getattr(row, statements.pk_attr) for row, row_key in claimed}
            states = statements.failure_states(connection, list(pks), now, self.run_started)
            attempts = {row_key: count for row_key, (count, _) in states.items()}
            held_back = {row_key for row_key, (_, held) in states.items() if held}
            # Rows held back here stay pending; the commit releases them.
            work = [(row_key, row) for row, row_key in claimed if row_key not in held_back]
            last_reached = claimed[-1][1]
            ctx = None if session is None else JobContext(session=session, job=job, logger=logger.getChild(job.name))
            handler = _Handler(self.dialect, job, session, connection, self.executed)
            done: list[str] = []
            failures: list[RowFailure] = []
            if job.batch:
                error = handler.call([row for _, row in work], ctx) if work else None
                if error is None:
                    done = [key for key, _ in work]
                else:
                    failures = [RowFailure(key, attempts.get(key, 0), error) for key, _ in work]
            else:
                verbose = logger.isEnabledFor(logging.INFO)
                commit_by = time.monotonic() + self.commit_interval
                for index, (key, row) in enumerate(work):
                    # Commit early rather than hold the rest of the chunk locked: unhandled rows
                    # are released by the commit and claimed again by the next chunk.
                    row_started = time.monotonic()
                    if index and (row_started >= commit_by or self.should_stop(row_started)):
                        last_reached = work[index - 1][0]
                        break
                    error = handler.call(row, ctx)
                    if error is None:
                        done.append(key)
                    else:
                        failures.append(RowFailure(key, attempts.get(key, 0), error))
                    if verbose:
                        _log_row(job, key, time.monotonic() - row_started, error)
            handler.finish()
            now = self.clock()
            statements.mark_done(connection, [pks[key] for key in done], now)
            clear_failures(connection, self.dialect, job, [key for key in done if key in states])
            record_failures(connection, self.dialect, job, failures, now)
            (connection if session is None else session).commit()
        # The next chunk continues the walk of the pending index after the rows this one reached
        # rather than from its start, past the entries of every row done since the last vacuum.
        # A short chunk reached the end of the pending rows: the next claim starts over, so rows
        # that became claimable behind the walk (backoff over, requeued) wait no longer.
        if len(claimed) < limit:
            self.after.pop(job.name, None)
        else:
            self.after[job.name] = pks[last_reached]
        # Reported after the commit, so a hook never announces a failure that was not recorded.
        for failure in failures:
            self._report(job, failure)
        stats.done += len(done)
        stats.failed += len(failures)
        if self.raise_errors and failures:
            raise failures[0].error
        return len(claimed)

    @contextmanager
    def _transaction(self, bare: bool) -> Iterator[tuple[_ChunkSession | None, Connection]]:
        """The chunk's session and the run's connection; with ``bare``, the connection alone.

        The chunk's transaction is rolled back unless it was committed.
        """
        connection = self.connection
        try:
            if bare:
                # Begun here, not by the first statement: a direct statement bypasses SQLAlchemy's
                # autobegin, and the commit must know there is a transaction to commit.
                connection.begin()
                yield None, connection
            else:
                # A session on a connection outside a transaction begins one and commits it.
                with _ChunkSession(connection, expire_on_commit=False, autoflush=False) as session:
                    yield session, session.connection()
        finally:
            if connection.in_transaction():
                connection.rollback()

    def _report(self, job: FlagJob, failure: RowFailure) -> None:
        attempt = failure.attempts_before + 1
        logger.error(
            "job %s failed on row %s (attempt %d of %d): %s: %s",
            job.name,
            failure.row_key,
            attempt,
            job.max_attempts,
            failure.error_type,
            failure.error,
            exc_info=failure.error,
            extra={"job": job.name, "row_key": failure.row_key, "attempt": attempt, "outcome": "failed"},
        )
        if self.registry.on_failure is not None:
            try:
                self.registry.on_failure(job, failure.row_key, failure.error)
            except Exception:  # noqa: BLE001 - a broken hook must not lose the chunk
                logger.exception("on_failure hook raised for job %s row %s", job.name, failure.row_key)


class _Handler:
    """Calls a chunk's handlers, each in a savepoint, without paying for one per row.

    SQLAlchemy sends SAVEPOINT only once a handler uses the connection, but its bookkeeping for
    each nested transaction still costs more than a handler that sends an email. So handlers
    share one nested transaction for as long as they leave the database and the session alone;
    the first one that touches either gets its changes released (or, if it fails, rolled back)
    right after it returns. A failure therefore never undoes an earlier row's writes, and a
    chunk of handlers that do not write costs no savepoint at all. Handlers of plain rows
    (``columns=``) that take no ctx run with no session, and skip all of this.
    """

    def __init__(
        self, dialect: Dialect, job: FlagJob, session: _ChunkSession | None, connection: Connection, statements: _StatementCounter
    ) -> None:
        self.dialect = dialect
        self.job = job
        # None for handlers that cannot reach the chunk's transaction: they need no savepoint.
        self.session = session
        self.dbapi_connection = connection.connection.dbapi_connection
        self.statements = statements
        self.savepoint: Any = None

    def call(self, rows: Any, ctx: JobContext | None) -> BaseException | None:
        """Run the handler; return the exception it raised (its changes undone), if any."""
        job, session = self.job, self.session
        if session is not None and self.savepoint is None:
            self.savepoint = session.begin_nested()
        limit = _TimeLimit(job.timeout, self.dialect, self.dbapi_connection) if job.timeout else None
        executed = self.statements.count
        try:
            if session is not None:
                session.in_handler = True
            try:
                if limit is None:
                    job.call(rows, ctx)
                else:
                    with limit:
                        job.call(rows, ctx)
            finally:
                if session is not None:
                    session.in_handler = False
            if limit is not None and limit.expired:
                raise limit.error()  # the handler swallowed the cancelled statement's error
            # _is_clean() is SQLAlchemy's own cheap test (no collections built): nothing new,
            # deleted or modified in the session. This runs once per row, so it matters.
            if session is not None and (self.statements.count != executed or not session._is_clean()):
                session.flush()
                if self.dialect.in_failed_transaction(self.dbapi_connection):
                    # The handler caught a database error and carried on; PostgreSQL refuses all
                    # further statements until the savepoint is rolled back, so this row failed.
                    raise BatchJobsError("the handler went on after a database error; its changes were rolled back")
                self.savepoint.commit()
                self.savepoint = None
        except (JobTimeout, Exception) as exc:  # noqa: BLE001 - a handler may raise anything; it is recorded
            savepoint, self.savepoint = self.savepoint, None
            if savepoint is not None:
                savepoint.rollback()
            # A statement cancelled by the time limit surfaces as a driver error: call it a timeout.
            return limit.error() if limit is not None and limit.expired and not isinstance(exc, JobTimeout) else exc
        return None

    def finish(self) -> None:
        """Release the shared savepoint, if the last handlers left one open."""
        if self.savepoint is not None:
            self.savepoint.commit()
            self.savepoint = None


def _log_row(job: FlagJob, key: Any, seconds: float, error: BaseException | None) -> None:
    outcome = "done" if error is None else "failed"
    logger.info(
        "job %s row %s %s in %.3fs",
        job.name,
        key,
        outcome,
        seconds,
        extra={"job": job.name, "row_key": str(key), "duration": round(seconds, 6), "outcome": outcome},
    )


class _TimeLimit:
    """A handler's ``timeout``, enforced with SIGALRM in the main thread.

    When the alarm goes off in Python code, :class:`JobTimeout` is raised there. When it goes off
    while the PostgreSQL driver waits for a statement, raising would leave the connection in the
    middle of a protocol exchange and lose the whole chunk; instead the statement is cancelled
    on the server, it fails with a driver error, the row's savepoint is rolled back as for any
    failure, and the row is recorded as timed out.
    """

    _warned = False

    def __init__(self, seconds: float, dialect: Dialect, dbapi_connection: Any) -> None:
        self.seconds = seconds
        self.dialect = dialect
        self.dbapi_connection = dbapi_connection
        self.expired = False
        self._previous: Any = None

    def error(self) -> JobTimeout:
        return JobTimeout(f"handler ran longer than its timeout of {format_duration(self.seconds)}")

    def _expire(self, _signum: int, _frame: FrameType | None) -> None:
        self.expired = True
        if not self.dialect.cancel_running_statement(self.dbapi_connection):
            raise self.error()

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            if not _TimeLimit._warned:
                logger.warning("job timeouts are only enforced in the main thread")
                _TimeLimit._warned = True
            return
        self._previous = signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
