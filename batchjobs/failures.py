"""Failures and the retry policy: backoff, dead rows, and the operator's view of them.

A failing row keeps its flag pending; what went wrong is kept in ``batchjobs_failures``, keyed by
(job, row key). The claim query skips rows that are dead or whose next attempt is still in the
future. The run loop writes failure records in the chunk's own transaction, so a crash can
neither record a failure for work that was rolled back nor lose one that was committed.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine

from batchjobs.db import connection_for
from batchjobs.errors import BatchJobsError
from batchjobs.store import Store, store_for
from batchjobs.store.tables import Failure

if TYPE_CHECKING:
    from batchjobs.registry import FlagJob, Registry

#: Tracebacks are cut to their last this-many characters: the end is where the cause is.
TRACEBACK_LIMIT = 20_000


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: ``base * 2**(attempt-1)``, capped, times a random factor.

    With the defaults the waits after failures 1, 2, 3, ... are about 30s, 1m, 2m, 4m, ...,
    capped at 6 hours, each stretched or shrunk by up to 20% so retries of a burst spread out.
    """

    base: float = 30.0
    cap: float = 6 * 3600.0
    jitter: float = 0.2

    def __call__(self, attempt: int) -> float:
        # The exponent is bounded first: 2**1100 would overflow a float long before the cap.
        delay = min(self.cap, self.base * 2.0 ** min(attempt - 1, 60))
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class RowFailure:
    """A handler failure for one row, before it is written down."""

    row_key: str
    attempts_before: int
    error: BaseException
    #: The attempt ended the worker's process or its transaction (see batchjobs.crashes).
    crashed: bool = False

    def wait(self, job: FlagJob) -> timedelta:
        """How long the row waits before its next attempt, by the job's backoff."""
        return timedelta(seconds=job.backoff(self.attempts_before + 1))

    @property
    def error_type(self) -> str:
        cls = type(self.error)
        return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"

    @property
    def message(self) -> str:
        return _storable(str(self.error))[:TRACEBACK_LIMIT]

    @property
    def traceback(self) -> str:
        text = "".join(traceback.format_exception(type(self.error), self.error, self.error.__traceback__))
        return _storable(text)[-TRACEBACK_LIMIT:]


def _storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL; a message that cannot be stored would lose the chunk.
    return text.replace("\x00", "\\x00")


@dataclass(frozen=True)
class FailureInfo:
    """One row of ``batchjobs failures``."""

    job: str
    row_key: str
    attempts: int
    #: Of the attempts, those that ended the worker or its transaction (see batchjobs.crashes).
    crashes: int
    dead: bool
    first_failed_at: datetime
    last_failed_at: datetime
    next_attempt_at: datetime | None
    error_type: str
    error_message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "row_key": self.row_key,
            "attempts": self.attempts,
            "crashes": self.crashes,
            "dead": self.dead,
            "first_failed_at": self.first_failed_at.isoformat(),
            "last_failed_at": self.last_failed_at.isoformat(),
            "next_attempt_at": self.next_attempt_at.isoformat() if self.next_attempt_at else None,
            "error_type": self.error_type,
            "error_message": self.error_message,
        }


@contextmanager
def _failures_of(
    registry: Registry, bind: Engine | Connection, job: str | None
) -> Iterator[tuple[Store, Connection, str | None]]:
    """The Store, a connection, and the job's name: registered, or still named by failure records."""
    with connection_for(bind) as connection:
        store = store_for(connection.engine)
        name = job
        if job is not None and job not in registry.jobs and not store.has_failures(connection, job):
            name = registry.job(job).name  # raises the "unknown job" error
        yield store, connection, name


def forget_stale_failures(
    store: Store, connection: Connection, job: FlagJob, first_read: Callable[[], AbstractContextManager[object]] = nullcontext
) -> int:
    """Delete the job's failure records that no longer belong to a row: their row is gone, done,
    or another row now holds its key (its contents differ from the failed row's). Returns how many.

    A failure state applies only to the row it was recorded for: a deleted row's record would
    otherwise keep counting as failing or dead, and a new row reusing its key (a table recreated,
    SQLite reusing a rowid) would inherit its backoff or death. A row the app changed since it
    failed counts as a new row too: its attempts start over. Runs do this before they claim.
    """
    # The first statement that reads the job's table is the one that may wait for it (a
    # migration holding it); ``first_read`` bounds that wait. The transaction holds the table after.
    with first_read():
        records = store.failure_states_of(connection, job)
    if not records:
        return 0
    live = [key for key, _, _, digest, pending in records if pending and digest is not None]
    digests: dict[str, str] = {}
    for start in range(0, len(live), 500):
        digests.update(store.row_digests(connection, job, live[start : start + 500]))
    stale = [
        (key, attempts, last_failed_at)
        for key, attempts, last_failed_at, digest, pending in records
        if not pending or (digest is not None and digests.get(key) != digest)
    ]
    return store.forget_failures(connection, job.name, stale) if stale else 0


def list_failures(
    registry: Registry,
    bind: Engine | Connection,
    job: str | None = None,
    dead_only: bool = False,
    *,
    limit: int | None = None,
    offset: int = 0,
) -> list[FailureInfo]:
    """Failing and dead rows, oldest failure first, then by row key (as the key's type sorts:
    row 61 before row 101); one job's when ``job`` is given; with ``limit``, that many after the
    first ``offset``. Reads only.

    A registered job's records count only for rows that exist and are its work (pending by its
    flag and ``where=``); records of a job no longer registered are listed as they are.
    """
    with _failures_of(registry, bind, job) as (store, connection, name):
        if name is not None:
            records = _records(registry, store, connection, name, dead_only)
        else:
            records = [f for known in registry.jobs for f in _records(registry, store, connection, known, dead_only)]
            records += [f for f in store.failures(connection, None, dead_only) if f.job not in registry.jobs]
        found = [
            FailureInfo(
                job=f.job,
                row_key=f.row_key,
                attempts=f.attempts,
                crashes=f.crashes,
                dead=f.dead,
                first_failed_at=f.first_failed_at,
                last_failed_at=f.last_failed_at,
                next_attempt_at=f.next_attempt_at,
                error_type=f.error_type,
                error_message=f.error_message,
            )
            for f in records
        ]
    found.sort(key=lambda f: (f.job, f.first_failed_at, _key_order(registry, f.job, f.row_key)))
    return found[offset:] if limit is None else found[offset : offset + limit]


def _records(registry: Registry, store: Store, connection: Connection, name: str, dead_only: bool) -> list[Failure]:
    flag_job = registry.jobs.get(name)
    if flag_job is None:
        return store.failures(connection, name, dead_only)
    return store.job_failures(connection, flag_job, dead_only)


def _key_order(registry: Registry, job: str, row_key: str) -> tuple[int, Any]:
    """Sort key of a row key stored as text: the key's own value for a registered job whose key
    reads back as its type, else the text (after typed keys, so that both never compare)."""
    from batchjobs.registry import parse_key

    flag_job = registry.jobs.get(job)
    if flag_job is not None:
        try:
            return (0, parse_key(flag_job.primary_key, row_key))
        except BatchJobsError:
            pass
    return (1, row_key)


def show_failure(registry: Registry, bind: Engine | Connection, job: str, row_key: str) -> Failure:
    """The full failure record of one row, traceback included. Reads only."""
    with _failures_of(registry, bind, job) as (store, connection, name):
        assert name is not None
        failure = store.failure(connection, name, row_key)
    if failure is None:
        raise BatchJobsError(f"job {name!r} has no failure recorded for row {row_key!r}")
    return failure


def retry(
    registry: Registry,
    engine: Engine,
    job: str,
    row_keys: Sequence[str] = (),
    all_dead: bool = False,
    everything: bool = False,
) -> int:
    """Clear failure records so the rows are claimed on the next run; returns how many. Commits.

    Exactly one selection: ``row_keys``, ``all_dead`` or ``everything``. Naming a row that has no
    failure record is an error and clears nothing.
    """
    if sum((bool(row_keys), all_dead, everything)) != 1:
        raise BatchJobsError("choose exactly one selection: row keys, all dead rows, or every failing row")
    with _failures_of(registry, engine, job) as (store, connection, name):
        assert name is not None
        keys = list(dict.fromkeys(row_keys))
        if keys:
            found = store.failing_keys(connection, name, keys)
            missing = [key for key in keys if key not in found]
            if missing:
                raise BatchJobsError(
                    f"job {name!r} has no failure recorded for row(s) {', '.join(missing)}; nothing retried"
                )
        if name in registry.jobs:
            # Records of rows that are gone or done are no failing rows to retry (nor to count);
            # a row changed since it failed (fixed, say) is tried afresh already.
            forget_stale_failures(store, connection, registry.jobs[name])
        cleared = store.delete_failures(connection, name, keys, dead_only=all_dead)
        connection.commit()
    # Rows named one by one had a record each: whether forgotten above or deleted here, it is cleared.
    return len(keys) if keys else cleared
