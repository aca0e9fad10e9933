"""`batchjobs metrics`: Prometheus text exposition, or a file for node_exporter's textfile collector.

Needs the optional ``prometheus_client`` package (``pip install 'batchjobs[metrics]'``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine

from batchjobs.db import connection_for
from batchjobs.errors import BatchJobsError
from batchjobs.monitoring import last_run, status
from batchjobs.registry import Registry
from batchjobs.timeutil import utcnow


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise BatchJobsError("metrics need prometheus_client: pip install 'batchjobs[metrics]'") from None
    return prometheus_client


def collect(registry: Registry, bind: Engine | Connection, now: datetime | None = None) -> Any:
    """A prometheus_client CollectorRegistry holding a snapshot of every job's numbers. Reads only."""
    prometheus = _prometheus()
    now = now or utcnow()
    metrics = prometheus.CollectorRegistry()

    def gauge(name: str, doc: str) -> Any:
        return prometheus.Gauge(name, doc, ["job", "queue"], registry=metrics)

    pending = gauge("batchjobs_pending_rows", "Rows waiting for the job (including backing-off and dead ones).")
    age = gauge("batchjobs_oldest_pending_age_seconds", "How long the oldest pending row has waited.")
    backoff = gauge("batchjobs_backoff_rows", "Failing rows waiting for their next attempt.")
    dead = gauge("batchjobs_dead_rows", "Rows that ran out of attempts.")
    last_ts = gauge("batchjobs_last_run_timestamp_seconds", "When the latest run covering the job started.")
    last_duration = gauge("batchjobs_last_run_duration_seconds", "How long the latest run covering the job took.")
    last_done = gauge("batchjobs_last_run_rows_done", "Rows of the job the latest run handled.")
    last_failed = gauge("batchjobs_last_run_rows_failed", "Rows of the job that failed in the latest run.")
    workers = gauge("batchjobs_live_workers", "Live `batchjobs worker` processes serving the job's queue.")
    with connection_for(bind) as connection:
        current = status(registry, connection, now=now)
        jobs = current.jobs
        runs = {job.name: last_run(registry, connection, job=job.name, now=now) for job in jobs}
    for job in jobs:
        serving = [run for run in current.alive if run.kind == "worker" and run.serves(job.queue)]
        workers.labels(job=job.name, queue=job.queue).set(len(serving))
        labels = {"job": job.name, "queue": job.queue}
        pending.labels(**labels).set(job.pending)
        if job.oldest_pending_age is not None:
            age.labels(**labels).set(job.oldest_pending_age)
        backoff.labels(**labels).set(job.backoff)
        dead.labels(**labels).set(job.dead)
        run = runs[job.name]
        if run is not None:
            done, failed = run.job_stats.get(job.name, [0, 0])
            last_ts.labels(**labels).set(run.started_at.timestamp())
            last_duration.labels(**labels).set(run.seconds)
            last_done.labels(**labels).set(done)
            last_failed.labels(**labels).set(failed)
    return metrics


def render(metrics: Any) -> str:
    """The text exposition format."""
    exposition: bytes = _prometheus().generate_latest(metrics)
    return exposition.decode()


def write_textfile(metrics: Any, path: Path) -> None:
    """Write atomically (temporary file, then rename), as node_exporter's textfile collector needs."""
    try:
        _prometheus().write_to_textfile(str(path), metrics)
    except OSError as exc:
        raise BatchJobsError(f"cannot write {path}: {exc.strerror}") from None
