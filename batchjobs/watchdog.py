"""Bounded waits for claims: a statement that has not answered by its deadline is cancelled.

A claim waits for its table like any statement: behind a migration's ACCESS EXCLUSIVE lock it
would wait as long as the migration runs. Setting ``lock_timeout`` would cost a statement per
chunk (and a session setting would leak through a transaction-pooling pgbouncer), so a thread
watches the run's connection instead and cancels the claim once its deadline passes. Only
claims are watched: they come before any handler runs, so a cancelled claim loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batchjobs.savepoints import StatementCounter
from batchjobs.store import Store

logger = logging.getLogger("batchjobs")

#: How soon the watching thread looks again past a deadline: with no statement in flight, and
#: after sending a cancel (each cancel on PostgreSQL opens a connection of its own).
RETRY = 0.01
RESEND = 0.1


class Watchdog:
    """Cancels the statement in flight on one connection when it outlives its deadline.

    The watching thread sleeps until the deadline it keeps, or for good while there is none: it
    does not poll, so a run of many quick claims wakes it about once per claim wait, and an idle
    worker not at all.
    """

    def __init__(self, store: Store, dbapi_connection: Any, statements: StatementCounter) -> None:
        self.store = store
        self.dbapi_connection = dbapi_connection
        self.statements = statements
        self.fired = False
        self._cancel_failed = False  # since the limit began; said once
        self._deadline: float | None = None
        # When the thread wakes next by itself; None while it sleeps until woken.
        self._wakes_at: float | None = None
        self._stopped = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """While active, a statement still running after ``seconds`` is cancelled (and ``fired`` set)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="batchjobs-watchdog", daemon=True)
            self._thread.start()
        self.fired = self._cancel_failed = False
        with self._changed:
            self._deadline = deadline = time.monotonic() + seconds
            # Deadlines mostly come later than the one the thread sleeps towards: it wakes then,
            # finds this one and sleeps on, so most claims cost it no wake-up at all.
            if self._wakes_at is None or deadline < self._wakes_at:
                self._changed.notify()
        try:
            yield
        finally:
            # Under the lock: once this returns, no cancel can be sent for a later statement.
            with self._changed:
                self._deadline = None

    def _watch(self) -> None:
        with self._changed:
            while not self._stopped:
                deadline = self._deadline
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    # Past the deadline, the thread looks again until the limit ends: a deadline
                    # of about nothing may pass before the statement reaches the server, and a
                    # cancel can land just as one ends (psycopg's BEGIN before a claim) and end
                    # nothing.
                    try:
                        sent = self.store.cancel_running_statement(self.dbapi_connection, self.statements.in_flight)
                    except Exception as error:  # noqa: BLE001 - the thread must outlive a failed cancel
                        # A thread that died here would leave every later claim unbounded.
                        if not self._cancel_failed:
                            logger.warning("could not cancel a statement past its deadline (%s); trying again", error)
                        self._cancel_failed, left = True, RESEND
                    else:
                        self.fired = self.fired or sent
                        left = RESEND if sent else RETRY
                if left is None:
                    self._changed.wait()
                else:
                    self._wakes_at = time.monotonic() + left
                    self._changed.wait(min(left, threading.TIMEOUT_MAX))
                    self._wakes_at = None

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
