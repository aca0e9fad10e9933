"""A handler's ``timeout``: SIGALRM in the main thread, and a cancelled statement when it waits on the database."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from batchjobs.store import Store

if TYPE_CHECKING:
    from batchjobs.savepoints import StatementCounter
from batchjobs.timeutil import format_duration

logger = logging.getLogger("batchjobs")


class JobTimeout(BaseException):
    """A handler ran longer than its job's ``timeout``.

    A BaseException, like KeyboardInterrupt, so that a handler's ``except Exception`` cannot
    swallow it and carry on; ``finally`` blocks still run.
    """


# Failure records name an error by its module and class: this one by the place users import it from.
JobTimeout.__module__ = "batchjobs"


class TimeLimit:
    """Enforces one handler call's time limit.

    When the alarm goes off in Python code, :class:`JobTimeout` is raised there. When it goes off
    while the PostgreSQL driver waits for a statement, raising would leave the connection in the
    middle of a protocol exchange and lose the whole chunk; instead the statement is cancelled
    on the server, it fails with a driver error, the row's savepoint is rolled back as for any
    failure, and the row is recorded as timed out.
    """

    _warned = False

    def __init__(self, seconds: float, store: Store, dbapi_connection: Any, statements: StatementCounter) -> None:
        self.seconds = seconds
        self.store = store
        self.dbapi_connection = dbapi_connection
        self.statements = statements
        self.expired = False
        self._previous: Any = None

    def error(self) -> JobTimeout:
        return JobTimeout(f"handler ran longer than its timeout of {format_duration(self.seconds)}")

    def _expire(self, _signum: int, _frame: FrameType | None) -> None:
        self.expired = True
        if not self.store.cancel_running_statement(self.dbapi_connection, self.statements.in_flight):
            raise self.error()

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            if not TimeLimit._warned:
                logger.warning("job timeouts are only enforced in the main thread")
                TimeLimit._warned = True
            return
        self._previous = signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
