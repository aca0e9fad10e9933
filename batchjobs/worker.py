"""`batchjobs worker`: the same flag jobs, picked up as soon as a row becomes pending.

A worker drains what is pending, then waits, and drains again when woken. On PostgreSQL a
trigger on each job's table (see :meth:`batchjobs.store.Store.pending_trigger_sql`) notifies a
channel the worker LISTENs on, so a row is picked up milliseconds after the app's COMMIT; a
backstop poll (every 30 s) catches rows that become claimable by time alone (a backoff ending)
and any notification missed. Elsewhere, and for tables without the trigger, the worker polls
(every second by default). Between polls an idle worker sends no query.

The claim is run-pending's, so workers run beside cron runs and other workers on other hosts
safely. A lost connection (a server restart, a network drop) is one line in the log; the worker
reconnects with a capped backoff, listens again and drains once before it waits again, since
notifications sent meanwhile are lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Boolean, Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from batchjobs.db import ensure_schema, first_line
from batchjobs.errors import BatchJobsError
from batchjobs.history import record_run
from batchjobs.registry import FlagJob, Registry
from batchjobs.runner import running
from batchjobs.signals import StopRequest
from batchjobs.store import Store, store_for
from batchjobs.store.base import Listener
from batchjobs.summary import JobStats, RunSummary
from batchjobs.timeutil import check_seconds, format_duration, utcnow

logger = logging.getLogger("batchjobs")

#: Seconds between polls where nothing notifies: other databases, tables without the trigger.
POLL_EVERY = 1.0
#: Seconds between polls on PostgreSQL with triggers: rows claimable by time, missed notifications.
BACKSTOP_EVERY = 30.0
#: The longest wait between two attempts to reconnect.
RECONNECT_AT_MOST = 30.0
#: Waits are cut into slices this long, so that a stop request is seen within one.
SLICE = 0.5
#: How long a new listener waits for its own notification before it takes notifications for lost.
HEARD_WITHIN = 3.0


def run_worker(
    registry: Registry,
    engine: Engine,
    *,
    jobs: Sequence[str] = (),
    queues: Sequence[str] = (),
    batch_size: int | None = None,
    commit_interval: float = 1.0,
    lock_timeout: float = 5.0,
    max_runtime: float | None = None,
    max_rows: int | None = None,
    poll_every: float = POLL_EVERY,
    backstop_every: float = BACKSTOP_EVERY,
    stop: StopRequest | None = None,
    clock: Callable[[], datetime] = utcnow,
    record: bool = True,
) -> RunSummary:
    """Handle the selected jobs' rows as they become pending, until ``stop`` is set, or
    ``max_runtime`` seconds or ``max_rows`` rows are reached (to recycle the process).

    Each chunk commits on its own. With ``record`` the worker is one entry in the run history,
    of kind "worker", with a heartbeat: `status` lists it, and `check --min-workers` counts it.
    """
    selected = registry.select(jobs=jobs, queues=queues)
    for value, what in ((poll_every, "poll interval"), (backstop_every, "backstop interval"), (lock_timeout, "lock timeout")):
        check_seconds(value, what, "1s")
    if max_rows is not None and max_rows < 1:
        raise BatchJobsError(f"max rows must be at least 1, got {max_rows}")
    store = store_for(engine)
    ensure_schema(store.engine)
    started = time.monotonic()
    summary = RunSummary(jobs={job.name: JobStats() for job in selected})
    worker = _Worker(
        registry=registry,
        store=store,
        jobs=selected,
        summary=summary,
        stop=stop if stop is not None else StopRequest(),
        deadline=started + max_runtime if max_runtime is not None else None,
        max_rows=max_rows,
        clock=clock,
        batch_size=batch_size,
        commit_interval=commit_interval,
        lock_timeout=lock_timeout,
        poll_every=poll_every,
        backstop_every=backstop_every,
    )
    with record_run(
        store, summary, queues, clock, keep_for=registry.keep_history, record=record, kind="worker", backlog=selected
    ) as recorder:
        if recorder is not None:
            recorder.quiet_when_idle = True
        worker.run()
        summary.seconds = time.monotonic() - started
        summary.stopped_by = worker.stop.reason
    return summary


@dataclass
class _Worker:
    """One worker's loop: connect and listen, drain, wait, drain; again after an outage."""

    registry: Registry
    store: Store
    jobs: list[FlagJob]
    summary: RunSummary
    stop: StopRequest
    deadline: float | None
    max_rows: int | None
    clock: Callable[[], datetime]
    batch_size: int | None
    commit_interval: float
    lock_timeout: float
    poll_every: float
    backstop_every: float
    #: Jobs already warned about (once per worker) for a table without the trigger.
    warned: set[str] = field(default_factory=set)
    #: Set while the database is away: one line when it goes, one when it is back.
    down: bool = False
    backoff: float = 1.0

    def done(self) -> bool:
        """Stopped, out of time, or out of rows; sets the reason on the stop request."""
        if not self.stop and self.deadline is not None and time.monotonic() >= self.deadline:
            self.stop.set("max-runtime")
        if not self.stop and self.max_rows is not None and self.summary.done + self.summary.failed >= self.max_rows:
            self.stop.set("max-rows")
        return bool(self.stop)

    def run(self) -> None:
        while not self.done():
            try:
                self.serve()
            except DBAPIError as error:
                if not self.lost(error):
                    raise
                if not self.down:
                    line = first_line(error, self.store.engine.url)
                    logger.warning("worker lost its database connection: %s; reconnecting", line)
                    self.down = True
                self.sleep(self.backoff)
                self.backoff = min(self.backoff * 2, RECONNECT_AT_MOST)

    def serve(self) -> None:
        """Listen, drain once, then wait and drain until done; raises when the database goes away."""
        listener = self.store.listener()
        try:
            if listener is not None and not listener.hears_itself(HEARD_WITHIN):
                listener.close()
                listener = None
                if "notifications" not in self.warned:
                    self.warned.add("notifications")
                    logger.warning(
                        "notifications do not reach this worker (a pooler in transaction mode between it and "
                        "PostgreSQL? LISTEN needs a direct or session-pooled connection); it polls every %s instead",
                        format_duration(self.poll_every),
                    )
            with self.store.engine.connect() as connection:
                polled = [job for job in self.jobs if not self._triggered(connection, job, listener)]
            with running(
                self.registry, self.store, self.commit_interval, self.lock_timeout, self.stop, self.deadline, self.clock
            ) as run:
                if self.down:
                    logger.warning("worker reconnected")
                    self.down, self.backoff = False, 1.0
                woken = listener.poll if listener is not None else None
                # Notifications sent while nobody listened are lost: drain once before waiting.
                run.drain(self.jobs, self.summary, self.batch_size, woken)
                while not self.done():
                    tables = self.wait(listener, polled)
                    if not self.done():
                        run.drain(self.jobs, self.summary, self.batch_size, woken, tables or None)
        finally:
            if listener is not None:
                listener.close()

    def _triggered(self, connection: Connection, job: FlagJob, listener: Listener | None) -> bool:
        if listener is None:
            return False
        if self.store.has_pending_trigger(connection, job.table.name, job.flag.name):
            return True
        if job.name not in self.warned:
            self.warned.add(job.name)
            logger.warning(
                "job %s: table %s has no pending trigger, so it is polled every %s "
                "(install it with `batchjobs triggers --apply` or batchjobs.alembic.add_pending_trigger)",
                job.name,
                job.table.name,
                format_duration(self.poll_every),
            )
        return False

    def wait(self, listener: Listener | None, polled: list[FlagJob]) -> set[str]:
        """Wait for a notification or the next poll; the tables notified (empty: poll them all)."""
        every = self.poll_every if listener is None or polled else self.backstop_every
        until = time.monotonic() + every
        if self.deadline is not None:
            until = min(until, self.deadline)
        while not self.done():
            left = until - time.monotonic()
            if left <= 0:
                return set()
            if listener is None:
                time.sleep(min(left, SLICE))
                continue
            tables = listener.wait(min(left, SLICE))
            if tables:
                return tables
        return set()

    def lost(self, error: DBAPIError) -> bool:
        """Whether the error means the database went away (worth reconnecting), not a bug."""
        if error.connection_invalidated:
            return True
        # SQLite and MySQL call a table or column the schema lacks operational too: deployed
        # before its migration, a worker would reconnect forever.
        return isinstance(error, OperationalError) and not self.store.is_schema_error(error)

    def sleep(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        while not self.done() and time.monotonic() < until:
            time.sleep(min(SLICE, max(until - time.monotonic(), 0.0)))


def trigger_sql(registry: Registry, engine: Engine, *, drop: bool = False) -> list[str]:
    """The DDL that installs (or with ``drop``, removes) the pending triggers of every job's
    table; empty for a database that has no notifications."""
    store = store_for(engine)
    statements: list[str] = []
    seen: set[tuple[str, str]] = set()
    for job in registry.jobs.values():
        key = (job.table.name, job.flag.name)
        if key in seen:
            continue
        seen.add(key)
        if drop:
            statements += store.drop_pending_trigger_sql(*key)
        else:
            statements += store.pending_trigger_sql(*key, boolean=isinstance(job.flag.type, Boolean))
    # The shared function is created once, before the first trigger that uses it.
    return list(dict.fromkeys(statements))
