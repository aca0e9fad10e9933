"""Where a batchjobs drain spends its time: cProfile plus per-statement SQL timings.

    python benchmarks/profile_drain.py [--job noop] [--rows 20000] [--database-url URL] [--top 30]

Loads a backlog of pending rows, drains it once unprofiled (the honest rate), then again under
cProfile, and prints the hottest functions. A last drain times each kind of SQL statement, with
listeners of its own, so that their cost stays out of the other two.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import defaultdict
from typing import Any

import benchapp
import pg
from run import server_url
from sqlalchemy import Engine, event

from batchjobs import run_pending
from batchjobs.db import create_engine


def statement_timer(engine: Engine) -> dict[str, list[float]]:
    """Time every cursor execution, grouped by statement kind (SAVEPOINT, UPDATE, claim, ...)."""
    timings: dict[str, list[float]] = defaultdict(list)

    @event.listens_for(engine, "before_cursor_execute")
    def before(conn: Any, _cursor: Any, _statement: str, *_args: Any) -> None:
        conn.info["bench_started"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def after(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        kind = "claim (SELECT ... FOR NO KEY UPDATE)" if "FOR NO KEY UPDATE" in statement else statement.split()[0]
        timings[kind].append(time.perf_counter() - conn.info.pop("bench_started"))

    return timings


def drain(engine: Engine, job: str, profile: cProfile.Profile | None = None) -> float:
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    run_pending(benchapp.jobs, engine, jobs=[job], batch_size=benchapp.BATCH_SIZE)
    if profile is not None:
        profile.disable()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="noop", choices=sorted(benchapp.jobs.jobs))
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--database-url", metavar="URL")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    with server_url(args.database_url) as url, pg.Server(url).database("profile") as db:
        engine = create_engine(db)
        pg.load_rows(db, 10 * benchapp.BATCH_SIZE, done=False)
        drain(engine, args.job)  # warm-up: mappers, statement caches, prepared statements
        pg.load_rows(db, args.rows, done=False)
        plain = drain(engine, args.job)
        pg.load_rows(db, args.rows, done=False)
        profile = cProfile.Profile()
        profiled = drain(engine, args.job, profile)
        # Last, on an engine of its own: the timing listeners cost time of their own.
        timed = create_engine(db)
        timer = statement_timer(timed)
        pg.load_rows(db, args.rows, done=False)
        drain(timed, args.job)
        for each in (engine, timed):
            each.dispose()
    print(f"job {args.job}, {args.rows:,} rows: {args.rows / plain:,.0f} rows/s ({plain / args.rows * 1e6:.1f} us/row)")
    print(f"under cProfile: {args.rows / profiled:,.0f} rows/s\n")
    print("SQL statements (a drain of their own, all through SQLAlchemy; wall time from execute to result):")
    for kind, times in sorted(timer.items(), key=lambda item: -sum(item[1])):
        print(f"  {kind:40} {len(times):7} calls {sum(times):8.3f} s  {sum(times) / len(times) * 1e6:7.0f} us/call")
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
