"""Flag jobs run by a Celery cluster: Celery's workers, broker, beat and Flower; batchjobs' guarantees.

:func:`install` adds two tasks to the app's Celery app:

- ``batchjobs.sweep(queue=..., job=...)`` is ``run-pending`` inside a Celery worker process, with a
  time budget below its schedule; beat sends one per queue every ``sweep_every`` seconds, as
  cron would run it. Many workers on many hosts sweep the same queue safely (SKIP LOCKED).
- ``batchjobs.run_rows(job=..., keys=[...])`` handles the rows of those primary keys that are
  claimable, through the same claim and chunk as a sweep: the app sends one after a commit that
  made rows pending (see :meth:`CeleryJobs.dispatch_on_commit`), so they are handled in
  milliseconds rather than at the next sweep.

Messages carry no work, only a hint: the row's flag stays the only truth. A message that arrives
before the commit is visible finds no pending row; one delivered twice finds the row done or
locked; one lost (a purge, a broker restart) leaves the row pending for the next sweep. So
neither task uses Celery's retries or late acknowledgement: a failed row is recorded and retried
with the job's backoff, like any other, and a worker killed mid-task leaves its rows pending.

Each task is routed to the Celery queue named as the batchjobs queue of its job, so
``celery -A proj worker -Q mail`` runs the mail jobs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy import Engine, event, inspect
from sqlalchemy.orm import Session

from batchjobs.db import create_engine, resolve_database_url
from batchjobs.errors import BatchJobsError
from batchjobs.registry import FlagJob, Registry
from batchjobs.runner import run_pending, run_rows
from batchjobs.timeutil import MIN_RUNTIME, check_max_runtime

logger = logging.getLogger("batchjobs")

#: Seconds between two sweeps of a queue when ``sweep_every`` is not given (cron's minute).
SWEEP_EVERY = 60.0
#: Keys a session's pending rows are sent per ``run_rows`` message, at most.
KEYS_PER_MESSAGE = 500

# session.info keys: rows flushed as pending in the current transaction, and those committed.
_FLUSHED = "batchjobs_celery_flushed"
_COMMITTED = "batchjobs_celery_committed"


def install(
    app: Celery,
    registry: Registry,
    *,
    engine: Engine | None = None,
    database_url: str | None = None,
    sweep_every: float | None = SWEEP_EVERY,
    sweep_budget: float | None = None,
    queues: Sequence[str] = (),
    batch_size: int | None = None,
    prefix: str = "batchjobs",
    queue_prefix: str = "",
) -> CeleryJobs:
    """Register batchjobs' tasks in ``app``, route them by queue, and schedule the sweeps in beat.

    The database is ``engine`` (disposed of in each forked worker process, as SQLAlchemy asks),
    or one engine per worker process on ``database_url``, $BATCHJOBS_DATABASE_URL, $DATABASE_URL
    or the registry's URL. Beat sweeps each of ``queues`` (default: every queue of the registry)
    every ``sweep_every`` seconds (None: no beat entries), each sweep stopping to take rows after
    ``sweep_budget`` seconds (default: nine tenths of ``sweep_every``, at least 1), so that
    sweeps do not pile up. Task names start with ``prefix``: ``batchjobs.sweep`` and ``batchjobs.run_rows``.
    Each task goes to the Celery queue named ``queue_prefix`` + its batchjobs queue (several apps
    on one broker keep apart with a prefix each).
    """
    if sweep_every is not None and sweep_every <= 0:
        raise BatchJobsError("the sweep interval must be more than 0 seconds, e.g. 60")
    # A run needs a second at least (see check_max_runtime): a schedule shorter than that lets
    # sweeps overlap a little, which SKIP LOCKED makes safe.
    budget = sweep_budget if sweep_budget is not None else max((sweep_every or SWEEP_EVERY) * 0.9, MIN_RUNTIME)
    check_max_runtime(budget, "sweep_budget")
    swept = list(queues) or registry.queues
    registry.select(queues=swept)  # an unknown queue is one clear error, now rather than in beat
    engines = _Engines(registry, engine, database_url)
    installed = CeleryJobs(app, registry, engines, budget, batch_size, prefix, queue_prefix)
    sweeps = {
        f"{prefix}-sweep-{queue}": {
            "task": installed.sweep.name,
            "schedule": float(sweep_every),
            "kwargs": {"queue": queue},
            # A sweep that waited longer than the interval is stale: the next one is on its way.
            # No queue here: the router (or a route of the app's) chooses it, as for every send.
            "options": {"expires": float(sweep_every)},
        }
        for queue in swept
        if sweep_every is not None
    }

    def configure(**_: Any) -> None:
        # An entry or route of the app's own comes first: it wins.
        app.conf.beat_schedule = {**sweeps, **(app.conf.beat_schedule or {})}
        routes = app.conf.task_routes
        existing = [] if routes is None else list(routes) if isinstance(routes, (list, tuple)) else [routes]
        if installed.route not in existing:
            app.conf.task_routes = [*existing, installed.route]

    # Celery reads its configuration again after config_from_object(), so the entries are added
    # each time it does, not only now.
    app.on_after_configure.connect(configure, weak=False)
    if app.configured:
        configure()
    return installed


class _Engines:
    """The engine of the current process: a forked worker process must not share its parent's connections."""

    def __init__(self, registry: Registry, engine: Engine | None, database_url: str | None) -> None:
        self.registry = registry
        self.given = engine
        self.url = database_url
        self.lock = threading.Lock()
        self.engine: Engine | None = engine
        self.pid = os.getpid()

    def get(self) -> Engine:
        with self.lock:
            if self.engine is not None and self.pid != os.getpid():
                # Inherited through fork: forget the parent's pooled connections without closing
                # them (they are the parent's); an engine batchjobs made is made anew.
                self.engine.dispose(close=False)
                self.engine = self.given
            if self.engine is None:
                self.engine = create_engine(resolve_database_url(self.url, self.registry.database_url))
            self.pid = os.getpid()
            return self.engine


class CeleryJobs:
    """batchjobs' tasks in one Celery app: what :func:`install` returns."""

    def __init__(
        self,
        app: Celery,
        registry: Registry,
        engines: _Engines,
        budget: float,
        batch_size: int | None,
        prefix: str,
        queue_prefix: str,
    ) -> None:
        self.app = app
        self.queue_prefix = queue_prefix
        self.registry = registry
        self.engines = engines
        self.budget = budget
        self.batch_size = batch_size

        # Plain functions with the task first: Celery checks the arguments against their signature.
        def sweep(task: Any, queue: str | None = None, job: str | None = None) -> dict[str, Any]:
            """Run pending rows of one queue (or job, or all jobs) for at most the sweep budget."""
            return self._sweep(task, queue, job)

        def run_rows(task: Any, job: str, keys: Sequence[Any]) -> dict[str, Any]:
            """Handle these rows of ``job`` that are pending and free; the others are someone else's, or done."""
            return self._run_rows(task, job, keys)

        self.sweep = app.task(name=f"{prefix}.sweep", bind=True, shared=False)(sweep)
        self.run_rows = app.task(name=f"{prefix}.run_rows", bind=True, shared=False)(run_rows)

    def queue(self, job: str) -> str:
        """The Celery queue of a job's tasks."""
        return self.queue_prefix + self.registry.job(job).queue

    def engine(self) -> Engine:
        """The engine tasks use in this process."""
        return self.engines.get()

    # -- the tasks ----------------------------------------------------------------------------------

    def _sweep(self, task: Any, queue: str | None, job: str | None) -> dict[str, Any]:
        summary = run_pending(
            self.registry,
            self.engine(),
            queues=[queue] if queue else (),
            jobs=[job] if job else (),
            max_runtime=self.budget,
            batch_size=self.batch_size,
            raise_errors=self._propagates(task),
        )
        if summary.done or summary.failed:
            logger.info("%s", summary.line())
        return summary.as_json()

    def _run_rows(self, task: Any, job: str, keys: Sequence[Any]) -> dict[str, Any]:
        summary = run_rows(
            self.registry, self.engine(), job, keys, batch_size=self.batch_size, raise_errors=self._propagates(task)
        )
        return summary.as_json()

    def _propagates(self, task: Any) -> bool:
        # Eager mode with task_eager_propagates: a handler's exception reaches the test, as the
        # exception of any eager task does (its failure is recorded first).
        return bool(task.request.is_eager and self.app.conf.task_eager_propagates)

    def route(
        self, name: str, args: Sequence[Any] | None, kwargs: dict[str, Any] | None, options: Any, task: Any = None, **_: Any
    ) -> Any:
        """Celery router: each task goes to the Celery queue named as its batchjobs queue."""
        args, kwargs = args or (), kwargs or {}
        if name == self.sweep.name:
            queue = kwargs.get("queue") or (args[0] if args else None)
            job = kwargs.get("job") or (args[1] if len(args) > 1 else None)
            if queue:
                return {"queue": self.queue_prefix + queue}
            return {"queue": self.queue(job)} if job in self.registry.jobs else None
        if name == self.run_rows.name:
            job = kwargs.get("job") or (args[0] if args else None)
            return {"queue": self.queue(job)} if job in self.registry.jobs else None
        return None

    # -- dispatch -----------------------------------------------------------------------------------

    def dispatch(self, job: str, keys: Sequence[Any]) -> None:
        """Send ``run_rows`` for these primary keys of ``job``, in messages of at most KEYS_PER_MESSAGE keys.

        Call it after the commit that made the rows pending. Sending is a hint: a message that is
        lost leaves the rows to the next sweep, so a broker that cannot be reached is one warning
        line, not an error (except in eager mode, where the tasks run here and now).
        """
        self.registry.job(job)  # an unknown job is one clear error
        values = [str(key) if not isinstance(key, (int, str)) else key for key in keys]
        for start in range(0, len(values), KEYS_PER_MESSAGE):
            batch = values[start : start + KEYS_PER_MESSAGE]
            if self.app.conf.task_always_eager:
                self.run_rows.apply_async(kwargs={"job": job, "keys": batch})
                continue
            try:
                self.run_rows.apply_async(kwargs={"job": job, "keys": batch})
            except Exception as error:  # noqa: BLE001 - the rows stay pending; the sweep takes them
                logger.warning(
                    "job %s: could not send %d row(s) to Celery (%s: %s); the next sweep handles them",
                    job,
                    len(batch),
                    type(error).__name__,
                    error,
                )
                return

    def dispatch_on_commit(self, target: Any) -> None:
        """After each commit of ``target`` (a Session, a sessionmaker, or the Session class) that
        inserted rows of a job's table through the ORM, or set their flag back to pending, send
        those rows' keys to ``run_rows``.

        Rows written with Core statements (``session.execute(insert(...))``, bulk inserts) are not
        seen here: the sweep handles them. A rolled-back transaction sends nothing.
        """
        by_table: dict[Any, list[FlagJob]] = {}
        for job in self.registry.jobs.values():
            by_table.setdefault(job.table, []).append(job)

        def after_flush(session: Session, _context: Any) -> None:
            flushed: dict[str, set[Any]] = session.info.setdefault(_FLUSHED, {})
            for obj in [*session.new, *session.dirty]:
                state = inspect(obj)
                for job in by_table.get(state.mapper.local_table, ()):
                    if _became_pending(state, job, obj in session.new):
                        key = state.dict.get(job.primary_key_attr)
                        if key is not None:
                            flushed.setdefault(job.name, set()).add(key)

        def after_commit(session: Session) -> None:
            committed: dict[str, set[Any]] = session.info.setdefault(_COMMITTED, {})
            for name, keys in session.info.pop(_FLUSHED, {}).items():
                committed.setdefault(name, set()).update(keys)

        def after_soft_rollback(session: Session, previous: Any) -> None:
            # A savepoint's rollback keeps the keys: its rows are not pending, and run_rows sees that.
            if previous.parent is None:
                session.info.pop(_FLUSHED, None)

        def after_transaction_end(session: Session, transaction: Any) -> None:
            # Sent once the transaction is closed, so that the session stays usable if an eager
            # task raises; only at the outermost transaction's end, not a savepoint's.
            if transaction.parent is None and _COMMITTED in session.info:
                for name, keys in sorted(session.info.pop(_COMMITTED).items()):
                    self.dispatch(name, sorted(keys, key=str))

        for name, listener in (
            ("after_flush", after_flush),
            ("after_commit", after_commit),
            ("after_soft_rollback", after_soft_rollback),
            ("after_transaction_end", after_transaction_end),
        ):
            event.listen(target, name, listener)


def _became_pending(state: Any, job: FlagJob, new: bool) -> bool:
    """Whether this flush made the object's row pending for ``job``: inserted with its flag left to
    the (pending) default or set pending, or its flag set back to pending."""
    attribute = state.mapper.get_property_by_column(job.flag).key
    history = state.attrs[attribute].history
    if new and not history.added:
        return True  # the column's default: pending
    return bool(history.added) and history.added[-1] in (False, None)
