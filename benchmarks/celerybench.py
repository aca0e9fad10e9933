"""Celery beside batchjobs.celery, on the same Redis and PostgreSQL in the same run.

Two Celery workers (prefork, concurrency 2) drain a backlog either as plain Celery does it, one
task per row (load nothing, UPDATE the row's flag, commit), or as batchjobs does, sweeps that
claim chunks of rows with SKIP LOCKED. Then the latency from an app's COMMIT to its handler's
start, through ``dispatch_on_commit`` and Redis.

run.py imports this module for :func:`celery_scenario`; the workers load it as their Celery app
(``celery -A celerybench worker``), configured from the environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import benchapp
from celery import Celery
from sqlalchemy import Engine, update
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from batchjobs import Registry
from batchjobs.celery import install
from batchjobs.db import create_engine

HERE = Path(__file__).resolve().parent
LATENCY_FILE_ENV = "CELERYBENCH_LATENCY_FILE"

jobs = Registry()


@jobs.flag_job(benchapp.Row.done, queue="drain", batch_size=benchapp.BATCH_SIZE, columns=[benchapp.Row.id])
def drain(row: Any) -> None:
    """Nothing: the same work as the plain task's, which only marks its row done."""


@jobs.flag_job(benchapp.FlaggedSignup.welcome_sent, queue="latency", batch_size=benchapp.BATCH_SIZE)
def welcome(signup: benchapp.FlaggedSignup) -> None:
    """Write when the handler started, for the latency from the app's COMMIT."""
    fd = os.open(os.environ[LATENCY_FILE_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{signup.id} {time.time()!r}\n".encode())
    finally:
        os.close(fd)


def make_app(broker: str, prefix: str) -> tuple[Celery, Any]:
    app = Celery("celerybench", broker=broker, set_as_current=False)
    app.conf.update(broker_connection_retry_on_startup=True, task_ignore_result=True)
    installed = install(app, jobs, sweep_every=None, sweep_budget=3600, queue_prefix=prefix)
    return app, installed


app, celery_jobs = make_app(os.environ.get("CELERYBENCH_BROKER", "memory://"), os.environ.get("CELERYBENCH_PREFIX", ""))
_engine: tuple[int, Engine] | None = None


@app.task(name="celerybench.plain_row", ignore_result=True)
def plain_row(row_id: int) -> None:
    """Plain Celery: one task per row, marking it done in a transaction of its own."""
    global _engine
    if _engine is None or _engine[0] != os.getpid():
        _engine = (os.getpid(), create_engine(os.environ["BATCHJOBS_DATABASE_URL"]))
    with _engine[1].begin() as connection:
        connection.execute(update(benchapp.Row).where(benchapp.Row.id == row_id).values(done=True))


# --- the scenario, run by run.py ---------------------------------------------------------------------


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server where installed, else the machine's Redis at 127.0.0.1:6379."""
    server = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if server is None:
        yield "redis://127.0.0.1:6379/0"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="batchjobs-redis-")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _until(lambda: _answers(port), "the throwaway Redis to start", 10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _until(condition: Any, what: str, timeout: float, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every)


@contextmanager
def workers(url: URL, broker: str, prefix: str, queues: list[str], tmp: Path, *extra: str) -> Iterator[list[str]]:
    """Two Celery workers, prefork, concurrency 2, each in a process group of its own; yields their names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHJOBS_", "CELERYBENCH_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        BATCHJOBS_DATABASE_URL=url.render_as_string(hide_password=False),
        BATCHJOBS_STATE_DIR=str(tmp / "state"),
        CELERYBENCH_BROKER=broker,
        CELERYBENCH_PREFIX=prefix,
        **{LATENCY_FILE_ENV: str(tmp / "latency.txt")},
    )
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    names = [f"bench{index}-{prefix}@{socket.gethostname()}" for index in range(2)]
    try:
        for index in range(2):
            log = tmp / f"worker-{uuid.uuid4().hex[:6]}.log"
            command = [
                sys.executable, "-m", "celery", "-A", "celerybench", "worker", "--pool", "prefork", "--concurrency", "2",
                "--queues", ",".join(prefix + queue for queue in queues), "--hostname", names[index],
                "--loglevel", "warning", "--without-gossip", "--without-mingle", "--without-heartbeat", *extra,
            ]  # fmt: skip
            with open(log, "wb") as out:
                process = subprocess.Popen(command, env=env, cwd=HERE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            started.append((process, log))
        for process, log in started:
            # Ready when its pool has started: two processes besides the parent in its group.
            _until(lambda process=process: process.poll() is not None or len(_group(process.pid)) >= 3, "a worker to start", 60)
            if process.poll() is not None:
                raise RuntimeError(f"a Celery worker exited ({process.returncode}):\n{log.read_text()}")
        time.sleep(1.0)  # the consumers connect to the broker after the pool has started
        yield names
    finally:
        for process, _ in started:
            _signal_group(process.pid, signal.SIGTERM)
        for process, _ in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(timeout=20)
            _signal_group(process.pid, signal.SIGKILL)


def _group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return found


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _pending(url: URL) -> int:
    import pg

    return pg.row_counts(url)[0]


def drain_plain(url: URL, broker: str, rows: int, tmp: Path) -> dict[str, Any]:
    """Plain Celery: a backlog of one task per row waiting in the broker; time from both workers
    starting to consume it to the last row done."""
    import pg

    prefix = f"b{uuid.uuid4().hex[:6]}-"
    pg.load_rows(url, rows, done=False)
    sender, _ = make_app(broker, prefix)
    # The workers start on a queue of their own, so that the backlog is whole before either
    # consumes it; then both are told to consume it at once.
    with workers(url, broker, prefix, ["idle"], tmp) as names:
        queued = time.perf_counter()
        with sender.producer_or_acquire() as producer:
            for row_id in range(1, rows + 1):
                sender.send_task("celerybench.plain_row", args=(row_id,), queue=prefix + "plain", producer=producer)
        send_seconds = time.perf_counter() - queued
        started = time.perf_counter()
        replies = sender.control.add_consumer(prefix + "plain", destination=names, reply=True, timeout=10)
        if len(replies) != len(names):
            raise RuntimeError(f"not every worker took the backlog's queue: {replies}")
        _until(lambda: _pending(url) == 0, "plain Celery to drain the backlog", 3600, every=0.05)
        seconds = time.perf_counter() - started
    sender.close()
    return {"rows": rows, "seconds": seconds, "send_seconds": send_seconds, "rows_per_second": rows / seconds}


def drain_batchjobs(url: URL, broker: str, rows: int, tmp: Path) -> dict[str, Any]:
    """batchjobs: a sweep for each pool process; time from the first send to the last row done."""
    import pg

    prefix = f"b{uuid.uuid4().hex[:6]}-"
    pg.load_rows(url, rows, done=False)
    sender, installed = make_app(broker, prefix)
    with workers(url, broker, prefix, ["drain"], tmp, "--prefetch-multiplier", "1"):
        started = time.perf_counter()
        for _ in range(4):
            installed.sweep.apply_async(kwargs={"job": "drain"})
        _until(lambda: _pending(url) == 0, "the sweeps to drain the backlog", 3600, every=0.05)
        seconds = time.perf_counter() - started
    sender.close()
    return {"rows": rows, "seconds": seconds, "rows_per_second": rows / seconds}


def dispatch_latency(url: URL, broker: str, samples: int, tmp: Path) -> dict[str, Any]:
    """COMMIT of one new row to its handler's start, one row at a time, through dispatch_on_commit."""
    from sqlalchemy import event

    prefix = f"b{uuid.uuid4().hex[:6]}-"
    sender, installed = make_app(broker, prefix)
    latency_file = tmp / "latency.txt"
    latency_file.unlink(missing_ok=True)
    engine = create_engine(url)
    committed: dict[int, float] = {}
    with workers(url, broker, prefix, ["latency"], tmp, "--prefetch-multiplier", "1"), Session(engine) as session:
        pending_ids: list[int] = []

        def after_commit(_session: Session) -> None:
            # Registered before the dispatch hook: the moment the database confirmed the COMMIT.
            now = time.time()
            for row_id in pending_ids:
                committed[row_id] = now
            pending_ids.clear()

        event.listen(session, "after_commit", after_commit)
        installed.dispatch_on_commit(session)
        for row_id in range(1, samples + 1):
            pending_ids.append(row_id)
            session.add(benchapp.FlaggedSignup(id=row_id, email=f"user{row_id}@example.com"))
            session.commit()
            _until(lambda row_id=row_id: _handled(latency_file) >= row_id, f"row {row_id}'s handler", 30, every=0.001)
    engine.dispose()
    sender.close()
    started = {int(row): float(at) for row, at in (line.split() for line in latency_file.read_text().splitlines())}
    latencies = sorted(started[row] - committed[row] for row in committed)
    return {
        "samples": len(latencies),
        "p50_seconds": statistics.median(latencies),
        "p99_seconds": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_seconds": latencies[-1],
        "latencies_seconds": latencies,
    }


def _handled(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def celery_scenario(server: Any, report: Any, plain_rows: int, batchjobs_rows: int, samples: int) -> None:
    """Section 8 of run.py: drain ratio against plain Celery, and dispatch latency."""
    section = "8. Celery, two workers x 2 processes, Redis"
    if shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server") and not _answers(6379):
        report.add(section, "skipped: no redis-server installed and no Redis at 127.0.0.1:6379", "")
        return
    with redis_server() as broker, tempfile.TemporaryDirectory() as folder, server.database("celery") as url:
        tmp = Path(folder)
        plain = drain_plain(url, broker, plain_rows, tmp)
        ours = drain_batchjobs(url, broker, batchjobs_rows, tmp)
        latency = dispatch_latency(url, broker, samples, tmp)
    speedup = ours["rows_per_second"] / plain["rows_per_second"]
    p50, p99 = latency["p50_seconds"] * 1000, latency["p99_seconds"] * 1000
    report.add(section, f"plain Celery, one task per row ({plain_rows:,} rows waiting in the broker)", f"{plain['rows_per_second']:,.0f} rows/s", "1.00")
    report.add(
        section, f"batchjobs.celery sweeps, plain rows ({batchjobs_rows:,} rows)", f"{ours['rows_per_second']:,.0f} rows/s",
        f"{speedup:.1f}x plain Celery", ">= 50x", "PASS" if speedup >= 50 else "MISS",
    )  # fmt: skip
    report.add(
        section, f"dispatch latency, COMMIT to handler start, p50 / p99 ({latency['samples']} rows)",
        f"{p50:.1f} ms / {p99:.1f} ms", "", "p50 < 50 ms", "PASS" if p50 < 50 else "MISS",
    )  # fmt: skip
    report.data["celery"] = {"plain": plain, "batchjobs": ours, "latency": latency, "speedup": speedup}
