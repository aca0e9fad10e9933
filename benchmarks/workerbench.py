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
from sqlalchemy import Connection, MetaData, Table, insert, text
from sqlalchemy.engine import URL

from batchjobs.db import create_engine
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
    insert_preload=100_000, insert_rounds=40, inserts_per_round=250, batch_rows=10_000, batch_rounds=20,
)
QUICK = WorkerSizes(
    latency_seconds=5, polled_seconds=3, poll_intervals=("100ms",), throughput_rows=5_000, throughput_rounds=2,
    idle_seconds=9, backstop="4s", memory_wave=5_000, memory_waves=10, memory_gap=0.3,
    insert_preload=10_000, insert_rounds=6, inserts_per_round=100, batch_rows=10_000, batch_rounds=2,
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
    #: What it printed, once it has exited.
    stdout: str = ""
    stderr: str = ""

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
        handle.stdout, handle.stderr = handle.output()
        if proc.returncode or "Traceback" in handle.stderr:
            raise RuntimeError(f"the worker exited {proc.returncode}:\n{handle.stderr[-4000:]}")


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
        benchapp.create_tables(url)
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
    does), RATE a second on a fixed schedule, for ``seconds``; a worker (``options``) handles
    them. Latency: the handler's time.time() at its start minus the app's time.time() right
    after its COMMIT returned, matched by row id."""
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
        # A row handled twice has two lines: the dictionary keeps one.
        twice = len(stamps_file.read_text().splitlines()) - len(stamps)
    engine.dispose()
    latencies = [stamps[row] - at for row, at in committed.items() if row in stamps]
    return {
        **percentiles(latencies),
        "handled": len(latencies),
        "committed": len(committed),
        "handled_twice": twice,
        "schedule_behind_max": max(behind),
        "worker_output": proc.stdout.strip(),
        "latencies": latencies,
    }


def latency_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    database = "MySQL/MariaDB" if server.url.get_backend_name() in ("mysql", "mariadb") else "PostgreSQL"
    section = f"10. Worker pickup latency, {RATE} single-row commits/s"
    results: dict[str, dict[str, Any]] = {}

    def add(name: str, what: str, result: dict[str, Any], targets: bool) -> None:
        results[name] = result
        report.check(
            result["handled"] == result["committed"] and not result["handled_twice"],
            f"{what}: {result['handled']} of {result['committed']} rows handled, {result['handled_twice']} twice",
        )
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


def timed_process(args: list[str]) -> tuple[float, float, str]:
    """Wall time, CPU time (user + system, from wait4) and output of one whole process. CPU time
    moves much less than wall time with what else the machine runs."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, env=run.cli_env(), cwd=run.HERE, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        output = out.read().decode()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args[:8])} ... exited {proc.returncode}:\n{err.read().decode()[-4000:]}")
        return elapsed, usage.ru_utime + usage.ru_stime, output


def run_pending_process(job: str) -> Callable[[URL, int], tuple[float, float]]:
    def drain(url: URL, _rows: int) -> tuple[float, float]:
        elapsed, cpu, _ = timed_process(run.cli_args(url, job))
        return elapsed, cpu

    return drain


def worker_process(job: str) -> Callable[[URL, int], tuple[float, float]]:
    """A whole `batchjobs worker --max-rows N` process on a backlog of N rows, start-up included,
    as run-pending's is measured: it drains, finds it has handled N rows, and exits."""

    def drain(url: URL, rows: int) -> tuple[float, float]:
        elapsed, cpu, output = timed_process(worker_args(pg.render(url), job, "--max-rows", str(rows)))
        if "stopped by max-rows" not in output:
            raise RuntimeError(f"the worker did not stop by max-rows: {output}")
        return elapsed, cpu

    return drain


def drained(report: Any, url: URL, rows: int, contender: Callable[[URL, int], tuple[float, float]]) -> tuple[float, float]:
    """(rows per second, CPU microseconds per row) of one contender on a fresh backlog, after
    checking that no row is left pending."""
    rows_of = run.rows_of(url)
    rows_of.load_rows(url, rows, done=False)
    elapsed, cpu = contender(url, rows)
    pending, _ = rows_of.row_counts(url)
    report.check(pending == 0, f"a drain left {pending} of {rows} rows pending")
    return rows / elapsed, cpu / rows * 1e6


def throughput_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    n, job = sizes.throughput_rows, "noop_columns"
    section = f"11. Worker throughput, {n:,} rows, no-op"
    contenders = {"run_pending": run_pending_process(job), "worker": worker_process(job)}
    speed: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    with server.database("worker_throughput") as url:
        if url.get_backend_name() == "postgresql":
            install_triggers(url)  # as in production: the trigger on, the load's INSERT notifies
        for contender in contenders.values():
            drained(report, url, 10 * run.BATCH, contender)  # warm-up: bytecode, caches
        for round_no in range(sizes.throughput_rounds):
            order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
            for name in order:
                rows_per_second, cpu_per_row = drained(report, url, n, contenders[name])
                speed[name].append(rows_per_second)
                cpu[name].append(cpu_per_row)
                run.log(f"  worker throughput round {round_no + 1}, {name}: {run.rate(rows_per_second)}, {cpu_per_row:.0f} us CPU/row")
    best = {name: max(values) for name, values in speed.items()}
    median = {name: statistics.median(values) for name, values in speed.items()}
    least_cpu = {name: min(values) for name, values in cpu.items()}
    per_round = [w / r for w, r in zip(speed["worker"], speed["run_pending"])]
    share = best["worker"] / best["run_pending"]
    cpu_share = least_cpu["run_pending"] / least_cpu["worker"]
    rounds = sizes.throughput_rounds
    report.add(
        section, f"batchjobs run-pending CLI process, plain rows (best of {rounds}; median {run.rate(median['run_pending'])})",
        run.rate(best["run_pending"]), "1.00",
    )
    report.add(
        section, f"batchjobs worker --max-rows {n:,} process, same backlog (best of {rounds}; median {run.rate(median['worker'])})",
        run.rate(best["worker"]), f"{run.ratio(share)} of run-pending (rounds: {', '.join(run.ratio(r) for r in per_round)})",
        f">= {THROUGHPUT_TARGET:.2f}", run.verdict(share >= THROUGHPUT_TARGET),
    )
    report.add(
        section, "client CPU per row (user + system of the process, least of the rounds): run-pending / worker",
        f"{least_cpu['run_pending']:.1f} / {least_cpu['worker']:.1f} us", f"worker at {run.ratio(cpu_share)} of run-pending's rows per CPU second",
    )
    report.data["worker_throughput"] = {
        "rows": n, "job": job, "rows_per_second": speed, "cpu_us_per_row": cpu, "best": best, "median": median,
        "least_cpu_us_per_row": least_cpu, "ratio_each_round": per_round, "ratio_best": share, "cpu_ratio": cpu_share,
    }


# --- 10: an idle worker ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu_seconds(pid: int) -> float:
    """CPU time so far of a PostgreSQL server process on this host; NaN where it cannot be read
    (a server on another host, or a local one this user may not look into)."""
    try:
        if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return float("nan")
        return cpu_seconds(pid)
    except OSError:
        return float("nan")


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
    section = f"12. Idle worker, PostgreSQL with triggers, {window:.0f} s"
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
    cpu = (cpu_after - cpu_before) / (end - start) * 100
    interval = float(sizes.backstop.rstrip("s"))
    # A window of k intervals holds k polls, or k + 1 when one lands right at its start or end.
    most = int((end - start) // interval) + 1
    report.add(
        section, f"backstop polls (claims) per minute, --backstop-interval {sizes.backstop}", f"{claims / minutes:.1f}/min",
        f"{claims} in {end - start:.0f} s", f"<= 1 per {sizes.backstop} ({most} in the window)", run.verdict(claims <= most),
    )
    breakdown = ", ".join(f"{name}: {count}" for name, count in sorted(kinds.items(), key=lambda kv: -kv[1]))
    # What an idle worker may send: a transaction per backstop poll (BEGIN, the claim, ROLLBACK or
    # COMMIT), and its run history heartbeat, which `status` and `check --min-workers` read and which
    # an idle worker writes once per 30 s (a worker silent for 60 s counts as gone). Anything else,
    # or either more often, is a miss. A pooled connection opened in the window adds one check.
    beats = kinds.get("run history heartbeat", 0)
    beats_most = int((end - start) // 30) + 1
    setup = {kind for kind in kinds if kind.startswith("SELECT host(client_addr)")}
    allowed = {"claim", "run history heartbeat", "BEGIN", "COMMIT", "ROLLBACK", *setup}
    checks = sum(kinds[kind] for kind in setup)
    idle_only = set(kinds) <= allowed and beats <= beats_most and kinds.get("BEGIN", 0) <= claims + beats + checks
    others = len(statements) - claims
    report.add(
        section, "statements per minute, everything the worker sent (its own connections, through a counting proxy)",
        f"{len(statements) / minutes:.1f}/min", breakdown or "none",
        f"only the backstop polls' and the heartbeat's (<= 1 per 30 s: {beats_most} in the window)", run.verdict(idle_only),
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


def pending_rows(conn: Any) -> int:
    row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE NOT done").fetchone()
    assert row is not None
    return int(row[0])


def memory_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    wave, waves = sizes.memory_wave, sizes.memory_waves
    total = wave * waves
    section = f"13. Worker memory, {waves} waves of {wave:,} rows"
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
                wait_until(lambda: pending_rows(app) == 0, f"wave {number + 1} to be handled", 600, proc)
                time.sleep(sizes.memory_gap)
                rss.append(rss_kib(proc.proc.pid))
                run.log(f"  worker memory after {(number + 1) * wave:,} rows: {rss[-1] / 1024:.1f} MiB")
        done = run.done_in(proc.stdout)
    report.check(done == total, f"the memory worker handled {done} of {total} rows")
    growth = rss[-1] / rss[0]
    report.add(
        section, f"RSS of the worker after {wave:,} / {total:,} rows (VmRSS, after {sizes.memory_gap:g} s idle)",
        f"{rss[0] / 1024:.1f} / {rss[-1] / 1024:.1f} MiB", f"{run.ratio(growth)} large/small",
        f"<= {MEMORY_RATIO_TARGET:.2f}", run.verdict(growth <= MEMORY_RATIO_TARGET),
    )
    report.data["worker_memory"] = {"wave": wave, "waves": waves, "idle_gap_seconds": sizes.memory_gap, "rss_kib_after_each_wave": rss, "ratio": growth}


# --- 12: what the trigger costs the app's inserts -------------------------------------------------


#: The control table's trigger: a statement trigger that calls an empty function, to tell the
#: cost of firing a trigger from the cost of the NOTIFY itself.
EMPTY_TRIGGER = [
    "CREATE FUNCTION bench_empty_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
    "CREATE TRIGGER bench_empty AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION bench_empty_trigger()",
]


def trigger_insert_scenario(server: Any, _sizes: Any, report: Any) -> None:
    sizes = sizes_for(report)
    section = "14. App INSERT cost of the pending trigger"
    flagged = benchapp.FlaggedSignup.__table__
    tables = {
        "without": flagged,
        "with": benchapp.TriggeredSignup.__table__,
        "empty_trigger": flagged.to_metadata(MetaData(), name="bench_signups_control"),
    }
    with server.database("trigger_insert") as url, pg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {tables['empty_trigger'].name} (LIKE {flagged.name} INCLUDING ALL)")
        for statement in PostgreSQLStore.pending_trigger_sql(tables["with"].name, "welcome_sent", boolean=True):
            conn.execute(statement)
        for statement in EMPTY_TRIGGER:
            conn.execute(statement.format(table=tables["empty_trigger"].name))
        for table in tables.values():
            conn.execute(
                f"INSERT INTO {table.name} (email, welcome_sent) SELECT 'old' || g || '@example.com', true FROM generate_series(1, %s) g",
                (sizes.insert_preload,),
            )
            conn.execute(f"VACUUM ANALYZE {table.name}")
        conn.execute("CHECKPOINT")
        engine = create_engine(url)
        try:
            with engine.connect() as app:
                backend = app.connection.driver_connection.info.backend_pid  # type: ignore[union-attr]
                single = timed_rounds(
                    sizes.insert_rounds, backend, tables, lambda table, r: single_rows(app, table, r, sizes.inserts_per_round),
                    per=sizes.inserts_per_round,
                )
                multi = timed_rounds(sizes.batch_rounds, backend, tables, lambda table, r: batch(app, table, r, sizes.batch_rows, returning=True))
                per_row = timed_rounds(sizes.batch_rounds, backend, tables, lambda table, r: batch(app, table, r, sizes.batch_rows, returning=False))
        finally:
            engine.dispose()
        counts = {key: conn.execute(f"SELECT count(*) FILTER (WHERE NOT welcome_sent), count(*) FROM {table.name}").fetchone() for key, table in tables.items()}
    report.check(len(set(counts.values())) == 1, f"inserted rows differ between the tables: {counts}")
    results = {}
    for key, what, result, unit in (
        ("single", f"single-row INSERT, each committed ({sizes.insert_rounds} rounds x {sizes.inserts_per_round})", single, "us/insert"),
        (
            "multi_row_batch",
            f"{sizes.batch_rows:,}-row batch, multi-row INSERTs (SQLAlchemy insert().returning() with a list: 1,000 rows a statement), one commit ({sizes.batch_rounds} rounds)",
            multi, "ms/batch",
        ),
        (
            "per_row_batch",
            f"{sizes.batch_rows:,}-row batch, an INSERT per row (SQLAlchemy insert() with a list: psycopg executemany, pipelined), one commit ({sizes.batch_rounds} rounds)",
            per_row, "ms/batch",
        ),
    ):
        scale = 1e6 if unit.startswith("us") else 1e3
        cost = statistics.median(result["ratios"]["with"])
        control = statistics.median(result["ratios"]["empty_trigger"])
        cpu = result["cpu_ratio"]
        report.add(
            section, what,
            f"{result['median']['without'] * scale:,.0f} -> {result['median']['with'] * scale:,.0f} {unit}",
            f"{run.ratio(cost)} with/without (rounds: {run.ratio(min(result['ratios']['with']))}-{run.ratio(max(result['ratios']['with']))}); "
            f"server CPU {run.ratio(cpu['with'])}; an empty trigger instead: {run.ratio(control)}, server CPU {run.ratio(cpu['empty_trigger'])}",
            f"<= {TRIGGER_RATIO_TARGET:.2f}", run.verdict(cost <= TRIGGER_RATIO_TARGET),
        )
        results[key] = {**result, "ratio_median": cost, "empty_trigger_ratio_median": control}
    report.data["trigger_insert"] = {"preloaded_rows": sizes.insert_preload, "batch_rows": sizes.batch_rows, **results}


def timed_rounds(rounds: int, backend: int, tables: dict[str, Any], insert_round: Callable[[Any, int], None], per: int = 1) -> dict[str, Any]:
    """Seconds (per ``per`` rows) of each table's part of each round, rotating which goes first,
    after one untimed round; ratios to "without" per round, since a round's parts saw the same
    machine.

    Also the CPU time of the server process (``backend``, on this host) that ran the inserts:
    what a trigger adds is work in that process, and CPU time moves much less than wall time
    with the machine's other load. Clock ticks are 10 ms, so it is summed over all rounds.
    """
    keys = list(tables)
    seconds: dict[str, list[float]] = {key: [] for key in keys}
    cpu: dict[str, float] = {key: 0.0 for key in keys}
    for round_no in range(-1, rounds):
        shift = round_no % len(keys)
        for key in keys[shift:] + keys[:shift]:
            cpu_before, started = server_cpu_seconds(backend), time.perf_counter()
            insert_round(tables[key], round_no)
            if round_no >= 0:
                seconds[key].append((time.perf_counter() - started) / per)
                cpu[key] += server_cpu_seconds(backend) - cpu_before
    return {
        "seconds": seconds,
        "median": {key: statistics.median(values) for key, values in seconds.items()},
        "ratios": {key: [a / b for a, b in zip(seconds[key], seconds["without"])] for key in keys},
        "backend_cpu_seconds": cpu,
        "cpu_ratio": {key: cpu[key] / cpu["without"] if cpu["without"] > 0 else float("nan") for key in keys},
    }


def emails(round_no: int, count: int, kind: str) -> list[dict[str, str]]:
    return [{"email": f"{kind}{round_no}.{i}@example.com"} for i in range(count)]


def single_rows(app: Connection, table: Table, round_no: int, count: int) -> None:
    statement = insert(table)
    for row in emails(round_no, count, "single"):
        app.execute(statement, row)
        app.commit()


def batch(app: Connection, table: Table, round_no: int, count: int, returning: bool) -> None:
    # With RETURNING, SQLAlchemy sends multi-row INSERTs ("insertmanyvalues"); without, psycopg's
    # executemany sends an INSERT per row, in a pipeline. Either is what apps on SQLAlchemy send.
    statement = insert(table).returning(table.c.id) if returning else insert(table)
    app.execute(statement, emails(round_no, count, "multi" if returning else "many"))
    app.commit()


SCENARIOS = {
    "worker_latency": latency_scenario,
    "worker_throughput": throughput_scenario,
    "worker_idle": idle_scenario,
    "worker_memory": memory_scenario,
    "trigger_insert": trigger_insert_scenario,
}
#: What runs with --database mysql: MySQL and MariaDB have no notifications, so no idle or trigger scenario.
MYSQL_SCENARIOS = ("worker_latency", "worker_throughput")
