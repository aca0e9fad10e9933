"""Section 9: the web page's overview on a big table, in server time, beside `status` alone.

A million rows of which 10,000 are pending, 1,000 failure records, a day of run and backlog
history. Each request is a real WSGI call of the app (Werkzeug's test client, in this process), so
the time is the server's: routing, the queries, the template, no network and no browser. The floor
is ``batchjobs.status`` on the same database: the per-job counts the overview shows, and what the
CLI's `status` costs.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import benchapp
import pg
from sqlalchemy import insert

from batchjobs import status
from batchjobs.db import create_engine
from batchjobs.store.tables import BACKLOG, FAILURES, RUNS

#: The overview must render within this, in server time, at the full sizes.
OVERVIEW_TARGET = 0.2
FULL = {"rows": 1_000_000, "pending": 10_000, "failures": 1_000, "requests": 30}
QUICK = {"rows": 100_000, "pending": 1_000, "failures": 100, "requests": 10}


def load(url: Any, rows: int, pending: int, failures: int) -> None:
    """``rows`` rows, every (rows/pending)-th of them pending; failure records for the first
    ``failures`` pending rows (one in ten dead); 24 hours of runs and backlog samples."""
    table = benchapp.Row.__tablename__
    step = rows // pending
    with pg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} (id, done) SELECT g, g %% %s <> 0 FROM generate_series(1, %s) AS g", (step, rows)
        )
    now = datetime.now(timezone.utc)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(FAILURES),
                [
                    {
                        "job": "noop",
                        "row_key": str(step * (i + 1)),
                        "attempts": 5 if i % 10 == 0 else 2,
                        "crashes": 0,
                        "dead": i % 10 == 0,
                        "first_failed_at": now - timedelta(hours=1),
                        "last_failed_at": now - timedelta(minutes=1),
                        "next_attempt_at": None if i % 10 == 0 else now + timedelta(minutes=5),
                        "error_type": "ValueError",
                        "error_message": f"row {i} is bad",
                        "traceback": "Traceback (most recent call last):\n  ...\nValueError: bad\n",
                    }
                    for i in range(failures)
                ],
            )
            names = list(benchapp.jobs.jobs)
            conn.execute(
                insert(BACKLOG),
                [
                    {"sampled_at": now - timedelta(minutes=5 * s), "job": name, "pending": pending}
                    for s in range(288)
                    for name in names
                ],
            )
            conn.execute(
                insert(RUNS),
                [
                    {
                        "host": "bench", "pid": s, "jobs": ",".join(names), "queues": "", "kind": "run",
                        "started_at": now - timedelta(minutes=5 * s, seconds=30),
                        "heartbeat_at": now - timedelta(minutes=5 * s), "finished_at": now - timedelta(minutes=5 * s),
                        "rows_done": 100, "rows_failed": 0, "job_stats": json.dumps({"noop": [100, 0]}), "outcome": "finished",
                    }
                    for s in range(288)
                ],
            )
    finally:
        engine.dispose()
    with pg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def timed(call: Any, requests: int) -> list[float]:
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def web_scenario(server: pg.Server, sizes: Any, report: Any) -> None:
    from werkzeug.test import Client

    from batchjobs.web import create_app

    section = "9. Web page overview (server time)"
    size = QUICK if report.mode == "quick" else FULL
    with server.database("web") as url:
        load(url, size["rows"], size["pending"], size["failures"])
        engine = create_engine(url)
        try:
            client = Client(create_app(benchapp.jobs, engine))

            def overview() -> None:
                response = client.get("/")
                assert response.status_code == 200, response.status

            def job_page() -> None:
                response = client.get("/jobs/noop?dead=1")
                assert response.status_code == 200, response.status

            def floor() -> None:
                status(benchapp.jobs, engine)

            for call in (overview, job_page, floor):  # warm-up: templates compiled, pool filled, caches hot
                timed(call, 3)
            samples: dict[str, list[float]] = {"overview": [], "job": [], "status": []}
            for _ in range(size["requests"]):  # interleaved, so drift hits all alike
                samples["overview"] += timed(overview, 1)
                samples["job"] += timed(job_page, 1)
                samples["status"] += timed(floor, 1)
        finally:
            engine.dispose()
    median = {name: statistics.median(values) for name, values in samples.items()}
    p95 = {name: sorted(values)[int(0.95 * (len(values) - 1))] for name, values in samples.items()}
    what = f"{size['rows']:,} rows, {size['pending']:,} pending, {size['failures']:,} failures, {len(benchapp.jobs.jobs)} jobs"
    full = report.mode != "quick"
    report.add(
        section, f"GET / ({what}), median of {size['requests']}", f"{median['overview'] * 1000:.1f} ms",
        f"{ratio_text(median['overview'], median['status'])} x status", f"< {OVERVIEW_TARGET * 1000:.0f} ms" if full else "",
        ("PASS" if median["overview"] < OVERVIEW_TARGET else "MISS") if full else "",
    )
    report.add(section, "GET / p95", f"{p95['overview'] * 1000:.1f} ms")
    report.add(section, "GET /jobs/noop?dead=1 (a page of 50 failures), median", f"{median['job'] * 1000:.1f} ms")
    report.add(section, "floor: batchjobs.status(), median", f"{median['status'] * 1000:.1f} ms")
    report.data["web"] = {
        **size,
        "jobs": len(benchapp.jobs.jobs),
        "samples_seconds": samples,
        "median_seconds": median,
        "p95_seconds": p95,
        "overview_target_seconds": OVERVIEW_TARGET,
    }


def ratio_text(value: float, floor: float) -> str:
    return f"{value / floor:.2f}"
