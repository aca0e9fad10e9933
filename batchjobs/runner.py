"""The run loop behind `batchjobs run-pending`.

One chunk is one transaction: claim up to ``batch_size`` pending rows (locked), run the handler on
each while the rows stay locked, then mark the successful rows done with one UPDATE, write failure
records, and commit. A crash at any point rolls the chunk back and its rows are pending again.

The loop builds no SQL: its statements come from the database's Store. Handlers run inside
savepoints that cost nothing until a handler touches the database (see
:mod:`batchjobs.savepoints`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from batchjobs.crashes import InflightMarker, marker_dir, take_abandoned
from batchjobs.db import ensure_schema
from batchjobs.failures import RowFailure, forget_stale_failures
from batchjobs.history import record_run
from batchjobs.registry import FlagJob, JobContext, Registry, parse_key
from batchjobs.savepoints import ChunkSession, HandlerCalls, StatementCounter
from batchjobs.signals import StopRequest, on_abort
from batchjobs.store import Store, store_for
from batchjobs.store.base import ChunkStatements, advance
from batchjobs.summary import JobStats, RunSummary
from batchjobs.timeutil import check_max_runtime, check_seconds, format_duration, utcnow
from batchjobs.watchdog import Watchdog

logger = logging.getLogger("batchjobs")


def run_pending(
    registry: Registry,
    engine: Engine,
    *,
    jobs: Sequence[str] = (),
    queues: Sequence[str] = (),
    max_runtime: float | None = None,
    batch_size: int | None = None,
    commit_interval: float = 1.0,
    lock_timeout: float = 5.0,
    stop: StopRequest | None = None,
    clock: Callable[[], datetime] = utcnow,
    record: bool = True,
    raise_errors: bool = False,
) -> RunSummary:
    """Handle pending rows of the selected jobs until none is left, time is up, or ``stop`` is set.

    Each chunk commits on its own; nothing is left for the caller to commit. Jobs take turns one
    chunk at a time, so one big backlog does not starve the others. A row that fails is not
    tried again in the same run; ``clock`` is the wall clock for backoff times. A claim that
    cannot get its table within ``lock_timeout`` seconds (a migration holds it) skips that job in
    this run. What the handlers are about to handle is marked, and rows whose handlers took a
    worker down before are counted and run apart (see :mod:`batchjobs.crashes`). With
    ``record`` the run is kept in batchjobs' run history (see :mod:`batchjobs.history`). With
    ``raise_errors`` the first handler exception is raised once its chunk has committed (the
    failure is recorded as usual); tests use it to fail loudly.
    """
    selected = registry.select(jobs=jobs, queues=queues)
    check_seconds(lock_timeout, "lock timeout")
    check_max_runtime(max_runtime)
    store = store_for(engine)
    ensure_schema(store.engine)
    stop = stop if stop is not None else StopRequest()
    started = time.monotonic()
    summary = RunSummary(jobs={job.name: JobStats() for job in selected})
    history = record_run(store, summary, queues, clock, keep_for=registry.keep_history, record=record, backlog=selected)
    deadline = started + max_runtime if max_runtime is not None else None
    with history, running(registry, store, commit_interval, lock_timeout, stop, deadline, clock, raise_errors) as run:
        drained = run.drain(selected, summary, batch_size)
        summary.seconds = time.monotonic() - started
        summary.stopped_by = stop.reason or (None if drained else "max-runtime")
    return summary


def run_rows(
    registry: Registry,
    engine: Engine,
    job: str,
    keys: Sequence[Any],
    *,
    commit_interval: float = 1.0,
    lock_timeout: float = 5.0,
    stop: StopRequest | None = None,
    clock: Callable[[], datetime] = utcnow,
    batch_size: int | None = None,
    record: bool = False,
    raise_errors: bool = False,
) -> RunSummary:
    """Handle the rows of ``job`` with these primary keys, those of them that are claimable now.

    The claim is run-pending's, restricted to these keys: rows that are no longer pending, not
    yet committed, held back (backing off, dead, crash suspects) or locked by another run are
    skipped without error, and left to whoever holds them or to the next run. Everything else
    (savepoints, failure records, marks, crash markers, commits) is :func:`run_pending`'s. Keys
    are primary-key values, or their text as failure records show it; they are claimed in chunks
    of the job's ``batch_size`` (or ``batch_size``). Runs are not kept in the run history unless
    ``record``: a run of a few rows per commit would crowd out the others.
    """
    flag_job = registry.job(job)
    check_seconds(lock_timeout, "lock timeout")
    values = [parse_key(flag_job.primary_key, key) if isinstance(key, str) else key for key in keys]
    store = store_for(engine)
    ensure_schema(store.engine)
    stop = stop if stop is not None else StopRequest()
    started = time.monotonic()
    summary = RunSummary(jobs={flag_job.name: JobStats()})
    if not values:
        return summary
    history = record_run(store, summary, [], clock, keep_for=registry.keep_history, record=record)
    with history, running(registry, store, commit_interval, lock_timeout, stop, None, clock, raise_errors) as run:
        run.take(flag_job, values, summary.jobs[flag_job.name], batch_size)
        summary.seconds = time.monotonic() - started
        summary.stopped_by = stop.reason
    return summary


@contextmanager
def running(
    registry: Registry,
    store: Store,
    commit_interval: float,
    lock_timeout: float,
    stop: StopRequest,
    deadline: float | None,
    clock: Callable[[], datetime],
    raise_errors: bool = False,
) -> Iterator[_Run]:
    """A run's connection and state, for one drain (run-pending) or many (a worker)."""
    # One connection for the whole run, a transaction per chunk: taking a connection from the
    # pool and giving it back cost a tenth of a plain-row chunk's client time.
    with store.claiming_connection() as connection:
        run = _Run(
            registry=registry,
            store=store,
            connection=connection,
            run_started=clock(),
            commit_interval=commit_interval,
            lock_timeout=lock_timeout,
            stop=stop,
            deadline=deadline,
            clock=clock,
            raise_errors=raise_errors,
            marker=InflightMarker(marker_dir(store)),
        )
        ended_well = False
        try:
            with on_abort(run.abort):
                yield run
            ended_well = True
        finally:
            run.close(ended_well)


#: Seconds between two looks of a long-running worker for failure records whose row is gone.
FORGET_EVERY = 30.0

#: What chunk() returns for a job it had to skip for the rest of the run.
_SKIPPED = -1
#: How many times a chunk runs when the database keeps breaking deadlocks by rolling it back.
DEADLOCK_ATTEMPTS = 3


@dataclass
class _Run:
    """One run's state between chunks: its connection, statements and where each job's walk is."""

    registry: Registry
    store: Store
    connection: Connection
    #: When the current pass started: rows that failed since wait for the next one.
    run_started: datetime
    commit_interval: float
    lock_timeout: float
    stop: StopRequest
    deadline: float | None
    clock: Callable[[], datetime]
    #: Where this worker marks what its handlers are about to handle.
    marker: InflightMarker
    raise_errors: bool = False
    statements: dict[tuple[str, int], ChunkStatements] = field(default_factory=dict)
    #: Per job, the primary key the next claim continues after.
    after: dict[str, Any] = field(default_factory=dict)
    executed: StatementCounter = field(init=False)
    watchdog: Watchdog = field(init=False)
    #: Server limits that would end a chunk whose handlers take long; lifted in each chunk.
    limits: list[str] = field(init=False)
    #: Jobs with crash suspects to run apart once their walk is done.
    with_suspects: set[str] = field(init=False)
    #: Names of the jobs with failure records when the run started; None once used.
    failing: set[str] | None = field(init=False)
    #: When failure records that no longer belong to a row were last dropped (monotonic seconds).
    forgot_at: float | None = None
    #: Set by abort(), from another thread, when the process is about to end.
    aborted: threading.Event = field(default_factory=threading.Event)
    #: Jobs whose crashes could not be counted: they sit out until they are (see account_crashes).
    unaccounted: set[str] = field(default_factory=set)
    #: Jobs whose table was found locked, and said so, since their last claim got through.
    locked: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Statements on this run's connection only: a handler's among them tell that it used the database.
        self.executed = StatementCounter(self.connection, self.store)
        self.watchdog = Watchdog(self.store, self.connection.connection.dbapi_connection, self.executed)
        with self.connection.begin():
            self.limits = self.store.transaction_limits(self.connection)
            self.with_suspects = self.store.suspect_jobs(self.connection)
            # Here rather than in a transaction of its own: a run on a database without failures
            # pays one statement for them.
            self.failing = self.store.failing_jobs(self.connection)

    def close(self, ended_well: bool) -> None:
        """Stop watching; a worker that ended well clears its marker, any other leaves it for accounting."""
        self.watchdog.stop()
        self.marker.close(ended_well=ended_well)

    def abort(self) -> None:
        """For a second Ctrl-C, from another thread while this run may be anywhere: cancel the
        statement in flight, so the server ends it, and forget the crash marker, since the chunk
        is rolled back when the process ends (see :mod:`batchjobs.signals`)."""
        # First: a handler whose statement is cancelled below returns, and its chunk must not
        # commit (see chunk()).
        self.aborted.set()
        # The marker is written through its open file: rows written after this go nowhere.
        self.marker.path.unlink(missing_ok=True)
        self.store.cancel_running_statement(self.connection.connection.dbapi_connection, self.executed.in_flight)

    def start_pass(self, jobs: Sequence[FlagJob]) -> None:
        """Before a pass over the jobs (a drain, or given keys): count the crashes left behind,
        then start the pass's clock. A row that fails is not tried again in the same pass, but
        the crashes counted before it run apart in it; a worker's next pass tries failed rows
        again once their backoff is over (held back for the worker's whole life, they would
        wait for its restart)."""
        self.account_crashes(jobs)
        self.run_started = self.clock()

    def account_crashes(self, jobs: Sequence[FlagJob]) -> None:
        """Count the crashes of these jobs that workers on this host which went away left behind
        (see :mod:`batchjobs.crashes`), each marker in a transaction of its own. A job whose
        crashes another run is counting now sits out this pass.

        The count reads the job's table, bounded as a claim is. A job whose count did not get
        through sits out until a later look counts it: claimed in ordinary chunks meanwhile, the
        row that took the worker down would take good rows down with it again. Its marker stays
        until its crashes are committed, so a run that ends first loses none.
        """
        markers, self.unaccounted = take_abandoned(self.store, [job.name for job in jobs], self.registry.jobs)
        for index, marker in enumerate(markers):
            job = self.registry.jobs[marker.job]
            wait = self.claim_wait()
            try:
                with self.connection.begin(), self.watchdog.limit(wait):
                    counted = marker.count(self.store, self.connection, job, self.clock())
            except BaseException as exc:
                marker.put_back()
                try:
                    if not isinstance(exc, DBAPIError):
                        raise
                    self.locked_out(exc, job, wait, "its crashes are counted next time, and its rows wait till then")
                except BaseException:
                    # The run ends here: the markers it took and did not reach go back too.
                    for later in markers[index + 1 :]:
                        later.put_back()
                    raise
                self.unaccounted.add(job.name)
                continue
            marker.drop()
            if counted:
                self.with_suspects.add(job.name)

    def claim_wait(self) -> float:
        """How long a claim may wait for its table: the lock timeout, or what is left of the run."""
        if self.deadline is None:
            return self.lock_timeout
        return max(min(self.lock_timeout, self.deadline - time.monotonic()), 0.0)

    def drain(
        self,
        jobs: Sequence[FlagJob],
        summary: RunSummary,
        batch_size: int | None = None,
        woken: Callable[[], set[str]] | None = None,
        tables: set[str] | None = None,
    ) -> bool:
        """Handle chunks of these jobs until none has a row to claim; False if stopped before.

        Jobs take turns one chunk at a time. Each walks its pending rows, then takes its crash
        suspects one by one. With ``tables``, only the jobs of those tables take turns at
        first. ``woken`` (a worker's) names tables that have new pending rows since it was last
        asked: their jobs join the turns again, so that a job's long backlog never keeps
        another's new row waiting longer than a chunk.
        """
        self.start_pass(jobs)
        jobs = [job for job in jobs if job.name not in self.unaccounted]
        self.forget_stale_failures(jobs)
        by_table: dict[str, list[FlagJob]] = {}
        for job in jobs:
            by_table.setdefault(job.table.name, []).append(job)
        phase = {job.name: "walk" for job in jobs}
        active = [job for job in jobs if tables is None or job.table.name in tables]
        while active and not self.should_stop():
            for job in list(active):
                if self.should_stop():
                    break
                suspects = phase[job.name] == "suspects"
                limit = 1 if suspects else batch_size or job.batch_size
                claimed = self.chunk(job, limit, summary.jobs[job.name], suspects)
                if claimed == _SKIPPED:
                    active.remove(job)
                elif not claimed and (suspects or job.name not in self.with_suspects):
                    active.remove(job)
                elif not claimed:
                    phase[job.name] = "suspects"
            for table in woken() if woken is not None else ():
                for job in by_table.get(table, ()):
                    if job not in active:
                        active.append(job)
                        phase[job.name] = "walk"
        return not active

    def forget_stale_failures(self, jobs: Sequence[FlagJob]) -> None:
        """Before claiming, drop the failure records of these jobs that no longer belong to a row
        (see :func:`batchjobs.failures.forget_stale_failures`); a long-running worker does it at
        most every :data:`FORGET_EVERY` seconds."""
        now = time.monotonic()
        if self.forgot_at is not None and now - self.forgot_at < FORGET_EVERY:
            return
        self.forgot_at = now
        failing, self.failing = self.failing, None
        if failing is not None and not any(job.name in failing for job in jobs):
            return
        if failing is None:
            with self.connection.begin():
                failing = self.store.failing_jobs(self.connection)
        for job in jobs:
            if job.name not in failing:
                continue
            # It reads the job's table: bounded as a claim is, so a migration holding the table
            # costs this check (done again by the next run), not the run.
            wait = self.claim_wait()
            try:
                with self.connection.begin():
                    forget_stale_failures(self.store, self.connection, job, partial(self.watchdog.limit, wait))
            except DBAPIError as exc:
                self.locked_out(exc, job, wait, "its failure records are checked next time")

    def locked_out(self, error: DBAPIError, job: FlagJob, wait: float, consequence: str) -> None:
        """One line for a statement on ``job``'s table that the watchdog cancelled after ``wait``
        seconds; any other error is raised."""
        if not self.watchdog.fired:
            raise error
        # A worker tries again at every pass: one line while the table stays locked, not one a pass.
        if (job.name, consequence) in self.locked:
            return
        self.locked.add((job.name, consequence))
        logger.warning(
            "job %s: its table stayed locked for %s (a migration?); %s",
            job.name,
            format_duration(wait),
            consequence,
            extra={"job": job.name, "outcome": "skipped"},
        )

    def should_stop(self, now: float | None = None) -> bool:
        if self.stop:
            return True
        return self.deadline is not None and (now if now is not None else time.monotonic()) >= self.deadline

    def take(self, job: FlagJob, keys: Sequence[Any], stats: JobStats, batch_size: int | None = None) -> bool:
        """Handle the rows of these primary keys that are claimable, in chunks of at most the
        batch size as :meth:`drain` does; False if stopped before.

        Rows that are not pending (done, gone, not yet committed), held back or locked by another
        run are left alone: they are someone else's work, or none. A chunk that commits early
        leaves the rest claimable, so the next one claims them; each chunk handles at least one row.
        """
        self.start_pass([job])
        if job.name in self.unaccounted:
            return True
        keys = list(dict.fromkeys(keys))
        size = batch_size or job.batch_size
        for start in range(0, len(keys), size):
            part = keys[start : start + size]
            for _ in range(len(part)):
                if self.should_stop():
                    return False
                before = stats.done + stats.failed
                claimed = self.chunk(job, size, stats, keys=part)
                if claimed <= 0 or stats.done + stats.failed - before >= len(part):
                    break
        return True

    def chunk(
        self, job: FlagJob, limit: int, stats: JobStats, suspects: bool = False, keys: Sequence[Any] | None = None
    ) -> int:
        """Claim, handle and commit one chunk; returns how many rows were claimed, or _SKIPPED.

        With ``suspects``, the chunk is one crash suspect (see :mod:`batchjobs.crashes`). With
        ``keys``, the chunk is those of the rows of these primary keys that are claimable. A chunk
        whose transaction the database rolled back to break a deadlock is run again, up to
        DEADLOCK_ATTEMPTS times in all: nothing of it was committed, so its rows are pending and
        unlocked, and running it again is what the next run would do.
        """
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                return self._chunk(job, limit, stats, suspects, keys)
            except DBAPIError as error:
                if attempt == DEADLOCK_ATTEMPTS or not self.store.is_deadlock(error):
                    raise
                logger.warning(
                    "job %s: the database rolled the chunk back to break a deadlock; running it again (%d of %d)",
                    job.name,
                    attempt + 1,
                    DEADLOCK_ATTEMPTS,
                    extra={"job": job.name, "outcome": "deadlock"},
                )
        raise AssertionError("unreachable")

    def _chunk(self, job: FlagJob, limit: int, stats: JobStats, suspects: bool, keys: Sequence[Any] | None) -> int:
        statements = self.statements.get((job.name, limit))
        if statements is None:
            statements = self.statements[job.name, limit] = self.store.chunk_statements(job, limit)
        # Handlers of plain rows that take no ctx have no handle on the chunk's transaction (their
        # rows are tuples, not objects of a session): they get no session at all.
        bare = statements.record is not None and not job.wants_context
        with self._transaction(bare) as (session, connection):
            if self.limits:
                # A handler may take longer than the server lets a transaction idle: the chunk
                # ends within commit_interval plus one handler call, bounded by timeout=.
                self.store.lift_transaction_limits(connection, self.limits)
            now = self.clock()
            after = None if suspects or keys is not None else self.after.get(job.name)
            wait = self.claim_wait()
            try:
                with self.watchdog.limit(wait):
                    claimed, states = statements.claim_rows(
                        connection, session, now, self.run_started, after, suspect=suspects, keys=keys
                    )
                    if not claimed and after is not None:
                        # The walk reached the end. One claim from the start picks up rows it passed
                        # by: locked by another run then, requeued since, or inserted with a lower key.
                        del self.after[job.name]
                        claimed, states = statements.claim_rows(connection, session, now, self.run_started)
            except DBAPIError as exc:
                self.locked_out(exc, job, wait, "skipped in this run")
                return _SKIPPED
            if self.locked:
                self.locked = {said for said in self.locked if said[0] != job.name}
            if not claimed:
                return 0
            # Keys are read before any handler runs: a rolled-back savepoint expires its row.
            pks = {row_key: getattr(row, statements.pk_attr) for row, row_key in claimed}
            attempts = {row_key: count for row_key, (count, _) in states.items()}
            held_back = {row_key for row_key, (_, held) in states.items() if held}
            # Rows held back here stay pending; the commit releases them.
            work = [(row_key, row) for row, row_key in claimed if row_key not in held_back]
            if work:
                self.marker.set(job.name, [key for key, _ in work], now)
            last_reached = claimed[-1][1]
            ctx = None if session is None else JobContext(session=session, job=job, logger=logger.getChild(job.name))
            handler = HandlerCalls(self.store, job, session, connection, self.executed)
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
            if self.aborted.is_set():
                # A second Ctrl-C: the process is ending, and nothing of this chunk may commit.
                threading.Event().wait()
            handler.finish()
            now = self.clock()
            statements.mark_done(connection, [pks[key] for key in done], now)
            self.store.clear_failures(connection, job.name, [key for key in done if key in states])
            self.store.record_failures(connection, job, failures, now)
            (connection if session is None else session).commit()
        # The next chunk continues the walk of the pending index after the rows this one reached
        # rather than from its start, past the entries of every row done since the last vacuum.
        # A short chunk reached the end of the pending rows: the next claim starts over, so rows
        # that became claimable behind the walk (backoff over, requeued) wait no longer.
        if suspects or keys is not None:
            pass  # suspects and given keys are claimed outside the walk
        elif len(claimed) < limit:
            self.after.pop(job.name, None)
        else:
            self.after[job.name] = advance(self.after.get(job.name), pks[last_reached], statements.walk_order)
        # Reported after the commit, so a hook never announces a failure that was not recorded.
        for failure in failures:
            self._report(job, failure)
        stats.done += len(done)
        stats.failed += len(failures)
        if self.raise_errors and failures:
            raise failures[0].error
        return len(claimed)

    @contextmanager
    def _transaction(self, bare: bool) -> Iterator[tuple[ChunkSession | None, Connection]]:
        """The chunk's session and the run's connection; with ``bare``, the connection alone.

        The chunk's transaction is rolled back unless it was committed.
        """
        connection = self.connection
        try:
            if bare:
                connection.begin()
                yield None, connection
            else:
                # A session on a connection outside a transaction begins one and commits it.
                with ChunkSession(connection, expire_on_commit=False, autoflush=False) as session:
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
