"""The watchdog that bounds claims: a statement past its deadline is cancelled, on the real servers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from conftest import wait_for
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from batchjobs.savepoints import StatementCounter
from batchjobs.store import store_for
from batchjobs.watchdog import Watchdog

CLAIM = "SELECT id FROM watched WHERE id = 1 FOR UPDATE"


@contextmanager
def locked_row(engine: Engine) -> Iterator[threading.Timer]:
    """A row another transaction holds, as a migration holds a table, and the timer that lets it
    go after 20 s once started: were a deadline missed, the waiting statement would simply finish
    then, and the test fail rather than hang."""
    with engine.begin() as setup:
        setup.execute(text("CREATE TABLE watched (id INTEGER PRIMARY KEY)"))
        setup.execute(text("INSERT INTO watched VALUES (1)"))
    holder = engine.connect()
    holder.begin()
    holder.execute(text("UPDATE watched SET id = 1 WHERE id = 1"))
    released = threading.Timer(20, holder.rollback)
    try:
        yield released
    finally:
        released.cancel()
        if released.ident is not None:
            released.join()
        holder.rollback()
        holder.close()
        with engine.begin() as cleanup:
            cleanup.execute(text("DROP TABLE watched"))


@pytest.mark.parametrize("wait", [0.5, 0.0], ids=["sooner", "already-passed"])
@pytest.mark.parametrize("database", ["pg_engine", "mysql_engine"])
def test_a_claim_behind_a_lock_is_cancelled_at_its_own_deadline(database: str, wait: float, request: pytest.FixtureRequest) -> None:
    """After a claim with a long wait, a claim with a short one (a run near its --max-runtime)
    waits behind a lock: it is cancelled at its own deadline, not when the lock goes away, even
    where the deadline has passed before the statement reaches the server."""
    engine: Engine = request.getfixturevalue(database)
    store = store_for(engine)
    with locked_row(engine) as released, engine.connect() as connection:
        watchdog = Watchdog(store, connection.connection.dbapi_connection, StatementCounter(connection, store))
        try:
            with watchdog.limit(3600):
                connection.execute(text("SELECT 1")).scalar_one()
                wait_for(lambda: watchdog._wakes_at is not None, "the watchdog to sleep towards the long deadline")
            connection.commit()
            released.start()
            with pytest.raises(DBAPIError), watchdog.limit(wait):
                connection.execute(text(CLAIM)).all()
            assert watchdog.fired
            assert released.is_alive(), "the statement was cancelled only once the lock was gone"
        finally:
            watchdog.stop()


class _FirstCancelFails:
    """A psycopg connection whose first cancel request fails, as one can when the server takes
    no new connection for it."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.cancels = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def cancel(self) -> None:
        self.cancels += 1
        if self.cancels == 1:
            raise psycopg.OperationalError("connection refused")
        self._connection.cancel()


def test_the_watchdog_outlives_a_cancel_that_fails(pg_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The claim is still cancelled, by the next try, and the failure is said once."""
    store = store_for(pg_engine)
    with locked_row(pg_engine) as released, pg_engine.connect() as connection:
        flaky = _FirstCancelFails(connection.connection.dbapi_connection)
        watchdog = Watchdog(store, flaky, StatementCounter(connection, store))
        try:
            released.start()
            with pytest.raises(DBAPIError), watchdog.limit(0.2):
                connection.execute(text(CLAIM)).all()
            assert watchdog.fired and flaky.cancels >= 2
            assert released.is_alive(), "the statement was cancelled only once the lock was gone"
        finally:
            watchdog.stop()
    assert caplog.text.count("could not cancel a statement past its deadline (connection refused)") == 1


def test_a_lock_timeout_under_a_millisecond_is_not_read_as_none(pg_engine: Engine) -> None:
    """PostgreSQL reads a lock_timeout of 0 as no limit at all."""
    with pg_engine.begin() as connection:
        store_for(pg_engine).limit_lock_wait(connection, 0.0005)
        assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "1ms"
