"""What Flower shows of batchjobs' tasks: a real Flower on a throwaway Redis, a real `celery worker`
sending task events, PostgreSQL; read through Flower's HTTP API as a user's script would."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jobapp
import pytest
from conftest import free_port, wait_for
from sqlalchemy import Engine, insert

pytest.importorskip("celery", reason="Celery is not installed: pip install 'batchjobs[celery]'")
pytest.importorskip("flower", reason="Flower is not installed: pip install flower")

from test_celery import ITEMS, Cluster, _cluster  # noqa: E402 - needs Celery


def _get(port: int, path: str) -> Any:
    """Flower's JSON answer, or None while it is not answering yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _metrics(port: int) -> str:
    """Flower's Prometheus metrics: where it tells which workers its event receiver has heard from."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def _end(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process's group, SIGKILL if it does not exit within 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def flower_cluster(pg_engine: Engine, tmp_path: Path, redis_url: str) -> Iterator[tuple[Cluster, int]]:
    """Flower first, then a worker with task events (-E) and heartbeats; yields once Flower receives its events."""
    with _cluster(pg_engine, tmp_path, redis_url, redis_url) as cluster:
        port = free_port()
        # Flower's API answers without login only when told to; it listens on loopback only here.
        with open(tmp_path / "flower.log", "wb") as out:
            flower = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "celeryapp",
                    "flower",
                    f"--port={port}",
                    "--address=127.0.0.1",
                    "--inspect_timeout=3000",
                ],
                env=cluster.env(FLOWER_UNAUTHENTICATED_API="true"),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                start_new_session=True,
            )
        try:
            wait_for(lambda: _get(port, "/api/task/types") is not None, "Flower to answer", flower, timeout=30)  # type: ignore[arg-type]
            log = tmp_path / "worker-0.log"
            hostname = f"w0-{cluster.prefix}@flower"
            with open(log, "wb") as out:
                worker = subprocess.Popen(
                    [
                        sys.executable, "-m", "celery", "-A", "celeryapp", "worker", "--pool", "prefork",
                        "--concurrency", "1", "--queues", f"{cluster.prefix}items", "--hostname", hostname,
                        "--loglevel", "info", "--without-gossip", "--without-mingle", "-E",
                    ],
                    env=cluster.env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
                )  # fmt: skip
            cluster.workers.append(worker)  # the cluster's teardown ends it
            wait_for(lambda: b" ready." in log.read_bytes(), "the worker to be ready", worker, timeout=30)  # type: ignore[arg-type]
            # The worker's online event or heartbeat has reached Flower: its event receiver is
            # listening, so no task event sent from now on is missed.
            online = f'flower_worker_online{{worker="{hostname}"}} 1.0'
            wait_for(lambda: online in _metrics(port), "Flower to see the worker online", flower, timeout=15)  # type: ignore[arg-type]
            yield cluster, port
        finally:
            _end(flower)


def _shown(port: int, task_id: str) -> dict[str, Any]:
    """Flower's record of a task once it shows as SUCCESS (task events arrive asynchronously)."""

    def info() -> dict[str, Any]:
        return _get(port, f"/api/task/info/{task_id}") or {}

    wait_for(lambda: info().get("state") == "SUCCESS", f"Flower to show task {task_id} as SUCCESS", timeout=15)
    return info()


def test_flower_shows_the_task_names_and_their_results(flower_cluster: tuple[Cluster, int]) -> None:
    cluster, port = flower_cluster
    hostname = f"w0-{cluster.prefix}@flower"
    with cluster.engine.begin() as connection:
        connection.execute(insert(jobapp.Item), [{"id": i} for i in range(1, 5)])
    sweep = cluster.jobs.sweep.apply_async(kwargs={"queue": "items"})
    assert sweep.get(timeout=30)["done"] == 4
    run_rows = cluster.jobs.run_rows.apply_async(kwargs={"job": ITEMS, "keys": [4]})
    assert run_rows.get(timeout=30)["done"] == 0  # row 4 was the sweep's: a hint for a done row

    info = _shown(port, sweep.id)
    assert (info["name"], info["kwargs"], info["worker"]) == ("batchjobs.sweep", "{'queue': 'items'}", hostname)
    # The task's returned summary, as its repr.
    result = ast.literal_eval(info["result"])
    assert (result["done"], result["failed"]) == (4, 0)
    assert result["jobs"] == {ITEMS: {"done": 4, "failed": 0}}

    info = _shown(port, run_rows.id)
    assert (info["name"], info["kwargs"]) == ("batchjobs.run_rows", f"{{'job': '{ITEMS}', 'keys': [4]}}")
    assert ast.literal_eval(info["result"])["done"] == 0

    assert sweep.id in _get(port, "/api/tasks?taskname=batchjobs.sweep&state=SUCCESS")
    assert {"batchjobs.sweep", "batchjobs.run_rows"} <= set(_get(port, "/api/task/types")["task-types"])
    # Registered tasks come from the worker itself: Flower asks it with `inspect`, whose replies
    # can miss Flower's timeout on a busy machine, so ask again until they arrive.
    wait_for(lambda: hostname in (_get(port, "/api/workers?refresh=1") or {}), "Flower to inspect the worker", timeout=20)
    assert {"batchjobs.sweep", "batchjobs.run_rows"} <= set(_get(port, "/api/workers")[hostname]["registered"])
