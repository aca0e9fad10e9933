"""`batchjobs worker` benchmarks: pickup latency, throughput, an idle worker's cost, memory, and
what the pending trigger costs the app's inserts. run.py runs them as scenarios 8 to 12.

Every worker is a real `batchjobs worker` process; README.md in this folder explains each number.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchapp
import pg
import run
from pgwire import StatementProxy
from sqlalchemy import Engine, insert, text
from sqlalchemy.engine import URL

from batchjobs.db import create_engine
from batchjobs.migrate import migrate
from batchjobs.store.postgresql import PostgreSQLStore
from batchjobs.worker import trigger_sql

# Targets, from the worker's issue.
LATENCY_P50_TARGET = 0.010  # seconds from the app's COMMIT to the handler's start, PostgreSQL with triggers
LATENCY_P99_TARGET = 0.100
THROUGHPUT_TARGET = 0.9  # a worker's drain of a backlog, of run-pending's on the same backlog
IDLE_CPU_TARGET = 1.0  # percent of one core
MEMORY_RATIO_TARGET = 1.10  # RSS after the large count of rows / after the small count
TRIGGER_RATIO_TARGET = 1.10  # app INSERT with the pending trigger / without

#: Commits per second of the app in the latency scenario.
RATE = 50
TABLE = benchapp.Row.__tablename__


@dataclass(frozen=True)
class WorkerSizes:
    latency_seconds: float  # PostgreSQL, woken by the trigger
    polled_seconds: float  # SQLite and MySQL/MariaDB, per poll interval
    poll_intervals: tuple[str, ...]
    throughput_rows: int
    throughput_rounds: int
    idle_seconds: float
    backstop: str  # the worker's --backstop-interval while idle
    memory_wave: int
    memory_waves: int
    memory_gap: float  # seconds idle after each wave
    insert_preload: int
    insert_rounds: int
    inserts_per_round: int
    batch_rows: int
    batch_rounds: int


FULL = WorkerSizes(
    latency_seconds=60, polled_seconds=30, poll_intervals=("1s", "100ms"), throughput_rows=200_000, throughput_rounds=3,
    idle_seconds=120, backstop="30s", memory_wave=100_000, memory_waves=10, memory_gap=3.0,
    insert_preload=100_000, insert_rounds=20, inserts_per_round=500, batch_rows=10_000, batch_rounds=10,
)
QUICK = WorkerSizes(
    latency_seconds=5, polled_seconds=3, poll_intervals=("100ms",), throughput_rows=5_000, throughput_rounds=2,
    idle_seconds=11, backstop="5s", memory_wave=10_000, memory_waves=10, memory_gap=0.5,
    insert_preload=10_000, insert_rounds=6, inserts_per_round=150, batch_rows=10_000, batch_rounds=2,
)


def sizes_for(report: Any) -> WorkerSizes:
    return QUICK if report.mode == "quick" else FULL


# --- a worker process -----------------------------------------------------------------------------


def worker_args(url: str, job: str, *options: str) -> list[str]:
    return [*run.CLI, "-A", "benchapp:jobs", "--database-url", url, "worker", "-j", job, "--batch-size", str(run.BATCH), *options]


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    out: Any
    err: Any

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited {self.proc.returncode}:\n{self.output()[1][-4000:]}")

    def output(self) -> tuple[str, str]:
        self.out.seek(0)
        self.err.seek(0)
        return self.out.read().decode(), self.err.read().decode()


@contextmanager
def worker(url: str, job: str, *options: str, **env: str) -> Iterator[Worker]:
    """A `batchjobs worker` process, stopped with SIGTERM on exit; it must exit 0, without a traceback."""
    # Output goes to files, not pipes: nobody reads a pipe while the worker runs.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(worker_args(url, job, *options), env=run.cli_env(**env), cwd=run.HERE, stdout=out, stderr=err)
        handle = Worker(proc, out, err)
        try:
            yield handle
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stdout, stderr = handle.output()
        if proc.returncode or "Traceback" in stderr:
            raise RuntimeError(f"the worker exited {proc.returncode}:\n{stderr[-4000:]}")
        handle.out, handle.err = stdout, stderr  # kept for the caller's checks


def wait_until(condition: Callable[[], bool], what: str, timeout: float, proc: Worker | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None:
            proc.alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def install_triggers(url: URL) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            for statement in trigger_sql(benchapp.jobs, engine):
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


@contextmanager
def sqlite_database() -> Iterator[str]:
    """A SQLite file holding the benchmark app's tables and batchjobs' own, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="batchjobs-bench-sqlite-") as folder:
        url = f"sqlite:///{folder}/bench.db"
        engine = create_engine(url)
        try:
            benchapp.Base.metadata.create_all(engine)
            migrate(engine)
        finally:
            engine.dispose()
        yield url


def percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(values), "min": min(values), "count": len(values)}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if abs(seconds) < 0.1 else f"{seconds * 1000:.0f} ms"


# --- 8: pickup latency ----------------------------------------------------------------------------


def read_stamps(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    stamps: dict[int, float] = {}
    for line in path.read_text().splitlines():
        key, at = line.split()
        stamps[int(key)] = float(at)
    return stamps


def pickup_latency(url: str, seconds: float, *options: str) -> dict[str, Any]:
    """The app inserts and commits one row at a time (a transaction each, as an app's session
    does), RATE a second on a fixed schedule, for ``seconds``; a worker (``options``) handles them. Latency: the handler's time.time() at its start minus the
    app's time.time() right after its COMMIT returned, matched by row id."""
    engine = create_engine(url)
    with tempfile.TemporaryDirectory() as tmp:
        stamps_file = Path(tmp) / "stamps.txt"
        insert_row = text(f"INSERT INTO {TABLE} (id) VALUES (:id)")
        with worker(url, "stamp", *options, **{benchapp.STAMP_FILE_ENV: str(stamps_file)}) as proc, engine.connect() as conn:
            # Warm-up: rows until the first is handled (the worker is up and waiting), then a second
            # at the load's pace, untimed.
            key = 0
            while True:
                key += 1
                conn.execute(insert_row, {"id": key})
                conn.commit()
                if read_stamps(stamps_file):
                    break
                proc.alive()
                time.sleep(0.2)
            for _ in range(RATE):
                key += 1
                conn.execute(insert_row, {"id": key})
                conn.commit()
                time.sleep(1 / RATE)
            wait_until(lambda: len(read_stamps(stamps_file)) == key, "the warm-up rows", 30, proc)
            first, count = key + 1, int(seconds * RATE)
            committed: dict[int, float] = {}
            behind: list[float] = []
            start = time.monotonic() + 0.05
            for i in range(count):
                # On a schedule, not a sleep per row: a slow commit does not shift the ones after it.
                due = start + i / RATE
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                behind.append(max(-wait, 0.0))
                conn.execute(insert_row, {"id": first + i})
                conn.commit()
                committed[first + i] = time.time()
            wait_until(lambda: len(read_stamps(stamps_file)) >= key + count, "every row to be handled", 60, proc)
        stamps = read_stamps(stamps_file)
    engine.dispose()
    latencies = [stamps[row] - at for row, at in committed.items() if row in stamps]
    return {
        **percentiles(latencies),
        "handled": len(latencies),
        "committed": len(committed),
        "schedule_behind_max": max(behind),
        "worker_output": proc.out.strip(),
        "latencies": latencies,
    }


def latency_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    database = "MySQL/MariaDB" if isinstance(server.url, URL) and server.url.get_backend_name() == "mysql" else "PostgreSQL"
    section = f"8. Worker pickup latency, {RATE} single-row commits/s"
    results: dict[str, dict[str, Any]] = {}

    def add(name: str, what: str, result: dict[str, Any], targets: bool) -> None:
        results[name] = result
        report.check(result["handled"] == result["committed"], f"{what}: {result['handled']} of {result['committed']} rows handled")
        summary = f"p50 {ms(result['p50'])}, p90 {ms(result['p90'])}, p99 {ms(result['p99'])}, max {ms(result['max'])}"
        detail = f"{result['count']} rows; schedule behind at most {ms(result['schedule_behind_max'])}"
        if targets:
            ok = result["p50"] < LATENCY_P50_TARGET and result["p99"] < LATENCY_P99_TARGET
            report.add(section, what, summary, detail, f"p50 < {ms(LATENCY_P50_TARGET)}, p99 < {ms(LATENCY_P99_TARGET)}", run.verdict(ok))
        else:
            report.add(section, what, summary, detail)

    with server.database("worker_latency") as url:
        if database == "PostgreSQL":
            install_triggers(url)
            seconds = sizes.latency_seconds
            add("postgresql_trigger", f"PostgreSQL, woken by the trigger ({seconds:.0f} s)", pickup_latency(pg.render(url), seconds), True)
        else:
            for interval in sizes.poll_intervals:
                rows_of = run.rows_of(url)
                rows_of.load_rows(url, 0, done=False)
                result = pickup_latency(pg.render(url), sizes.polled_seconds, "--poll-interval", interval)
                add(f"mysql_poll_{interval}", f"{database}, polled every {interval} ({sizes.polled_seconds:.0f} s)", result, False)
    if database == "PostgreSQL":  # SQLite needs no server: it comes with the PostgreSQL run
        for interval in sizes.poll_intervals:
            with sqlite_database() as sqlite_url:
                result = pickup_latency(sqlite_url, sizes.polled_seconds, "--poll-interval", interval)
            add(f"sqlite_poll_{interval}", f"SQLite, polled every {interval} ({sizes.polled_seconds:.0f} s)", result, False)
    report.data["worker_latency"] = {"rate_per_second": RATE, "results": results}


# --- 9: throughput --------------------------------------------------------------------------------


def worker_drain(job: str, rows: int) -> Callable[[URL], float]:
    """Wall time of a whole `batchjobs worker --max-rows N` process on a backlog of N rows, start-up
    included, as run-pending's is measured: it drains, finds it has handled N rows, and exits."""

    def drain(url: URL) -> float:
        args = worker_args(pg.render(url), job, "--max-rows", str(rows))
        started = time.perf_counter()
        proc = subprocess.run(args, env=run.cli_env(), cwd=run.HERE, capture_output=True, text=True, timeout=3600)
        elapsed = time.perf_counter() - started
        if proc.returncode or "stopped by max-rows" not in proc.stdout:
            raise RuntimeError(f"batchjobs worker exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}")
        return elapsed

    return drain


def throughput_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    n, job = sizes.throughput_rows, "noop_columns"
    section = f"9. Worker throughput, {n:,} rows, no-op"
    with server.database("worker_throughput") as url:
        if url.get_backend_name() == "postgresql":
            install_triggers(url)  # as in production: the trigger on, the load's INSERT notifies
        contenders = {"run_pending": run.drain_cli(job), "worker": worker_drain(job, n)}
        run.drained(report, url, 10 * run.BATCH, run.drain_cli(job))  # warm-up: bytecode, caches
        run.drained(report, url, 10 * run.BATCH, worker_drain(job, 10 * run.BATCH))
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for round_no in range(sizes.throughput_rounds):
            order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
            for name in order:
                samples[name].append(run.drained(report, url, n, contenders[name]))
                run.log(f"  worker throughput round {round_no + 1}, {name}: {run.rate(samples[name][-1])}")
    best = {name: max(speeds) for name, speeds in samples.items()}
    median = {name: statistics.median(speeds) for name, speeds in samples.items()}
    per_round = [w / r for w, r in zip(samples["worker"], samples["run_pending"])]
    share = best["worker"] / best["run_pending"]
    rounds = f"best of {sizes.throughput_rounds}, median {run.rate(median['run_pending'])}"
    report.add(section, f"batchjobs run-pending CLI process, plain rows ({rounds})", run.rate(best["run_pending"]), "1.00")
    report.add(
        section, f"batchjobs worker --max-rows {n:,} process, same backlog (best of {sizes.throughput_rounds}, median {run.rate(median['worker'])})",
        run.rate(best["worker"]), f"{run.ratio(share)} of run-pending (rounds: {', '.join(run.ratio(r) for r in per_round)})",
        f">= {THROUGHPUT_TARGET:.2f}", run.verdict(share >= THROUGHPUT_TARGET),
    )
    report.data["worker_throughput"] = {
        "rows": n, "job": job, "samples": samples, "best": best, "median": median, "ratio_each_round": per_round, "ratio_best": share,
    }


# --- 10: an idle worker ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def upstream_of(url: URL) -> tuple[str, int] | str:
    """Where the proxy connects: the server's TCP address, or its Unix socket's path."""
    host = url.host or url.query.get("host") or "/tmp"
    assert isinstance(host, str)
    if not host.startswith("/"):
        return (host, url.port or 5432)
    with pg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('port')").fetchone()
    assert row is not None
    return f"{host}/.s.PGSQL.{row[0]}"


def kind_of(sql: str) -> str:
    words = sql.strip().split(None, 1)
    first = words[0].upper() if words else ""
    if "batchjobs_runs" in sql:
        return "run history heartbeat"
    if "SKIP LOCKED" in sql.upper():
        return "claim"
    if first in ("BEGIN", "COMMIT", "ROLLBACK"):
        return first
    return sql.strip()[:60]


def idle_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    window = sizes.idle_seconds
    section = f"10. Idle worker, PostgreSQL with triggers, {window:.0f} s"
    with server.database("worker_idle") as url:
        pg.load_rows(url, 10_000, done=True)
        install_triggers(url)
        with StatementProxy(upstream_of(url)) as proxy:
            proxied = url.set(host="127.0.0.1", port=proxy.port, query={"sslmode": "disable"})
            with worker(pg.render(proxied), "noop", "--backstop-interval", sizes.backstop) as proc:
                # Idle once it has listened and made its first claim (which found nothing).
                def settled() -> bool:
                    seen = [s.sql for s in proxy.between(0, time.monotonic())]
                    listened = next((i for i, sql in enumerate(seen) if sql.startswith("LISTEN")), None)
                    return listened is not None and any(kind_of(sql) == "claim" for sql in seen[listened:])

                wait_until(settled, "the worker's first drain", 60, proc)
                time.sleep(1.0)  # that drain's COMMIT
                cpu_before, start = cpu_seconds(proc.proc.pid), time.monotonic()
                time.sleep(window)
                cpu_after, end = cpu_seconds(proc.proc.pid), time.monotonic()
                statements = proxy.between(start, end)
                rss = rss_kib(proc.proc.pid)
    minutes = (end - start) / 60
    kinds: dict[str, int] = {}
    for statement in statements:
        kinds[kind_of(statement.sql)] = kinds.get(kind_of(statement.sql), 0) + 1
    claims = kinds.get("claim", 0)
    heartbeat = kinds.get("run history heartbeat", 0)
    cpu = (cpu_after - cpu_before) / (end - start) * 100
    polls_target = 60 / float(sizes.backstop.rstrip("s"))
    report.add(
        section, f"backstop polls (claims) per minute, --backstop-interval {sizes.backstop}", f"{claims / minutes:.1f}/min",
        f"{claims} in {end - start:.0f} s", f"<= {polls_target:.0f}/min", run.verdict(claims / minutes <= polls_target + 0.5),
    )
    breakdown = ", ".join(f"{name}: {count}" for name, count in sorted(kinds.items(), key=lambda kv: -kv[1]))
    others = len(statements) - claims
    report.add(
        section, "statements per minute, everything the worker sent (its own connections, through a counting proxy)",
        f"{len(statements) / minutes:.1f}/min", breakdown or "none",
        "only the backstop polls'", run.verdict(heartbeat == 0),
    )
    report.add(
        section, "CPU of the worker process (utime + stime, /proc/<pid>/stat)", f"{cpu:.2f}% of a core",
        f"RSS {rss / 1024:.0f} MiB", f"< {IDLE_CPU_TARGET:.0f}%", run.verdict(cpu < IDLE_CPU_TARGET),
    )
    report.data["worker_idle"] = {
        "window_seconds": end - start, "backstop_interval": sizes.backstop, "statements_by_kind": kinds,
        "statements_per_minute": len(statements) / minutes, "claims_per_minute": claims / minutes,
        "other_statements": others, "cpu_percent_of_core": cpu, "rss_kib": rss,
        "statements": [{"at": s.at - start, "connection": s.connection, "sql": s.sql[:200]} for s in statements],
    }


# --- 11: memory -----------------------------------------------------------------------------------


def pending_rows(url: URL) -> int:
    with pg.connect(url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE NOT done").fetchone()
    assert row is not None
    return int(row[0])


def memory_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    wave, waves = sizes.memory_wave, sizes.memory_waves
    total = wave * waves
    section = f"11. Worker memory, {waves} waves of {wave:,} rows"
    rss: list[int] = []
    with server.database("worker_memory") as url:
        pg.load_rows(url, 0, done=False)
        install_triggers(url)
        with worker(pg.render(url), "noop") as proc, pg.connect(url, autocommit=True) as app:
            for number in range(waves):
                # One INSERT per wave: the trigger wakes the worker once, it drains, then it idles.
                app.execute(
                    f"INSERT INTO {TABLE} (id) SELECT g FROM generate_series(%s::int, %s::int) g",
                    (number * wave + 1, (number + 1) * wave),
                )
                wait_until(lambda: pending_rows(url) == 0, f"wave {number + 1} to be handled", 600, proc)
                time.sleep(sizes.memory_gap)
                rss.append(rss_kib(proc.proc.pid))
                run.log(f"  worker memory after {(number + 1) * wave:,} rows: {rss[-1] / 1024:.1f} MiB")
        done = run.done_in(proc.out)
    report.check(done == total, f"the memory worker handled {done} of {total} rows")
    growth = rss[-1] / rss[0]
    report.add(
        section, f"RSS of the worker after {wave:,} / {total:,} rows (VmRSS, after {sizes.memory_gap:g} s idle)",
        f"{rss[0] / 1024:.1f} / {rss[-1] / 1024:.1f} MiB", f"{run.ratio(growth)} large/small",
        f"<= {MEMORY_RATIO_TARGET:.2f}", run.verdict(growth <= MEMORY_RATIO_TARGET),
    )
    report.data["worker_memory"] = {"wave": wave, "waves": waves, "idle_gap_seconds": sizes.memory_gap, "rss_kib_after_each_wave": rss, "ratio": growth}


# --- 12: what the trigger costs the app's inserts -------------------------------------------------


def trigger_insert_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    section = "12. App INSERT cost of the pending trigger"
    plain_table, triggered_table = benchapp.FlaggedSignup.__table__, benchapp.TriggeredSignup.__table__
    tables = {"without": plain_table.name, "with": triggered_table.name}
    with server.database("trigger_insert") as url, pg.connect(url, autocommit=True) as conn:
        for statement in PostgreSQLStore.pending_trigger_sql(triggered_table.name, "welcome_sent", boolean=True):
            conn.execute(statement)
        for name in tables.values():
            conn.execute(
                f"INSERT INTO {name} (email, welcome_sent) SELECT 'old' || g || '@example.com', true FROM generate_series(1, %s) g",
                (sizes.insert_preload,),
            )
            conn.execute(f"VACUUM ANALYZE {name}")
        conn.execute("CHECKPOINT")
        engine = create_engine(url)
        try:
            single = timed_rounds(
                sizes.insert_rounds, lambda name, r: single_rows(conn, name, r, sizes.inserts_per_round), tables, per=sizes.inserts_per_round
            )
            tables_by_name = {"without": plain_table, "with": triggered_table}
            orm = timed_rounds(
                sizes.batch_rounds, lambda name, r: sqlalchemy_batch(engine, tables_by_name, name, r, sizes.batch_rows), tables
            )
            many = timed_rounds(sizes.batch_rounds, lambda name, r: executemany_batch(url, name, r, sizes.batch_rows), tables)
        finally:
            engine.dispose()
        counts = {}
        for key, name in tables.items():
            row = conn.execute(f"SELECT count(*) FILTER (WHERE NOT welcome_sent), count(*) FROM {name}").fetchone()
            counts[key] = row
    report.check(counts["with"] == counts["without"], f"inserted rows differ between the tables: {counts}")
    results = {}
    for key, what, result, unit in (
        ("single", f"single-row INSERT, autocommit ({sizes.insert_rounds} rounds x {sizes.inserts_per_round})", single, "us/insert"),
        ("sqlalchemy_batch", f"{sizes.batch_rows:,}-row batch, SQLAlchemy insert() with a list (insertmanyvalues: 1,000-row statements), one transaction ({sizes.batch_rounds} rounds)", orm, "ms/batch"),
        ("executemany_batch", f"{sizes.batch_rows:,}-row batch, psycopg executemany (a statement per row, pipelined), one transaction ({sizes.batch_rounds} rounds)", many, "ms/batch"),
    ):
        scale = 1e6 if unit.startswith("us") else 1e3
        cost = statistics.median(result["ratios"])
        report.add(
            section, what,
            f"{result['without'] * scale:,.0f} -> {result['with'] * scale:,.0f} {unit}",
            f"{run.ratio(cost)} with/without (rounds: {run.ratio(min(result['ratios']))}-{run.ratio(max(result['ratios']))})",
            f"<= {TRIGGER_RATIO_TARGET:.2f}", run.verdict(cost <= TRIGGER_RATIO_TARGET),
        )
        results[key] = {**result, "ratio_median": cost}
    report.data["trigger_insert"] = {"preloaded_rows": sizes.insert_preload, "batch_rows": sizes.batch_rows, **results}


def timed_rounds(rounds: int, insert_round: Callable[[str, int], None], tables: dict[str, str], per: int = 1) -> dict[str, Any]:
    """Seconds (per ``per`` rows) of each table's part of each round, alternating which goes first;
    one untimed round first. Ratios per round: both halves of a round saw the same machine."""
    seconds: dict[str, list[float]] = {"without": [], "with": []}
    for round_no in range(-1, rounds):
        order = ["without", "with"] if round_no % 2 == 0 else ["with", "without"]
        for key in order:
            started = time.perf_counter()
            insert_round(tables[key], round_no)
            if round_no >= 0:
                seconds[key].append((time.perf_counter() - started) / per)
    ratios = [w / wo for w, wo in zip(seconds["with"], seconds["without"])]
    return {"seconds": seconds, "ratios": ratios, "without": statistics.median(seconds["without"]), "with": statistics.median(seconds["with"])}


def emails(round_no: int, count: int, kind: str) -> list[str]:
    return [f"{kind}{round_no}.{i}@example.com" for i in range(count)]


def single_rows(conn: Any, table: str, round_no: int, count: int) -> None:
    for email in emails(round_no, count, "single"):
        conn.execute(f"INSERT INTO {table} (email) VALUES (%s)", (email,))  # autocommit: one commit each


def sqlalchemy_batch(engine: Engine, tables: dict[str, Any], table: str, round_no: int, count: int) -> None:
    target = next(t for t in tables.values() if t.name == table)
    with engine.begin() as connection:
        connection.execute(insert(target), [{"email": email} for email in emails(round_no, count, "orm")])


def executemany_batch(url: URL, table: str, round_no: int, count: int) -> None:
    with pg.connect(url) as conn, conn.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {table} (email) VALUES (%s)", [(e,) for e in emails(round_no, count, "many")])
        conn.commit()


SCENARIOS = {
    "worker_latency": latency_scenario,
    "worker_throughput": throughput_scenario,
    "worker_idle": idle_scenario,
    "worker_memory": memory_scenario,
    "trigger_insert": trigger_insert_scenario,
}
#: What runs with --database mysql: MySQL and MariaDB have no notifications, so no idle or trigger scenario.
MYSQL_SCENARIOS = ("worker_latency", "worker_throughput")
