"""Bounded waits for claims: a statement that has not answered by its deadline is cancelled.

A claim waits for its table like any statement: behind a migration's ACCESS EXCLUSIVE lock it
would wait as long as the migration runs. Setting ``lock_timeout`` would cost a statement per
chunk (and a session setting would leak through a transaction-pooling pgbouncer), so a thread
watches the run's connection instead and cancels the claim once its deadline passes. Only
claims are watched: they come before any handler runs, so a cancelled claim loses nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from batchjobs.savepoints import StatementCounter
from batchjobs.store import Store

#: How often the watching thread looks at the clock: the precision of the deadline.
TICK = 0.1


class Watchdog:
    """Cancels the statement in flight on one connection when it outlives its deadline."""

    def __init__(self, store: Store, dbapi_connection: Any, statements: StatementCounter) -> None:
        self.store = store
        self.dbapi_connection = dbapi_connection
        self.statements = statements
        self.fired = False
        self._deadline: float | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        """While active, a statement still running after ``seconds`` is cancelled (and ``fired`` set)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="batchjobs-watchdog", daemon=True)
            self._thread.start()
        self.fired = False
        with self._lock:
            self._deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            # Under the lock: once this returns, no cancel can be sent for a later statement.
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while not self._stopped.wait(TICK):
            with self._lock:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._deadline = None
                    self.fired = self.store.cancel_running_statement(self.dbapi_connection, self.statements.in_flight)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
