"""A seeded database for the web page's tests: pending rows, failing and dead rows with tracebacks,
a day of run and backlog history."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone

import jobapp
from sqlalchemy import Engine, insert, select

from batchjobs.store.tables import BACKLOG, FAILURES, RUNS

TRACEBACK = """Traceback (most recent call last):
  File "/srv/app/jobs.py", line 42, in process_item
    mailer.send(item.email)
  File "/srv/app/mailer.py", line 17, in send
    raise SMTPRecipientsRefused(to)
mailer.SMTPRecipientsRefused: <nobody@example.invalid> refused
"""


def failure(row_key: str, *, dead: bool, now: datetime, attempts: int = 3, job: str = "process_item") -> dict[str, object]:
    return {
        "job": job,
        "row_key": row_key,
        "attempts": attempts,
        "crashes": 0,
        "dead": dead,
        "first_failed_at": now - timedelta(hours=2),
        "last_failed_at": now - timedelta(minutes=5),
        "next_attempt_at": None if dead else now + timedelta(minutes=10),
        "error_type": "mailer.SMTPRecipientsRefused",
        "error_message": "<nobody@example.invalid> refused",
        "traceback": TRACEBACK,
    }


def seed(engine: Engine, *, items: int = 40, done: int = 15, history: bool = True) -> datetime:
    """Items 1..items, the first ``done`` of them done; items 16-18 backing off, 19-20 dead."""
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(
            insert(jobapp.Item.__table__),
            # Rows come in a minute apart, the last one now: the oldest pending row has waited a while.
            [
                {"id": i, "category": "a", "processed": i <= done, "created_at": now - timedelta(minutes=items - i)}
                for i in range(1, items + 1)
            ],
        )
        conn.execute(insert(jobapp.Order.__table__), [{"id": i, "receipt_sent_at": None} for i in range(1, 8)])
        conn.execute(
            insert(FAILURES),
            [failure(str(k), dead=False, now=now) for k in (16, 17, 18)]
            + [failure(str(k), dead=True, now=now, attempts=5) for k in (19, 20)],
        )
        if history:
            _history(conn, now)
    return now


def _history(conn: object, now: datetime) -> None:
    """A day of samples every five minutes and a run every five minutes: a backlog that builds up
    in the afternoon and drains at night."""
    samples, runs = [], []
    for step in range(288):
        at = now - timedelta(minutes=5 * step)
        wave = (math.sin(step / 30) + 1) / 2
        samples += [
            {"sampled_at": at, "job": "process_item", "pending": int(400 * wave) + 25},
            {"sampled_at": at, "job": "send_receipt", "pending": int(120 * (1 - wave)) + 7},
            {"sampled_at": at, "job": "make_thumbnails", "pending": int(60 * wave * wave)},
        ]
        stats = {"process_item": [int(300 * wave) + 10, 1], "send_receipt": [int(90 * (1 - wave)), 0], "make_thumbnails": [20, 0]}
        crashed = step in (40, 41)
        runs.append(
            {
                "host": "app-1",
                "pid": 1000 + step,
                "jobs": "process_item,send_receipt,make_thumbnails",
                "queues": "",
                "kind": "run",
                "started_at": at - timedelta(seconds=50),
                "heartbeat_at": at - timedelta(seconds=30 if crashed else 0),
                "finished_at": None if crashed else at,
                "rows_done": sum(done for done, _ in stats.values()),
                "rows_failed": 1,
                "job_stats": json.dumps(stats),
                "outcome": None if crashed else "finished",
            }
        )
    # A worker for the mail queue, alive (its heartbeat is fresh) for three hours.
    runs.append(
        {
            "host": "app-2",
            "pid": 4242,
            "jobs": "send_receipt",
            "queues": "mail",
            "kind": "worker",
            "started_at": now - timedelta(hours=3),
            "heartbeat_at": now,
            "finished_at": None,
            "rows_done": 1500,
            "rows_failed": 0,
            "job_stats": json.dumps({"send_receipt": [1500, 0]}),
            "outcome": None,
        }
    )
    conn.execute(insert(BACKLOG), samples)  # type: ignore[attr-defined]
    conn.execute(insert(RUNS), runs)  # type: ignore[attr-defined]


def failure_keys(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(FAILURES.c.row_key)))


def item_states(engine: Engine) -> dict[int, bool]:
    with engine.connect() as conn:
        return {row.id: bool(row.processed) for row in conn.execute(select(jobapp.Item.id, jobapp.Item.processed))}
