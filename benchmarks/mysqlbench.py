"""MySQL/MariaDB plumbing for the benchmarks (run.py --database mysql): the counterpart of pg.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import benchapp
import pymysql
from pymysql.constants import CLIENT
from sqlalchemy.engine import URL

from batchjobs.db import parse_url

TABLE = benchapp.Row.__tablename__
BATCH = benchapp.BATCH_SIZE


def render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def connect(url: URL, *, autocommit: bool = False, client_flag: int = 0) -> pymysql.Connection:
    return pymysql.connect(
        host=url.host or "127.0.0.1", port=url.port or 3306, user=url.username or "root", password=url.password or "",
        database=url.database, autocommit=autocommit, client_flag=client_flag,
    )


class Server:
    """Where scenario databases are created; the user in the URL must be allowed to CREATE DATABASE."""

    def __init__(self, url: str) -> None:
        self.url = parse_url(url)

    def version(self) -> str:
        with connect(self.url.set(database=None), autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT VERSION()")
            return str(cursor.fetchone()[0])

    @contextmanager
    def database(self, label: str, setup: Callable[[URL], object] | None = None) -> Iterator[URL]:
        """A new database holding the benchmark app's tables and batchjobs' own; dropped afterwards."""
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        admin = self.url.set(database=None)
        with connect(admin, autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        url = self.url.set(database=name)
        try:
            if setup is not None:
                setup(url)
            else:
                benchapp.create_tables(url)
            yield url
        finally:
            with connect(admin, autocommit=True) as conn, conn.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {name}")


def _numbers(count: int) -> str:
    """A derived table of n = 1..count, from cross-joined digits (no generate_series here)."""
    digits = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)"
    places = len(str(max(count - 1, 1)))
    value = " + ".join(f"d{i}.d * {10 ** i}" for i in range(places))
    joined = ", ".join(f"{digits} d{i}" for i in range(places))
    return f"(SELECT {value} + 1 AS n FROM {joined}) g WHERE n <= {int(count)}"


def load_rows(url: URL, count: int, done: bool) -> None:
    """Refill bench_rows with ``count`` rows, all pending or all done, in one INSERT ... SELECT.

    ANALYZE TABLE gives the optimizer real statistics.
    """
    with connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(f"TRUNCATE {TABLE}")
        cursor.execute(f"INSERT INTO {TABLE} (id, done) SELECT n, {int(done)} FROM {_numbers(count)}")
        cursor.execute(f"ANALYZE TABLE {TABLE}")
        cursor.fetchall()


def row_counts(url: URL) -> tuple[int, int]:
    """(pending rows, rows whose note a handler wrote) in bench_rows."""
    with connect(url) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT COALESCE(SUM(NOT done), 0), COUNT(note) FROM {TABLE}")
        pending, notes = cursor.fetchone()
    return int(pending), int(notes)


def drain_sql_keyset(url: URL) -> float:
    """The database's limit as a client sees it, the way run.py measures PostgreSQL's keyset loop:
    one claim-and-mark statement per batch, each batch continuing after the last key of the one
    before, commit, repeat.

    MySQL's UPDATE returns no keys, so the statement notes the last key it marked in a session
    variable (rows are updated in key order), read back in the same round trip.
    """
    claim_and_mark = (
        f"UPDATE {TABLE} SET done = ((@bench_last := id) > 0) WHERE done = 0 AND id > %s ORDER BY id LIMIT {BATCH}; "
        "SELECT @bench_last"
    )
    with connect(url, client_flag=CLIENT.MULTI_STATEMENTS) as conn, conn.cursor() as cursor:
        conn.query("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")  # as batchjobs' claims
        started = time.perf_counter()
        after = 0
        while True:
            cursor.execute(claim_and_mark, (after,))
            marked = cursor.rowcount
            cursor.nextset()
            last = cursor.fetchone()[0]
            conn.commit()
            if marked == 0:
                return time.perf_counter() - started
            after = int(last)
