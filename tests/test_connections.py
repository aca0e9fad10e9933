"""Reaching the database: bounded waits on a server that never answers, and connection poolers.

The frozen server is a real TCP listener that accepts connections and never sends a byte, which
is what a hung PostgreSQL (or a half-dead load balancer) looks like to a client. The pooler is a
real pgbouncer, started per test in front of the test PostgreSQL.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import jobapp
import psycopg
import pytest
from conftest import BATCHJOBS, cli_env, effects, free_port, run_cli, start_cli, stop_process, wait_for
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from test_run_pending import add_items

from batchjobs.db import connect, create_engine
from batchjobs.errors import BatchJobsError

# -- a server that accepts and never answers ---------------------------------------------------------


@pytest.fixture
def frozen_port() -> Iterator[int]:
    """Port of a listener on 127.0.0.1 that accepts every connection, then never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    # A timeout, so the accept loop notices the test is over without closing a socket under it.
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)  # kept open: the client waits for an answer that never comes

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def _frozen_env() -> dict[str, str]:
    env = cli_env()
    env.pop("PGCONNECT_TIMEOUT", None)  # a timeout from the environment would win over batchjobs' default
    return env


def _timed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    # The subprocess timeout only keeps a regression from hanging the suite; the bounds asserted
    # by the tests are much tighter.
    result = run_cli(*args, env=_frozen_env(), timeout=150)
    return result, time.monotonic() - started


def test_run_pending_gives_up_on_a_frozen_server_with_one_line(frozen_port: int) -> None:
    url = f"postgresql://x:s3cret@127.0.0.1:{frozen_port}/db"

    result, took = _timed("-A", "jobapp:jobs", "--database-url", url, "run-pending")

    # psycopg alone would wait 130 s; batchjobs' default is 5 s.
    assert took < 15, took
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: cannot connect to postgresql+psycopg://x:***@127.0.0.1:{frozen_port}/db: ")
    assert "timeout" in lines[0]
    assert "s3cret" not in result.stderr


def test_check_reports_unknown_well_inside_nagios_ten_seconds(frozen_port: int) -> None:
    url = f"postgresql://x:s3cret@127.0.0.1:{frozen_port}/db"

    result, took = _timed("-A", "jobapp:jobs", "--database-url", url, "check", "--max-pending", "10")

    assert took < 8, took  # Nagios kills a plugin after 10 s; check's own connect timeout is 3 s
    assert result.returncode == 3, result
    assert result.stdout.startswith("BATCHJOBS UNKNOWN - cannot connect to ")
    assert len(result.stdout.splitlines()) == 1, result.stdout
    assert "timeout" in result.stdout
    assert result.stderr == ""
    assert "s3cret" not in result.stdout


def test_a_url_connect_timeout_is_honoured(frozen_port: int) -> None:
    url = f"postgresql://x@127.0.0.1:{frozen_port}/db?connect_timeout=1"

    result, took = _timed("-A", "jobapp:jobs", "--database-url", url, "run-pending")

    # psycopg, like libpq, waits at least 2 s; the 5 s default would not end in time.
    assert took < 4.5, took
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "timeout" in result.stderr


def test_the_url_wins_over_create_engines_option(frozen_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    engine = create_engine(f"postgresql://x@127.0.0.1:{frozen_port}/db?connect_timeout=2", connect_timeout=60)
    started = time.monotonic()
    with pytest.raises(BatchJobsError, match="cannot connect to .*timeout"):
        connect(engine)
    assert time.monotonic() - started < 10  # 60 s if the option had won


# -- prepared statements -------------------------------------------------------------------------------


def _prepared_on_server(url: str) -> tuple[int, int | None]:
    """How many statements the server holds prepared after one connection ran one query 10 times,
    and that connection's psycopg prepare_threshold."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            for n in range(10):
                connection.execute(text("SELECT :n + 1"), {"n": n})
            prepared = int(connection.scalar(text("SELECT count(*) FROM pg_prepared_statements")) or 0)
            return prepared, connection.connection.driver_connection.prepare_threshold  # type: ignore[union-attr]
    finally:
        engine.dispose()


def _with_threshold(url: str, value: str) -> str:
    return make_url(url).update_query_dict({"prepare_threshold": value}).render_as_string(hide_password=False)


def test_a_direct_connection_prepares_statements_as_psycopg_does(pg_url: str) -> None:
    # Nothing between the tests and PostgreSQL: the embedded server over its Unix socket, or a
    # server of BATCHJOBS_TEST_POSTGRES_URL over TCP.
    prepared, threshold = _prepared_on_server(pg_url)
    assert threshold == 5
    assert prepared > 0


def test_a_url_that_says_none_prepares_nothing(pg_url: str) -> None:
    assert _prepared_on_server(_with_threshold(pg_url, "none")) == (0, None)
    assert _prepared_on_server(_with_threshold(pg_url, "None")) == (0, None)


def test_a_url_prepare_threshold_reaches_psycopg_as_a_number(pg_url: str) -> None:
    # Prepared from the first run on; as text psycopg would fail comparing it to a count.
    assert _prepared_on_server(_with_threshold(pg_url, "0"))[0] > 0


def test_a_bad_prepare_threshold_is_one_line_before_connecting() -> None:
    # Nothing listens on port 1: the error must come from reading the URL, not from connecting.
    url = "postgresql://x@127.0.0.1:1/db?prepare_threshold=often"

    result = run_cli("-A", "jobapp:jobs", "--database-url", url, "run-pending")

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: prepare_threshold='often': use a whole number (runs of a statement before psycopg "
        "prepares it on the server), or none to prepare nothing"
    ]


# -- pgbouncer -------------------------------------------------------------------------------------------


def _pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


@pytest.fixture(params=["transaction", "session"])
def pgbouncer_url(request: pytest.FixtureRequest, pg_engine: Engine) -> Iterator[str]:
    """The test database (tables migrated) through a pgbouncer of its own, in each pooling mode,
    with two server connections for all its clients."""
    binary = _pgbouncer_binary()
    if binary is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    backend = pg_engine.url
    # The embedded server listens on a unix socket only, named by ?host=<dir>.
    host = backend.host or str(backend.query.get("host") or "127.0.0.1")
    user = backend.username or "postgres"
    target = f"host={host} port={backend.port or 5432} dbname={backend.database} user={user}"
    if backend.password:
        target += f" password={backend.password}"
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="batchjobs-pgbouncer-"))
    # pgbouncer refuses to run as root; as another user it must still read its files.
    workdir.chmod(0o755)
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
{backend.database} = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / "users.txt"}
pool_mode = {request.param}
default_pool_size = 2
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 100
# A client waits this long for a free server connection; a run that cannot get one (say, it
# needs a second connection while its first holds the pool) fails here instead of after 120 s.
query_wait_timeout = 30
ignore_startup_parameters = extra_float_digits
"""
    )
    for path in workdir.iterdir():
        path.chmod(0o644)
    command = [binary]
    if os.geteuid() == 0:
        # The owner of the embedded server's socket directory may connect to it; over TCP anyone may.
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "nobody"
        command += ["-u", owner]
    log = (workdir / "pgbouncer.log").open("w")
    bouncer = subprocess.Popen([*command, str(workdir / "pgbouncer.ini")], stdout=log, stderr=subprocess.STDOUT)
    url = make_url(f"postgresql+psycopg://{user}@127.0.0.1:{port}/{backend.database}").set(password=backend.password)
    try:
        deadline = time.monotonic() + 30
        while True:
            if bouncer.poll() is not None:
                pytest.fail(f"pgbouncer exited ({bouncer.returncode}):\n{(workdir / 'pgbouncer.log').read_text()}")
            try:
                psycopg.connect(url.render_as_string(hide_password=False).replace("+psycopg", ""), connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pgbouncer did not answer:\n{(workdir / 'pgbouncer.log').read_text()}")
                time.sleep(0.05)
        yield url.render_as_string(hide_password=False)
    finally:
        stop_process(bouncer)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_nothing_is_prepared_through_pgbouncer(pgbouncer_url: str) -> None:
    # The pooler's clients are not the server's: the connection keeps psycopg from preparing.
    assert _prepared_on_server(pgbouncer_url)[1] is None


def test_concurrent_runs_through_pgbouncer_handle_each_row_once(pgbouncer_url: str, pg_engine: Engine, tmp_path: Path) -> None:
    add_items(pg_engine, 3000)
    effects_file = tmp_path / "effects.txt"
    # Handlers that write make savepoints too, so more kinds of statement go through the pooler.
    env = cli_env(JOBAPP_EFFECTS=str(effects_file), JOBAPP_WRITE_NOTE="1", BATCHJOBS_DATABASE_URL=pgbouncer_url)

    # Three clients on two server connections: in transaction mode each run's transactions land on
    # whichever server connection is free, the case that broke with prepared statements.
    runs = [start_cli("-A", "jobapp:jobs", "run-pending", "--queue", "items", env=env) for _ in range(3)]
    outputs = [run.communicate(timeout=300) for run in runs]

    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err
        assert "prepared statement" not in out + err
        assert "Traceback" not in err
    handled = Counter(effects(effects_file))
    assert set(handled) == set(range(1, 3001))
    assert max(handled.values()) == 1, [k for k, n in handled.items() if n > 1][:10]
    with Session(pg_engine) as session:
        done = session.scalar(select(func.count()).where(jobapp.Item.processed.is_(True), jobapp.Item.note.is_not(None)))
    assert done == 3000
    assert sum(int(out.split()[1]) for out, _ in outputs if out.strip()) == 3000


def test_a_worker_behind_a_pooler_is_woken_or_polls_and_says_why(
    pgbouncer_url: str, pg_engine: Engine, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A transaction pooler hands the LISTEN's server connection to other clients between
    statements: notifications never come back. The worker finds out at once and polls. Through
    a session pooler they come back, and the worker listens as on a direct connection."""
    transaction_mode = request.node.callspec.params["pgbouncer_url"] == "transaction"
    from batchjobs.worker import trigger_sql

    with pg_engine.begin() as connection:
        for statement in trigger_sql(jobapp.jobs, pg_engine):
            connection.exec_driver_sql(statement)
    effects_file = tmp_path / "effects.txt"
    env = cli_env(JOBAPP_EFFECTS=str(effects_file), BATCHJOBS_DATABASE_URL=pgbouncer_url)
    err_file = tmp_path / "stderr.txt"
    with err_file.open("w") as err:
        worker = subprocess.Popen(
            [BATCHJOBS, "-A", "jobapp:jobs", "worker", "-q", "items", "--poll-interval", "200ms", "--backstop-interval", "1h"],
            env=env, stdout=subprocess.DEVNULL, stderr=err, text=True,
        )
    try:
        if transaction_mode:
            wait_for(lambda: "notifications do not reach this worker" in err_file.read_text(), "the worker to say why it polls", worker)
        else:
            wait_for(lambda: "batchjobs worker: handling" in err_file.read_text(), "the worker to start", worker)
        add_items(pg_engine, 2)
        # Well inside the hour-long backstop: a notification or a poll found them.
        wait_for(lambda: sorted(effects(effects_file)) == [1, 2], "the rows to be handled", worker, timeout=30)
    finally:
        stop_process(worker)
    said = err_file.read_text()
    assert "Traceback" not in said
    assert ("notifications do not reach this worker" in said) is transaction_mode, said
