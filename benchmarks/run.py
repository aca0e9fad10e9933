"""Benchmarks for batchjobs on PostgreSQL, each measured beside the database's own limit.

    python benchmarks/run.py [--database-url URL] [--quick] [--json PATH]

Without --database-url a throwaway embedded PostgreSQL is started. Results are printed as a
markdown table and written as JSON; README.md in this folder explains every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy
from sqlalchemy.engine import URL

import benchapp
import pg
from batchjobs import run_pending
from batchjobs.db import create_engine

HERE = Path(__file__).resolve().parent
BATCH = benchapp.BATCH_SIZE
TABLE = benchapp.Row.__tablename__

# Targets. Throughput is compared as a ratio to the SQL loop on the same server in the same run,
# because absolute numbers move with the machine and its neighbours.
DRAIN_RATIO_TARGET = 0.5
IDLE_RATIO_TARGET = 1.2
IDLE_SECONDS_TARGET = 0.4
MARK_RSS_RATIO_TARGET = 1.1


@dataclass(frozen=True)
class Sizes:
    drain: int
    drain_rounds: int
    idle_small: int
    idle_large: int
    idle_runs: int
    concurrency: int
    concurrency_rounds: int
    mark_small: int
    mark_large: int
    insert_preload: int
    insert_rounds: int
    inserts_per_round: int
    import_runs: int


FULL = Sizes(
    drain=200_000,
    drain_rounds=3,
    idle_small=10_000,
    idle_large=2_000_000,
    idle_runs=9,
    concurrency=100_000,
    concurrency_rounds=2,
    mark_small=100_000,
    mark_large=1_000_000,
    insert_preload=100_000,
    insert_rounds=20,
    inserts_per_round=500,
    import_runs=7,
)
QUICK = Sizes(
    drain=5_000,
    drain_rounds=2,
    idle_small=10_000,
    idle_large=200_000,
    idle_runs=5,
    concurrency=5_000,
    concurrency_rounds=1,
    mark_small=2_000,
    mark_large=20_000,
    insert_preload=10_000,
    insert_rounds=6,
    inserts_per_round=150,
    import_runs=3,
)


# --- reporting ---------------------------------------------------------------------------------


@dataclass
class Line:
    """One row of the printed table."""

    scenario: str
    measure: str
    result: str
    ratio: str = ""
    target: str = ""
    status: str = ""


@dataclass
class Report:
    mode: str
    lines: list[Line] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, *args: str, **kwargs: str) -> None:
        line = Line(*args, **kwargs)
        self.lines.append(line)
        log(f"  {line.scenario}: {line.measure}: {line.result} {line.ratio}".rstrip())

    def check(self, ok: bool, what: str) -> str:
        """A correctness check: unlike a missed target, a failure makes the run exit non-zero."""
        if not ok:
            self.failures.append(what)
        return "OK" if ok else "FAIL"

    def markdown(self) -> str:
        headers = ("Scenario", "Measure", "Result", "Ratio", "Target", "Status")
        rows = [headers, tuple("---" for _ in headers)]
        rows += [(ln.scenario, ln.measure, ln.result, ln.ratio, ln.target, ln.status) for ln in self.lines]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def rate(rows_per_second: float) -> str:
    return f"{rows_per_second:,.0f} rows/s"


def ratio(value: float) -> str:
    return f"{value:.2f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the CLI as cron runs it ---------------------------------------------------------------------


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("batchjobs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "batchjobs"]


CLI = _cli_command()


# Cron runs an installed package whose bytecode was compiled at install time. Subprocesses keep
# theirs in a cache outside the source tree, whatever the caller's PYTHONDONTWRITEBYTECODE says,
# so a start-up measures loading bytecode, not compiling source.
PYCACHE = Path(tempfile.gettempdir()) / "batchjobs-bench-pycache"


def cli_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus anything that could point batchjobs elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BATCHJOBS_") and k not in ("DATABASE_URL", "PYTHONDONTWRITEBYTECODE")
    }
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cli_args(url: URL, job: str) -> list[str]:
    return [*CLI, "-A", "benchapp:jobs", "--database-url", pg.render(url), "run-pending", "-j", job, "--batch-size", str(BATCH)]


def run_cli(url: URL, job: str) -> tuple[float, str]:
    """Wall time of one whole `batchjobs run-pending` process, interpreter start-up included."""
    started = time.perf_counter()
    proc = subprocess.run(cli_args(url, job), env=cli_env(), cwd=HERE, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"batchjobs run-pending exited {proc.returncode}:\n{proc.stderr}")
    return elapsed, proc.stdout


SUMMARY = re.compile(r"batchjobs: (\d+) done, (\d+) failed")


def done_in(output: str) -> int:
    match = SUMMARY.search(output)
    return int(match.group(1)) if match else 0


# --- 1 and 2: draining a backlog -------------------------------------------------------------------


def drain_sql_client(url: URL) -> float:
    """The database's limit as a client sees it: one claim-and-mark statement per batch, commit, repeat."""
    claim_and_mark = f"""
        WITH c AS (SELECT id FROM {TABLE} WHERE NOT done ORDER BY id LIMIT {BATCH} FOR NO KEY UPDATE SKIP LOCKED)
        UPDATE {TABLE} t SET done = true FROM c WHERE t.id = c.id"""
    with pg.connect(url) as conn:
        started = time.perf_counter()
        while True:
            marked = conn.execute(claim_and_mark).rowcount
            conn.commit()
            if marked == 0:
                return time.perf_counter() - started


def drain_sql_keyset(url: URL) -> float:
    """The SQL limit's statement, each batch continuing after the last key of the one before
    (as batchjobs does), so no claim walks past the index entries of rows already done."""
    claim_and_mark = f"""
        WITH c AS (
            SELECT id FROM {TABLE} WHERE NOT done AND id > %s ORDER BY id LIMIT {BATCH} FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE {TABLE} t SET done = true FROM c WHERE t.id = c.id RETURNING t.id"""
    with pg.connect(url) as conn:
        started = time.perf_counter()
        after = 0
        while True:
            keys = [key for (key,) in conn.execute(claim_and_mark, (after,))]
            conn.commit()
            if not keys:
                return time.perf_counter() - started
            after = max(keys)


def drain_sql(url: URL) -> float:
    """The database's own limit: claim and mark a batch in one statement, commit, repeat, all server-side."""
    loop = f"""
        DO $$
        DECLARE n integer;
        BEGIN
          LOOP
            WITH c AS (SELECT id FROM {TABLE} WHERE NOT done ORDER BY id LIMIT {BATCH} FOR NO KEY UPDATE SKIP LOCKED)
            UPDATE {TABLE} t SET done = true FROM c WHERE t.id = c.id;
            GET DIAGNOSTICS n = ROW_COUNT;
            COMMIT;
            EXIT WHEN n = 0;
          END LOOP;
        END $$"""
    with pg.connect(url, autocommit=True) as conn:  # COMMIT inside DO needs no outer transaction
        started = time.perf_counter()
        conn.execute(loop)
        return time.perf_counter() - started


def drain_ideal(url: URL) -> float:
    """The least any Python runner must do: fetch a locked batch, no-op, one UPDATE, commit."""
    claim = f"SELECT id, note, done FROM {TABLE} WHERE NOT done ORDER BY id LIMIT %s FOR NO KEY UPDATE SKIP LOCKED"
    mark = f"UPDATE {TABLE} SET done = true WHERE id = ANY(%s)"
    with pg.connect(url) as conn:
        started = time.perf_counter()
        while True:
            rows = conn.execute(claim, (BATCH,)).fetchall()
            if not rows:
                conn.commit()
                return time.perf_counter() - started
            for _row in rows:
                pass  # the handler
            conn.execute(mark, ([row[0] for row in rows],))
            conn.commit()


def drain_orm_floor(url: URL) -> float:
    """The least any runner that hands handlers ORM objects must do: load a locked batch as
    SQLAlchemy ORM instances, no-op, one UPDATE, commit. The gap to the ideal loop is SQLAlchemy's."""
    from sqlalchemy import any_, bindparam, select, update
    from sqlalchemy.dialects.postgresql import ARRAY
    from sqlalchemy.orm import Session

    row = benchapp.Row
    claim = (
        select(row).where(benchapp.jobs.job("noop").pending()).order_by(row.id).limit(BATCH)
        .with_for_update(key_share=True, skip_locked=True, of=row)
    )
    mark = update(row).where(row.id == any_(bindparam("ids", type_=ARRAY(row.id.type)))).values(done=True)
    engine = sqlalchemy.create_engine(url.set(drivername="postgresql+psycopg"))
    try:
        started = time.perf_counter()
        while True:
            with Session(engine) as session:
                rows = session.scalars(claim).all()
                if not rows:
                    return time.perf_counter() - started
                session.execute(mark, {"ids": [r.id for r in rows]})
                session.commit()
    finally:
        engine.dispose()


def drain_library(job: str) -> Callable[[URL], float]:
    def drain(url: URL) -> float:
        engine = create_engine(url)  # an app has its engine already; only run_pending is timed
        try:
            started = time.perf_counter()
            run_pending(benchapp.jobs, engine, jobs=[job], batch_size=BATCH)
            return time.perf_counter() - started
        finally:
            engine.dispose()

    return drain


def drain_cli(job: str) -> Callable[[URL], float]:
    def drain(url: URL) -> float:
        return run_cli(url, job)[0]

    return drain


def drained(report: Report, url: URL, rows: int, contender: Callable[[URL], float], writes: bool = False) -> float:
    """Rows per second for one contender on a fresh backlog, after checking every row got done."""
    pg.load_rows(url, rows, done=False)
    seconds = contender(url)
    pending, notes = pg.row_counts(url)
    report.check(pending == 0 and (notes == rows if writes else True), f"drain left {pending} pending, {notes} notes")
    return rows / seconds


def drain_scenarios(server: pg.Server, sizes: Sizes, report: Report) -> None:
    n = sizes.drain
    section = f"1. Drain {n:,} rows, no-op"
    contenders = {
        "sql_limit": drain_sql_client,
        "sql_keyset": drain_sql_keyset,
        "sql_server_loop": drain_sql,
        "ideal_python": drain_ideal,
        "orm_floor": drain_orm_floor,
        "library_orm": drain_library("noop"),
        "library": drain_library("noop_columns"),
        "cli": drain_cli("noop_columns"),
    }
    with server.database("drain") as url:
        # Untimed warm-up of every contender on a small backlog: server catalog caches, plpgsql
        # compilation, SQLAlchemy's mapper set-up and statement caches, the CLI's bytecode.
        for contender in contenders.values():
            drained(report, url, 10 * BATCH, contender)
        # Interleaved rounds, best round of each: noise from other processes only ever slows a
        # contender down, so the best round is the closest to what the code itself can do.
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for round_no in range(sizes.drain_rounds):
            for name, contender in contenders.items():
                samples[name].append(drained(report, url, n, contender))
                log(f"  drain round {round_no + 1}, {name}: {rate(samples[name][-1])}")
        best = {name: max(speeds) for name, speeds in samples.items()}
        limit = best["sql_limit"]
        rounds = f"best of {sizes.drain_rounds}"
        report.add(section, f"SQL limit (one claim-and-mark statement per batch from a client, commit; {rounds})", rate(limit), "1.00")
        report.add(
            section, "the same loop, each batch continuing after the last key of the one before (keyset)",
            rate(best["sql_keyset"]), ratio(best["sql_keyset"] / limit),
        )
        report.add(
            section, "the same loop run inside the server (plpgsql DO block: no round trips at all)",
            rate(best["sql_server_loop"]), ratio(best["sql_server_loop"] / limit),
        )
        report.add(
            section, "ideal Python loop (psycopg: fetch, no-op, UPDATE, commit)", rate(best["ideal_python"]),
            ratio(best["ideal_python"] / limit),
        )
        report.add(
            section, "ORM floor (SQLAlchemy: load ORM instances, no-op, UPDATE, commit)", rate(best["orm_floor"]),
            ratio(best["orm_floor"] / limit),
        )
        orm = best["library_orm"]
        report.add(
            section, "batchjobs.run_pending, handler gets ORM objects (the default)", rate(orm), ratio(orm / limit),
            f"{ratio(orm / best['orm_floor'])} of the ORM floor",
        )
        for name, what in (
            ("library", "batchjobs.run_pending, handler gets plain rows (columns=)"),
            ("cli", "batchjobs run-pending CLI process, plain rows (columns=)"),
        ):
            share = best[name] / limit
            report.add(
                section, what, rate(best[name]), ratio(share), f">= {DRAIN_RATIO_TARGET:.2f}", verdict(share >= DRAIN_RATIO_TARGET)
            )
        drain: dict[str, Any] = {"rows": n, "batch_size": BATCH, "rounds": sizes.drain_rounds, "samples": samples, **best}
        library = best["library"]

        section = f"2. Drain {n:,} rows, handlers"
        for job, what, writes in (
            ("orm_write", "per-row handler, one ORM write per row", True),
            ("batch_noop", "batch=True handler, no-op", False),
            ("batch_write", "batch=True handler, one ORM write per row", True),
        ):
            speed = drained(report, url, n, drain_library(job), writes=writes)
            report.add(section, what, rate(speed), f"{ratio(speed / limit)} of SQL, {ratio(speed / library)} of no-op")
            drain[job] = speed
    report.data["drain_rows_per_second"] = drain


# --- 3: the idle tick ----------------------------------------------------------------------------------


def idle_in_process(urls: list[URL], runs: int) -> list[float]:
    """Median seconds of run_pending on a warm engine per database: the database side of a tick."""
    engines = [create_engine(url) for url in urls]
    try:
        samples: list[list[float]] = [[] for _ in urls]
        for attempt in range(runs + 1):
            for engine, times in zip(engines, samples):
                started = time.perf_counter()
                run_pending(benchapp.jobs, engine, jobs=["noop"])
                if attempt:  # the first call connects and warms caches
                    times.append(time.perf_counter() - started)
        return [statistics.median(times) for times in samples]
    finally:
        for engine in engines:
            engine.dispose()


IMPORT_LINE = re.compile(r"import time:\s*\d+ \|\s*(\d+) \| (\S+)$")


def import_ms(module: str, runs: int) -> float:
    """Median cumulative `python -X importtime` of ``module``'s top-level line, in milliseconds."""
    samples = []
    for attempt in range(runs + 1):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            env=cli_env(), cwd=HERE, capture_output=True, text=True, check=True,
        )
        found = [int(m.group(1)) for m in map(IMPORT_LINE.match, proc.stderr.splitlines()) if m and m.group(2) == module]
        if not found:
            raise RuntimeError(f"no top-level import line for {module} in:\n{proc.stderr[-2000:]}")
        if attempt:  # the first run may still be writing bytecode
            samples.append(found[0] / 1000)
    return statistics.median(samples)


# What any cron script on SQLAlchemy and psycopg pays before doing anything: start Python, import
# the ORM, load the PostgreSQL dialect and driver, connect, run one query.
FLOOR_SCRIPT = (
    "import sys, sqlalchemy, sqlalchemy.orm\n"
    "with sqlalchemy.create_engine(sys.argv[1]).connect() as conn:\n"
    "    conn.exec_driver_sql('SELECT 1')\n"
)


def run_floor(url: URL) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR_SCRIPT, pg.render(url)], env=cli_env(), cwd=HERE, check=True, capture_output=True)
    return time.perf_counter() - started


def idle_scenario(server: pg.Server, sizes: Sizes, report: Report) -> None:
    section = "3. Idle tick (nothing pending)"
    with server.database("idle_small") as small, server.database("idle_large") as large:
        urls = {sizes.idle_small: small, sizes.idle_large: large}
        for count, url in urls.items():
            pg.load_rows(url, count, done=True)
        for url in urls.values():
            run_cli(url, "noop")  # warm-up: bytecode, page cache, the server's catalog caches
        run_floor(small)
        samples: dict[int, list[float]] = {count: [] for count in urls}
        floor_samples = []
        for _ in range(sizes.idle_runs):
            for count, url in urls.items():  # interleaved, so drift hits all alike
                seconds, output = run_cli(url, "noop")
                report.check(output.strip() == "", f"idle run printed {output!r}")
                samples[count].append(seconds)
            floor_samples.append(run_floor(small))
        cli = {count: statistics.median(times) for count, times in samples.items()}
        floor = statistics.median(floor_samples)
        inproc = dict(zip(urls, idle_in_process(list(urls.values()), 4 * sizes.idle_runs)))
    small_s, large_s = cli[sizes.idle_small], cli[sizes.idle_large]
    growth = large_s / small_s
    report.add(
        section, f"CLI process, {sizes.idle_small:,}-row table (median of {sizes.idle_runs})", ms(small_s), "",
        f"< {ms(IDLE_SECONDS_TARGET)}", verdict(small_s < IDLE_SECONDS_TARGET),
    )
    report.add(
        section, f"CLI process, {sizes.idle_large:,}-row table (median of {sizes.idle_runs})", ms(large_s),
        f"{ratio(growth)} large/small", f"<= {IDLE_RATIO_TARGET:.2f}, < {ms(IDLE_SECONDS_TARGET)}",
        verdict(growth <= IDLE_RATIO_TARGET and large_s < IDLE_SECONDS_TARGET),
    )
    report.add(
        section, "floor: python + SQLAlchemy ORM + psycopg, connect, SELECT 1", ms(floor),
        f"tick is {ratio(large_s / floor)}x floor",
    )
    report.add(
        section, "run_pending in-process, warm engine (small / large)",
        f"{inproc[sizes.idle_small] * 1000:.1f} / {inproc[sizes.idle_large] * 1000:.1f} ms",
        f"{ratio(inproc[sizes.idle_large] / inproc[sizes.idle_small])} large/small",
    )
    imports = {module: import_ms(module, sizes.import_runs) for module in ("batchjobs", "batchjobs.cli")}
    report.add(section, "python -X importtime: import batchjobs", f"{imports['batchjobs']:.0f} ms")
    report.add(section, "python -X importtime: import batchjobs.cli", f"{imports['batchjobs.cli']:.0f} ms")
    report.data["idle"] = {
        "rows_small": sizes.idle_small,
        "rows_large": sizes.idle_large,
        "runs": sizes.idle_runs,
        "cli_seconds_samples": {str(count): times for count, times in samples.items()},
        "cli_median_seconds": {str(count): t for count, t in cli.items()},
        "cli_ratio_large_small": growth,
        "floor_seconds_samples": floor_samples,
        "floor_median_seconds": floor,
        "in_process_median_seconds": {str(count): t for count, t in inproc.items()},
        "import_ms": imports,
    }


# --- 4: concurrent runners -------------------------------------------------------------------------------


def concurrent_drain(url: URL, rows: int, processes: int, record: Path) -> dict[str, Any]:
    """Start ``processes`` runners on one fresh backlog together; time until the last one exits."""
    pg.load_rows(url, rows, done=False)
    record.unlink(missing_ok=True)
    env = cli_env(**{benchapp.RECORD_FILE_ENV: str(record)})
    started = time.perf_counter()
    running = [
        subprocess.Popen(cli_args(url, "record"), env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    outputs = [proc.communicate(timeout=3600) for proc in running]
    seconds = time.perf_counter() - started
    for proc, (_, err) in zip(running, outputs):
        if proc.returncode:
            raise RuntimeError(f"batchjobs run-pending exited {proc.returncode}:\n{err}")
    handled = [int(line) for line in record.read_text().split()]
    pending, _ = pg.row_counts(url)
    return {
        "rows_per_second": rows / seconds,
        "seconds": seconds,
        "rows_per_process": [done_in(out) for out, _ in outputs],
        "handled": len(handled),
        "distinct": len(set(handled)),
        "pending_after": pending,
        "exactly_once": len(handled) == rows and set(handled) == set(range(1, rows + 1)) and pending == 0,
    }


def concurrency_scenario(server: pg.Server, sizes: Sizes, report: Report) -> None:
    n = sizes.concurrency
    section = f"4. Concurrency, {n:,} rows"
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: [], 4: []}
    with server.database("concurrency") as url, tempfile.TemporaryDirectory() as tmp:
        for _ in range(sizes.concurrency_rounds):  # rounds interleaved; the best of each counts
            for processes, results in runs.items():
                results.append(concurrent_drain(url, n, processes, Path(tmp) / "handled.txt"))
    single = max(run["rows_per_second"] for run in runs[1])
    for processes, results in runs.items():
        best = max(results, key=lambda run: run["rows_per_second"])
        broken = [run for run in results if not run["exactly_once"]]
        status = report.check(
            not broken, f"{processes} processes: " + "; ".join(f"{r['handled']} handled, {r['distinct']} distinct, {r['pending_after']} pending" for r in broken)
        )
        rounds = f", best of {len(results)}" if len(results) > 1 else ""
        report.add(
            section, f"{processes} process{'es' if processes > 1 else ''} (rows each: {'/'.join(map(str, best['rows_per_process']))}{rounds})",
            rate(best["rows_per_second"]), f"{ratio(best['rows_per_second'] / single)} of 1 process", "each row once", status,
        )
    report.data["concurrency"] = {"rows": n, "runs": {str(processes): results for processes, results in runs.items()}}


# --- 5: an admin marks a whole table done ---------------------------------------------------------------

MARK_CHUNK = 5000  # the CLI's default --chunk-size


def mark_sql(url: URL) -> float:
    """The same work hand-written on psycopg: fetch a keyset chunk of pending keys, UPDATE them by
    key, commit. (One UPDATE ... WHERE id IN (SELECT ... LIMIT n) would be planned as a hash join
    over the whole table, once per chunk.)"""
    walk = f"SELECT id FROM {TABLE} WHERE NOT done AND id > %s ORDER BY id LIMIT {MARK_CHUNK}"
    mark = f"UPDATE {TABLE} SET done = true WHERE id = ANY(%s)"
    with pg.connect(url) as conn:
        started = time.perf_counter()
        cursor = 0
        while True:
            keys = [key for (key,) in conn.execute(walk, (cursor,))]
            if not keys:
                conn.commit()
                return time.perf_counter() - started
            conn.execute(mark, (keys,))
            conn.commit()
            cursor = keys[-1]


def mark_cli(url: URL) -> tuple[float, int, int]:
    """Wall time, peak RSS (KiB) and rows marked of one whole `batchjobs mark-done --all` process."""
    args = [*CLI, "-A", "benchapp:jobs", "--database-url", pg.render(url), "mark-done", "noop", "--all", "--yes", "--json"]
    # Output goes to files, not pipes: nobody reads a pipe while the process runs, so it could fill.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, env=cli_env(), cwd=HERE, stdout=out, stderr=err)
        # wait4 gives this child's own resource usage; ru_maxrss is its peak resident set, in KiB on Linux.
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"batchjobs mark-done exited {proc.returncode}:\n{err.read().decode()}")
        return elapsed, usage.ru_maxrss, int(json.loads(out.read())["rows"])


def mark_scenario(server: pg.Server, sizes: Sizes, report: Report) -> None:
    section = f"5. mark-done --all, {sizes.mark_large:,} rows"
    results: dict[int, dict[str, Any]] = {}
    with server.database("mark") as url:
        pg.load_rows(url, sizes.mark_small, done=False)
        mark_cli(url)  # warm-up: bytecode, the server's catalog caches
        for n in (sizes.mark_small, sizes.mark_large):
            pg.load_rows(url, n, done=False)
            sql_seconds = mark_sql(url)
            pg.load_rows(url, n, done=False)
            seconds, peak_kib, marked = mark_cli(url)
            pending, _ = pg.row_counts(url)
            report.check(marked == n and pending == 0, f"mark-done on {n} rows: {marked} marked, {pending} pending")
            results[n] = {"rows": n, "seconds": seconds, "rows_per_second": n / seconds, "peak_rss_kib": peak_kib,
                          "sql_seconds": sql_seconds, "sql_rows_per_second": n / sql_seconds}
    small, large = results[sizes.mark_small], results[sizes.mark_large]
    growth = large["peak_rss_kib"] / small["peak_rss_kib"]
    report.add(
        section, f"hand-written psycopg loop: keyset chunks of {MARK_CHUNK:,}, SELECT keys, UPDATE, commit",
        rate(large["sql_rows_per_second"]), "1.00",
    )
    report.add(
        section, "batchjobs mark-done --all CLI process (start-up included)", rate(large["rows_per_second"]),
        ratio(large["rows_per_second"] / large["sql_rows_per_second"]),
    )
    report.add(
        section, f"peak RSS of that process, {sizes.mark_small:,} / {sizes.mark_large:,} rows",
        f"{small['peak_rss_kib'] / 1024:.0f} / {large['peak_rss_kib'] / 1024:.0f} MiB", f"{ratio(growth)} large/small",
        f"<= {MARK_RSS_RATIO_TARGET:.2f} (flat in N)", verdict(growth <= MARK_RSS_RATIO_TARGET),
    )
    report.data["mark_done_all"] = {"chunk_size": MARK_CHUNK, "runs": {str(n): r for n, r in results.items()}, "rss_ratio_large_small": growth}


# --- 6: what the flag costs the app's inserts ----------------------------------------------------------------


def insert_scenario(server: pg.Server, sizes: Sizes, report: Report) -> None:
    section = "6. App INSERT cost"
    flagged, plain = benchapp.FlaggedSignup.__tablename__, benchapp.PlainSignup.__tablename__
    statements = {name: f"INSERT INTO {name} (email) VALUES (%s)" for name in (flagged, plain)}
    per_round: dict[str, list[float]] = {flagged: [], plain: []}  # seconds per insert, each round
    with server.database("inserts") as url, pg.connect(url, autocommit=True) as conn:
        # Existing, already-handled rows, so the new ones go into tables of a realistic size.
        conn.execute(
            f"INSERT INTO {flagged} (email, welcome_sent) SELECT 'old' || g || '@example.com', true FROM generate_series(1, %s) g",
            (sizes.insert_preload,),
        )
        conn.execute(f"INSERT INTO {plain} (email) SELECT 'old' || g || '@example.com' FROM generate_series(1, %s) g", (sizes.insert_preload,))
        conn.execute(f"VACUUM ANALYZE {flagged}")
        conn.execute(f"VACUUM ANALYZE {plain}")
        conn.execute("CHECKPOINT")
        for round_no in range(sizes.insert_rounds):
            # Short rounds, alternating which table goes first: both halves of a round see the
            # same machine, and the median over rounds ignores a round hit by a burst of noise.
            for table in (flagged, plain) if round_no % 2 == 0 else (plain, flagged):
                started = time.perf_counter()
                for i in range(sizes.inserts_per_round):
                    conn.execute(statements[table], (f"user{round_no}.{i}@example.com",))  # autocommit: one commit each
                per_round[table].append((time.perf_counter() - started) / sizes.inserts_per_round)
        pending = conn.execute(f"SELECT count(*) FROM {flagged} WHERE NOT welcome_sent").fetchone()
    inserted = sizes.insert_rounds * sizes.inserts_per_round
    report.check(pending is not None and pending[0] == inserted, f"{pending} of {inserted} inserted rows are pending")
    ratios = [f / p for f, p in zip(per_round[flagged], per_round[plain])]
    cost = statistics.median(ratios)
    typical = {table: statistics.median(times) for table, times in per_round.items()}
    detail = f"{sizes.insert_rounds} rounds x {sizes.inserts_per_round}, each committed; medians"
    report.add(section, f"plain table ({detail})", f"{typical[plain] * 1e6:.0f} us/insert", "1.00")
    report.add(
        section, "with flag_column + pending index", f"{typical[flagged] * 1e6:.0f} us/insert",
        f"{ratio(cost)} of plain (rounds: {ratio(min(ratios))}-{ratio(max(ratios))})",
    )
    report.data["inserts"] = {
        "preloaded_rows": sizes.insert_preload,
        "rounds": sizes.insert_rounds,
        "inserts_per_round": sizes.inserts_per_round,
        "seconds_per_insert_each_round": {"plain": per_round[plain], "flagged": per_round[flagged]},
        "ratio_each_round": ratios,
        "ratio_flagged_plain_median": cost,
    }


# --- the run ---------------------------------------------------------------------------------------------


def machine(server: pg.Server) -> dict[str, Any]:
    def proc_field(path: str, key: str) -> str | None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return None
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)

    mem_kb = proc_field("/proc/meminfo", "MemTotal")
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()

    # The code measured is the working tree: note when it differs from the commit.
    commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "../batchjobs") else "")
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "ram_gib": round(int(mem_kb.split()[0]) / 1024**2, 1) if mem_kb else None,
        "os": platform.platform(),
        "postgresql": server.version(),
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "batchjobs_commit": commit or None,
    }


@contextmanager
def server_url(database_url: str | None) -> Iterator[str]:
    if database_url:
        yield database_url
    else:
        with pg.embedded_server() as url:
            yield url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", metavar="URL", help="PostgreSQL server to use (a role that may CREATE DATABASE). Default: embedded.")
    parser.add_argument("--quick", action="store_true", help="Small sizes, well under a minute: for CI.")
    parser.add_argument("--json", type=Path, metavar="PATH", help="Where to write the results (default: results/latest.json; a temp file with --quick).")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    report = Report(mode="quick" if args.quick else "full")
    started = time.perf_counter()
    with server_url(args.database_url) as url:
        server = pg.Server(url)
        report.data["machine"] = machine(server)
        log(f"batchjobs benchmarks ({report.mode}) on PostgreSQL {report.data['machine']['postgresql'].split()[0]}")
        # Other processes on the machine skew every number; the load average documents how busy it was.
        load = report.data["load_average_1min"] = {"start": os.getloadavg()[0]}
        for scenario in (drain_scenarios, idle_scenario, concurrency_scenario, mark_scenario, insert_scenario):
            scenario(server, sizes, report)
            load[f"after_{scenario.__name__}"] = os.getloadavg()[0]
    report.data.update(
        mode=report.mode, sizes=asdict(sizes), seconds=time.perf_counter() - started,
        targets={
            "drain_ratio_min": DRAIN_RATIO_TARGET, "idle_ratio_max": IDLE_RATIO_TARGET, "idle_seconds_max": IDLE_SECONDS_TARGET,
            "mark_rss_ratio_max": MARK_RSS_RATIO_TARGET,
        },
        table=[asdict(line) for line in report.lines], failures=report.failures,
    )
    if args.json:
        path = args.json
    elif args.quick:
        path = Path(tempfile.mkstemp(prefix="batchjobs-bench-", suffix=".json")[1])
    else:
        path = HERE / "results" / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.data, indent=2) + "\n")

    m = report.data["machine"]
    print(f"batchjobs benchmarks, {report.mode} mode, batch size {BATCH}, {report.data['seconds']:.0f} s")
    print(f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, PostgreSQL {m['postgresql'].split()[0]}, Python {m['python']}")
    print(f"load average (1 min) at start: {load['start']:.2f}")
    print()
    print(report.markdown())
    print()
    print(f"JSON: {path}")
    for failure in report.failures:
        print(f"FAILED CHECK: {failure}")
    # Missed targets are reported, not fatal; a broken guarantee (a row lost or run twice) is.
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
