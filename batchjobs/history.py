"""Run history: a row per `run-pending` invocation, kept fresh by a heartbeat while it runs.

Every write here is a short transaction of its own on its own connection, never part of a
chunk, so history can neither block nor be rolled back with the work. A heartbeat thread
updates the row every few seconds, even while a slow handler runs; a row whose heartbeat is
older than :data:`STALE_AFTER` and that never finished belongs to a crashed run.

History must never be what takes a run down, nor what hides why it went down: a heartbeat that
fails is logged once per outage and retried (each attempt bounded), and when a run that failed
cannot record its end either, its own error is the one raised; the next run on the same host
records it as failed once the database answers again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from batchjobs.db import first_line
from batchjobs.errors import BatchJobsError
from batchjobs.signals import on_abort
from batchjobs.store import Store
from batchjobs.store.tables import RunRecord
from batchjobs.summary import RunSummary
from batchjobs.timeutil import format_duration, parse_duration

if TYPE_CHECKING:
    from batchjobs.registry import FlagJob

logger = logging.getLogger("batchjobs")

HEARTBEAT_EVERY = 5.0
#: Seconds between heartbeats instead of :data:`HEARTBEAT_EVERY` (any duration, e.g. ``500ms``).
HEARTBEAT_ENV = "BATCHJOBS_HEARTBEAT_EVERY"
#: A run that has not beaten for this long, and never finished, is taken as crashed.
STALE_AFTER = timedelta(seconds=60)
#: How often a worker that waits for rows beats, while its counts do not move: twice per
#: STALE_AFTER, so that one lost beat never shows a live worker as crashed.
IDLE_BEAT_EVERY = STALE_AFTER / 2
#: The least a heartbeat write is waited for before it counts as failed (see RunRecorder.beat_timeout).
MIN_BEAT_TIMEOUT = 2.0
#: How far back a starting run looks for runs of its host that ended without recording their end.
ORPHANS_WITHIN = timedelta(hours=1)
#: How often pending rows are counted into the backlog history (the web page's 24-hour chart): by
#: the first run to end after this long, and by long-running runs and workers as they beat.
BACKLOG_EVERY = timedelta(minutes=5)
#: How long counting may wait for a table (a migration holds it) before it is cancelled and that
#: sample skipped: a sample is worth less than the run's own work.
BACKLOG_LOCK_WAIT = 1.0

# Runs open in this process, by (database, run id): a run recorded with this process's pid that is
# not among them ended here without recording its end.
_open_here: set[tuple[str, Any]] = set()

# Attributes set on the error that ends a run (see partial_summary and unrecorded_end).
_SUMMARY = "_batchjobs_summary"
_UNRECORDED = "_batchjobs_unrecorded_end"


def outcome_of(run: RunRecord, now: datetime) -> str:
    """finished, max-runtime, interrupted or failed once done; running or crashed before."""
    if run.outcome is not None:
        return run.outcome
    return "crashed" if now - run.heartbeat_at > STALE_AFTER else "running"


def heartbeat_interval() -> float:
    """Seconds between heartbeats: $BATCHJOBS_HEARTBEAT_EVERY, else :data:`HEARTBEAT_EVERY`."""
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return HEARTBEAT_EVERY
    try:
        seconds = parse_duration(raw)
    except BatchJobsError as exc:
        raise BatchJobsError(f"{HEARTBEAT_ENV}: {exc}") from None
    if not 0 < seconds < STALE_AFTER.total_seconds():
        # A heartbeat as slow as the staleness limit would show a live run as crashed.
        raise BatchJobsError(
            f"{HEARTBEAT_ENV}: {raw!r} must be more than 0 and less than {format_duration(STALE_AFTER.total_seconds())}"
        )
    return seconds


def error_line(error: BaseException, url: URL | None = None) -> str:
    """An error as the CLI prints it after ``Error:``: one line, never with a password in it."""
    if isinstance(error, DBAPIError):
        return f"database error: {first_line(error, url)}"
    if isinstance(error, BatchJobsError):
        return str(error)
    return f"{type(error).__name__}: {_first_line(error, url)}"


def partial_summary(error: BaseException) -> RunSummary | None:
    """What the run that ``error`` ended had committed until then, if a run ended with it."""
    found = getattr(error, _SUMMARY, None)
    return found if isinstance(found, RunSummary) else None


def unrecorded_end(error: BaseException) -> str | None:
    """The line saying that the run ``error`` ended could not record its end, if it could not."""
    found = getattr(error, _UNRECORDED, None)
    return found if isinstance(found, str) else None


def _first_line(error: BaseException, url: URL | None) -> str:
    if isinstance(error, DBAPIError):
        return first_line(error, url)
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else type(error).__name__
    if url is not None and url.password:
        message = message.replace(str(url.password), "***")
    return message


def _attach(error: BaseException, name: str, value: object) -> None:
    try:
        setattr(error, name, value)
    except (AttributeError, TypeError):  # an exception type that takes no attributes: nothing to carry
        pass


def _progress(summary: RunSummary) -> dict[str, object]:
    return {"rows_done": summary.done, "rows_failed": summary.failed, "job_stats": json.dumps(summary.per_job())}


def process_exists(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


class _NoAnswer(Exception):
    """A history write that did not come back within its bound."""


class _Write:
    """One history write on a thread of its own, so that waiting for it can be bounded.

    A thread stuck in a driver call cannot be interrupted; it is left to finish (daemon, so it
    never holds up the process's exit) and no other write starts while it is in flight.
    """

    def __init__(self, action: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(action,), name="batchjobs-history-write", daemon=True)
        self._thread.start()

    def _run(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - reported by whoever waits for the write
            self.error = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, seconds: float) -> bool:
        return self._done.wait(seconds)


class RunRecorder:
    """Keeps one run's row in ``batchjobs_runs``: opened at the start, beaten, closed at the end."""

    def __init__(
        self,
        store: Store,
        summary: RunSummary,
        queues: Sequence[str],
        clock: Callable[[], datetime],
        keep_for: timedelta = timedelta(days=7),
        heartbeat_every: float | None = None,
        kind: str = "run",
        backlog: Sequence[FlagJob] = (),
    ) -> None:
        self.kind = kind
        #: The jobs whose pending rows this run counts into the backlog history.
        self.backlog = backlog
        self._next_sample: datetime | None = None
        self.store = store
        self.summary = summary
        self.queues = queues
        self.clock = clock
        self.keep_for = keep_for
        self.heartbeat_every = heartbeat_every if heartbeat_every is not None else heartbeat_interval()
        #: How long a heartbeat write may take before it counts as failed; a write that hangs
        #: (a lock, a server that stopped answering) must not silence the heartbeat for good.
        self.beat_timeout = max(2 * self.heartbeat_every, MIN_BEAT_TIMEOUT)
        self.run_id: Any = None
        self._stopped = threading.Event()
        self._heart: threading.Thread | None = None
        self._in_flight: _Write | None = None
        self._failing = False
        #: Set for a worker: it beats when its counts moved, otherwise every IDLE_BEAT_EVERY only.
        self.quiet_when_idle = False
        #: The counts the last saved beat wrote, and when it was taken.
        self._beaten: dict[str, object] = {}
        self._beaten_at: datetime | None = None

    @property
    def _key(self) -> tuple[str, Any]:
        return (str(self.store.engine.url), self.run_id)

    def open(self) -> None:
        """Prune runs older than ``keep_for``, record this one as running, and close this host's
        runs that ended without recording their end."""
        now = self.clock()
        host = socket.gethostname()
        values = {
            "host": host,
            "pid": os.getpid(),
            "jobs": ",".join(self.summary.jobs),
            "queues": ",".join(self.queues),
            "kind": self.kind,
            "started_at": now,
            "heartbeat_at": now,
            **_progress(self.summary),
        }
        with self.store.engine.begin() as connection:
            self.run_id = self.store.open_run(connection, values, prune_before=now - self.keep_for)
            closed = self._close_orphans(connection, now, host)
        _open_here.add(self._key)
        self._beaten, self._beaten_at = _progress(self.summary), now
        self._next_sample = now + BACKLOG_EVERY
        for run_id, pid in closed:
            logger.warning(
                "run %s (pid %d) ended without recording its end (its process is gone); recorded as failed", run_id, pid
            )

    def _due_samples(self, connection: Connection, now: datetime) -> list[FlagJob]:
        """The jobs whose pending rows no run counted in the last :data:`BACKLOG_EVERY`.

        Per job: runs of different queues each keep their own jobs' history going.
        """
        recent = self.store.sampled_jobs(connection, now - BACKLOG_EVERY) if self.backlog else set()
        return [job for job in self.backlog if job.name not in recent]

    def _sample_backlog(self, due: Sequence[FlagJob] | None = None) -> None:
        """Count the ``due`` jobs' pending rows (by default, those :meth:`_due_samples` names) into
        the backlog history.

        In a transaction of its own, cancelled after :data:`BACKLOG_LOCK_WAIT` if a table keeps it
        waiting (a migration): a sample is worth less than the run, so one that fails is skipped
        with a line.
        """
        from batchjobs.savepoints import StatementCounter
        from batchjobs.watchdog import Watchdog

        now = self.clock()
        self._next_sample = now + BACKLOG_EVERY
        try:
            # A writing transaction from its start (SQLite: BEGIN IMMEDIATE), so that it waits its
            # turn behind a chunk rather than failing to upgrade from reading to writing.
            with self.store.claiming_connection() as connection:
                # As for claims: a count still waiting for its table after the limit is cancelled,
                # whatever lock it waits for (MySQL's metadata locks know no lock timeout).
                watchdog = Watchdog(self.store, connection.connection.dbapi_connection, StatementCounter(connection, self.store))
                try:
                    with connection.begin():
                        jobs = self._due_samples(connection, now) if due is None else due
                        if jobs:
                            with watchdog.limit(BACKLOG_LOCK_WAIT):
                                self.store.record_backlog(connection, jobs, now, prune_before=now - self.keep_for)
                finally:
                    watchdog.stop()
        except Exception as exc:  # noqa: BLE001 - history must never be what takes a run down
            logger.warning("backlog history: pending rows not counted this time: %s", _first_line(exc, self.store.engine.url))

    def _close_orphans(self, connection: Connection, now: datetime, host: str) -> list[tuple[int, int]]:
        # Only this host's runs: elsewhere, whether a pid is alive cannot be known, and a stale
        # heartbeat tells that such a run crashed. The quiet period keeps a live run of another pid
        # namespace with the same host name (containers) from being closed between its beats.
        quiet_since = now - timedelta(seconds=3 * self.heartbeat_every)
        closed = []
        for run_id, pid, last_beat in self.store.unfinished_runs(connection, host, now - ORPHANS_WITHIN, quiet_since):
            if run_id == self.run_id:
                continue
            if pid == os.getpid():
                if (str(self.store.engine.url), run_id) in _open_here:
                    continue
            elif process_exists(pid):
                continue
            # Its last heartbeat is the last moment it was known to be running.
            self.store.save_run(connection, run_id, {"outcome": "failed", "finished_at": last_beat})
            closed.append((run_id, pid))
        return closed

    def start_heartbeat(self) -> None:
        """Refresh the row every few seconds from a thread, even while a slow handler runs."""
        self._heart = threading.Thread(target=self._beat, name="batchjobs-heartbeat", daemon=True)
        self._heart.start()

    def _beat(self) -> None:
        sampling: _Write | None = None
        while not self._stopped.wait(self.heartbeat_every):
            due = self._next_sample is not None and self.clock() >= self._next_sample
            if self.backlog and due and (sampling is None or sampling.done):
                # A worker runs for days (and a run may last long): every few minutes, beside its work.
                sampling = _Write(self._sample_backlog)
                sampling.wait(self.beat_timeout)
            if not self._failing and not self._moved():
                continue
            error = self._attempt()
            if error is None:
                if self._failing:
                    logger.warning("run history heartbeat restored")
                    self._failing = False
            elif not self._failing:
                # Once per outage, not once per attempt: a down database would flood the log.
                url = self.store.engine.url
                logger.warning("run history heartbeat failed: %s; retrying", _first_line(error, url))
                self._failing = True

    def _moved(self) -> bool:
        """Whether a beat is due: always for a run, and for a worker once its counts moved or its
        last beat is getting old, so that an idle worker writes twice a minute instead of every
        few seconds. Its polls of empty tables are no progress; nor is a handler that takes long,
        which the twice-a-minute beat keeps among the living all the same."""
        if not self.quiet_when_idle or self._beaten_at is None or _progress(self.summary) != self._beaten:
            return True
        return self.clock() - self._beaten_at >= max(IDLE_BEAT_EVERY, timedelta(seconds=self.heartbeat_every))

    def _attempt(self) -> BaseException | None:
        """One heartbeat write, waited for at most ``beat_timeout``: None once it is saved."""
        if self._in_flight is None or self._in_flight.done:
            now = self.clock()
            progress = _progress(self.summary)
            values: dict[str, object] = {"heartbeat_at": now, **progress}

            def save() -> None:
                self._save(values)
                self._beaten, self._beaten_at = progress, now

            self._in_flight = _Write(save)
        write = self._in_flight
        if not write.wait(self.beat_timeout):
            return _NoAnswer(f"no answer from the database within {format_duration(self.beat_timeout)}")
        # A connection the server ended is discarded by SQLAlchemy when it fails: the next
        # attempt gets a fresh one from the pool.
        return write.error

    def close(self, outcome: str) -> None:
        """Stop the heartbeat and record how the run ended, with its final counts."""
        self._stopped.set()
        try:
            if self._heart is not None:
                # Bounded: the heartbeat waits at most beat_timeout for its write.
                self._heart.join()
            if self._in_flight is not None:
                # A beat landing after the end would overwrite the final counts with older ones.
                self._in_flight.wait(self.beat_timeout)
            now = self.clock()
            # A run that failed may have lost its database: it records its end and nothing more.
            sample = bool(self.backlog) and outcome != "failed"
            values = {"heartbeat_at": now, "finished_at": now, "outcome": outcome, **_progress(self.summary)}
            if outcome not in ("interrupted", "failed"):
                due = self._save(values, sample=sample)
            else:
                # Bounded as a beat is: a process told to stop, or failing, must end, even on a
                # server that stopped answering. A run that went well waits, as its chunks did,
                # rather than call a slow write (SQLite's lock held by another writer) a failure.
                def end_of_run() -> None:
                    self._save(values)

                end = _Write(end_of_run)
                if not end.wait(self.beat_timeout):
                    raise _NoAnswer(f"no answer from the database within {format_duration(self.beat_timeout)}")
                if end.error is not None:
                    # Failed at once, not hung: made here, for an engine whose connections stay in
                    # the thread that made them (SQLite's default).
                    self._save(values)
                due = []
        finally:
            _open_here.discard(self._key)
        if due:
            # After the run's work, so that counting never waits beside it: the backlog it leaves.
            self._sample_backlog(due)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Record how the block ends: as the summary says, or failed if it raises.

        The error that ends the run is the one raised, carrying the run's counts so far (see
        :func:`partial_summary`). If the end cannot be recorded after such an error, that is
        said on the error (see :func:`unrecorded_end`), and the next run on this host records
        the run as failed; if it cannot be recorded after a run that went well, that is the error.
        """
        try:
            with counted(self.summary), on_abort(self._aborted):
                yield
        except BaseException as error:
            try:
                self.close("failed")
            except Exception as unrecorded:  # noqa: BLE001 - the run's own error must win
                _attach(error, _UNRECORDED, self._unrecorded(unrecorded))
            raise
        try:
            self.close(self.summary.outcome)
        except Exception as unrecorded:
            failure = RunEndNotRecorded(self._unrecorded(unrecorded))
            _attach(failure, _SUMMARY, self.summary)
            raise failure from None

    def _aborted(self) -> None:
        """A second Ctrl-C ends the process: record the run as interrupted, if the database
        answers within a beat's bound (else the next run on this host records it as failed)."""
        self._stopped.set()
        now = self.clock()
        values: dict[str, object] = {"heartbeat_at": now, "finished_at": now, "outcome": "interrupted", **_progress(self.summary)}

        def save() -> None:
            self._save(values)

        _Write(save).wait(min(self.beat_timeout, 1.0))

    def _unrecorded(self, error: BaseException) -> str:
        return (
            f"could not record the end of run {self.run_id} in the run history: "
            f"{_first_line(error, self.store.engine.url)}; the next run on this host records it as failed"
        )

    def _save(self, values: dict[str, object], sample: bool = False) -> list[FlagJob]:
        """Write the run's row; with ``sample``, return the jobs due for a backlog sample."""
        with self.store.engine.begin() as connection:
            self.store.save_run(connection, self.run_id, values)
            return self._due_samples(connection, self.clock()) if sample else []


class RunEndNotRecorded(BatchJobsError):
    """A run went well, but the database did not take the record of its end."""


@contextmanager
def counted(summary: RunSummary) -> Iterator[None]:
    """Let an error that ends a run carry what the run had committed (see :func:`partial_summary`)."""
    started = time.monotonic()
    try:
        yield
    except BaseException as error:
        if not summary.seconds:
            summary.seconds = time.monotonic() - started
        _attach(error, _SUMMARY, summary)
        raise


@contextmanager
def record_run(
    store: Store,
    summary: RunSummary,
    queues: Sequence[str],
    clock: Callable[[], datetime],
    keep_for: timedelta = timedelta(days=7),
    record: bool = True,
    kind: str = "run",
    backlog: Sequence[FlagJob] = (),
) -> Iterator[RunRecorder | None]:
    """Record the run whose counts ``summary`` collects, from start to finish; yields the recorder.

    If the block raises, the run is recorded as failed (see :meth:`RunRecorder.running`); SIGKILL
    leaves it unfinished, and its stale heartbeat tells the rest. Without ``record`` (a worker of
    a run recorded elsewhere) nothing is written and None is yielded, but an error that ends the
    run still carries its counts. The ``backlog`` jobs' pending rows are counted into the backlog
    history every :data:`BACKLOG_EVERY`.
    """
    if not record:
        with counted(summary):
            yield None
        return
    recorder = RunRecorder(store, summary, queues, clock, keep_for, kind=kind, backlog=backlog)
    recorder.open()
    with recorder.running():
        recorder.start_heartbeat()
        yield recorder
