"""Benchmarks for batchjobs on PostgreSQL, each measured beside the database's own limit.

    python benchmarks/run.py [--database-url URL] [--quick] [--json PATH]
                             [--baseline REV] [--callgrind] [--scenarios NAME,...]
    python benchmarks/run.py --database mysql --database-url mysql://root@127.0.0.1:3306/ [--quick] [--baseline REV]

Without --database-url a throwaway embedded PostgreSQL is started. With --database mysql, the
drain, idle and concurrency scenarios and a polling worker's latency and throughput run on that
MySQL or MariaDB server instead. The worker's scenarios live in workerbench.py. Results are
printed as a markdown table and written as JSON; README.md in this folder explains every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchapp
import pg
import psycopg
import sqlalchemy
import webbench
from sqlalchemy.engine import URL

from batchjobs import run_pending
from batchjobs.db import create_engine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the checkout whose batchjobs is "the current code"
BATCH = benchapp.BATCH_SIZE
TABLE = benchapp.Row.__tablename__

# Targets. Throughput is compared as a ratio to the SQL loop on the same server in the same run,
# because absolute numbers move with the machine and its neighbours.
DRAIN_RATIO_TARGET = 0.5  # the CLI process, plain rows, of the SQL limit
PLAIN_KEYSET_TARGET = 0.75  # run_pending with plain rows, of the keyset SQL loop, with and without a listener
ORM_KEYSET_TARGET = 0.45  # the same with ORM objects
# Client instructions per row, current code / baseline: "no higher", give or take what differs
# between two runs of the same code (two checkouts of one commit: 0.05% apart on a quiet machine,
# 0.35% on a busy one).
CALLGRIND_TOLERANCE = 1.01
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
    callgrind: int
    celery_plain: int
    celery_batchjobs: int
    celery_latency: int


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
    callgrind=5_000,
    celery_plain=10_000,
    celery_batchjobs=200_000,
    celery_latency=200,
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
    callgrind=5_000,
    celery_plain=500,
    celery_batchjobs=20_000,
    celery_latency=20,
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


# --- the code measured: this checkout, and optionally a baseline revision ------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()


@dataclass(frozen=True)
class Code:
    """A checkout whose batchjobs a drain process imports: this one, or a worktree of another revision."""

    name: str  # key in the JSON and in contender names: "current" or "baseline"
    label: str  # for the table: "current code" or "baseline e8ad01f"
    root: Path

    def env(self) -> dict[str, str]:
        # The checkout first, then this folder (benchapp): every revision runs the same app, and
        # neither the caller's PYTHONPATH nor the installed package can stand in for the checkout
        # (drain_once.py checks where batchjobs came from).
        return cli_env(PYTHONPATH=os.pathsep.join([str(self.root), str(HERE)]))


CURRENT = Code("current", "current code", ROOT)


@contextmanager
def baseline_code(revision: str | None) -> Iterator[Code | None]:
    """A detached git worktree of ``revision`` in a temporary directory, removed on exit."""
    if revision is None:
        yield None
        return
    commit = git("rev-parse", "--short", "--verify", "--quiet", f"{revision}^{{commit}}")
    if not commit:
        raise SystemExit(f"--baseline {revision}: not a commit of this repository")
    parent = Path(tempfile.mkdtemp(prefix="batchjobs-bench-baseline-"))
    tree = parent / "src"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=HERE, check=True, capture_output=True)
    try:
        yield Code("baseline", f"baseline {commit}", tree)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=HERE, capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=HERE, capture_output=True)


DRAIN_ONCE = HERE / "drain_once.py"


def drain_once(code: Code, url: URL, *args: str, wrapper: Sequence[str] = ()) -> dict[str, Any]:
    """Run drain_once.py on ``code`` in a process of its own (under ``wrapper``, e.g. valgrind); its JSON."""
    command = [*wrapper, sys.executable, str(DRAIN_ONCE), "--root", str(code.root), "--url", pg.render(url), *args]
    env = code.env()
    if wrapper:
        env["PYTHONHASHSEED"] = "0"  # the same set and dict layouts in every run: countable instructions
    proc = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        raise RuntimeError(f"drain_once.py on the {code.label} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


@contextmanager
def code_database(server: pg.Server, label: str, code: Code) -> Iterator[URL]:
    """A fresh database whose tables ``code`` created itself: each revision runs against the
    batchjobs schema it expects, even where a later revision added a migration."""
    with server.database(f"{label}_{code.name}", setup=lambda url: drain_once(code, url, "--setup")) as url:
        yield url


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


def drain_process(code: Code, job: str, listener: bool = False) -> Callable[[URL], float]:
    """batchjobs.run_pending on ``code`` in a process of its own (drain_once.py), on an engine made
    beforehand: connecting is timed, interpreter start-up and imports are not. With ``listener``, a
    no-op global before_cursor_execute listener is installed first, as a tracing tool would."""

    def drain(url: URL) -> float:
        return float(drain_once(code, url, "--job", job, *(["--listener"] if listener else []))["seconds"])

    return drain


def drain_cli(job: str) -> Callable[[URL], float]:
    def drain(url: URL) -> float:
        return run_cli(url, job)[0]

    return drain


def rows_of(url: URL) -> Any:
    """pg or mysqlbench: the module that loads and counts bench_rows on this URL's database."""
    if url.get_backend_name() in ("mysql", "mariadb"):
        import mysqlbench

        return mysqlbench
    return pg


def drained(report: Report, url: URL, rows: int, contender: Callable[[URL], float], writes: bool = False) -> float:
    """Rows per second for one contender on a fresh backlog, after checking every row got done."""
    rows_of(url).load_rows(url, rows, done=False)
    seconds = contender(url)
    pending, notes = rows_of(url).row_counts(url)
    report.check(pending == 0 and (notes == rows if writes else True), f"drain left {pending} pending, {notes} notes")
    return rows / seconds


@dataclass(frozen=True)
class Kind:
    """What a no-op handler is handed, the benchapp job that hands it, and its target."""

    name: str
    job: str
    what: str
    target: float  # of the keyset SQL loop


KINDS = (
    Kind("plain", "noop_columns", "handler gets plain rows (columns=)", PLAIN_KEYSET_TARGET),
    Kind("orm", "noop", "handler gets ORM objects (the default)", ORM_KEYSET_TARGET),
)
LISTENER = "with a no-op global before_cursor_execute listener"


def contender_name(code: Code, kind: Kind, listener: bool) -> str:
    return f"{code.name}_{kind.name}" + ("_listener" if listener else "")


def drain_scenarios(server: pg.Server, sizes: Sizes, report: Report, codes: Sequence[Code] = (CURRENT,)) -> None:
    n = sizes.drain
    section = f"1. Drain {n:,} rows, no-op"
    with ExitStack() as databases:
        urls = {code.name: databases.enter_context(code_database(server, "drain", code)) for code in codes}
        url = urls[CURRENT.name]
        # Each contender with the database its backlog is loaded into: a revision's run_pending
        # drains a database of its own; everything else, the current code's.
        contenders: dict[str, tuple[Callable[[URL], float], URL]] = {
            "sql_limit": (drain_sql_client, url),
            "sql_keyset": (drain_sql_keyset, url),
            "sql_server_loop": (drain_sql, url),
            "ideal_python": (drain_ideal, url),
            "orm_floor": (drain_orm_floor, url),
        }
        # The revisions' runs of one variant back to back, so that a burst of noise from other
        # processes tends to hit both.
        for kind in KINDS:
            for listener in (False, True):
                for code in codes:
                    contenders[contender_name(code, kind, listener)] = (drain_process(code, kind.job, listener), urls[code.name])
        contenders["cli"] = (drain_cli("noop_columns"), url)
        # Untimed warm-up of every contender on a small backlog: server catalog caches, plpgsql
        # compilation, SQLAlchemy's mapper set-up and statement caches, every process's bytecode.
        for contender, where in contenders.values():
            drained(report, where, 10 * BATCH, contender)
        # Interleaved rounds, best round of each: noise from other processes only ever slows a
        # contender down, so the best round is the closest to what the code itself can do.
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for round_no in range(sizes.drain_rounds):
            for name, (contender, where) in contenders.items():
                samples[name].append(drained(report, where, n, contender))
                log(f"  drain round {round_no + 1}, {name}: {rate(samples[name][-1])}")
        best = {name: max(speeds) for name, speeds in samples.items()}
        limit, keyset = best["sql_limit"], best["sql_keyset"]
        rounds = f"best of {sizes.drain_rounds}"
        report.add(section, f"SQL limit (one claim-and-mark statement per batch from a client, commit; {rounds})", rate(limit), "1.00")
        report.add(
            section, "keyset SQL loop: the same, each batch continuing after the last key of the one before",
            rate(keyset), ratio(keyset / limit),
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
        for kind in KINDS:
            for listener in (False, True):
                for code in codes:
                    speed = best[contender_name(code, kind, listener)]
                    what = f"batchjobs.run_pending, {kind.what}, {code.label}" + (f", {LISTENER}" if listener else "")
                    shares = f"{ratio(speed / keyset)} of keyset, {ratio(speed / limit)} of SQL limit"
                    if kind.name == "orm":
                        shares += f", {ratio(speed / best['orm_floor'])} of ORM floor"
                    if code.name == CURRENT.name:  # the targets are the current code's
                        share = speed / keyset
                        report.add(section, what, rate(speed), shares, f">= {kind.target:.2f} of keyset", verdict(share >= kind.target))
                    else:
                        current = best[contender_name(CURRENT, kind, listener)]
                        report.add(section, what, rate(speed), f"{shares}; current code {ratio(current / speed)}x")
        share = best["cli"] / limit
        report.add(
            section, "batchjobs run-pending CLI process, plain rows (columns=), start-up included", rate(best["cli"]),
            ratio(share), f">= {DRAIN_RATIO_TARGET:.2f}", verdict(share >= DRAIN_RATIO_TARGET),
        )
        drain: dict[str, Any] = {
            "rows": n, "batch_size": BATCH, "rounds": sizes.drain_rounds, "codes": {code.name: code.label for code in codes},
            "samples": samples, **best,
        }
        plain = best[contender_name(CURRENT, KINDS[0], False)]

        section = f"2. Drain {n:,} rows, handlers"
        for job, what, writes in (
            ("orm_write", "per-row handler, one ORM write per row", True),
            ("batch_noop", "batch=True handler, no-op", False),
            ("batch_write", "batch=True handler, one ORM write per row", True),
        ):
            speed = drained(report, url, n, drain_process(CURRENT, job), writes=writes)
            report.add(section, what, rate(speed), f"{ratio(speed / limit)} of SQL, {ratio(speed / plain)} of no-op")
            drain[job] = speed
    report.data["drain_rows_per_second"] = drain


def mysql_drain_scenario(server: Any, sizes: Sizes, report: Report, codes: Sequence[Code] = (CURRENT,)) -> None:
    """MySQL/MariaDB: run_pending and the CLI process beside the database's own keyset SQL loop;
    with a baseline revision, its run_pending too, on a database its own migrations made."""
    import mysqlbench

    n = sizes.drain
    section = f"1. Drain {n:,} rows, no-op"
    with ExitStack() as databases:
        urls = {code.name: databases.enter_context(code_database(server, "drain", code)) for code in codes}
        url = urls[CURRENT.name]
        contenders: dict[str, tuple[Callable[[URL], float], URL]] = {"sql_keyset": (mysqlbench.drain_sql_keyset, url)}
        for kind in KINDS:
            for code in codes:
                name = kind.name if code.name == CURRENT.name else contender_name(code, kind, False)
                contenders[name] = (drain_process(code, kind.job), urls[code.name])
        contenders["cli"] = (drain_cli("noop_columns"), url)
        for contender, where in contenders.values():  # untimed warm-up, as on PostgreSQL
            drained(report, where, 10 * BATCH, contender)
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for round_no in range(sizes.drain_rounds):
            for name, (contender, where) in contenders.items():
                samples[name].append(drained(report, where, n, contender))
                log(f"  drain round {round_no + 1}, {name}: {rate(samples[name][-1])}")
    best = {name: max(speeds) for name, speeds in samples.items()}
    limit = best["sql_keyset"]
    report.add(
        section, f"SQL limit (one claim-and-mark statement per batch from a client, keyset, commit; best of {sizes.drain_rounds})",
        rate(limit), "1.00",
    )
    for kind in KINDS:
        speed = best[kind.name]
        report.add(section, f"batchjobs.run_pending, {kind.what}, {CURRENT.label}", rate(speed), f"{ratio(speed / limit)} of SQL limit")
        for code in codes[1:]:
            other = best[contender_name(code, kind, False)]
            report.add(
                section, f"batchjobs.run_pending, {kind.what}, {code.label}", rate(other),
                f"{ratio(other / limit)} of SQL limit; current code {ratio(speed / other)}x",
            )
    share = best["cli"] / limit
    report.add(
        section, "batchjobs run-pending CLI process, plain rows (columns=), start-up included", rate(best["cli"]),
        ratio(share), f">= {DRAIN_RATIO_TARGET:.2f}", verdict(share >= DRAIN_RATIO_TARGET),
    )
    report.data["drain_rows_per_second"] = {
        "rows": n, "batch_size": BATCH, "rounds": sizes.drain_rounds, "codes": {code.name: code.label for code in codes},
        "samples": samples, **best,
    }


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
            rows_of(url).load_rows(url, count, done=True)
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
    rows_of(url).load_rows(url, rows, done=False)
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
    pending, _ = rows_of(url).row_counts(url)
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


# --- 7: client instructions per row ------------------------------------------------------------------------

# callgrind's output file ends with the run's total of each event; by default the only event is Ir,
# instructions executed. Older valgrind versions write "summary:", newer ones "totals:" as well.
CALLGRIND_TOTAL = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def callgrind_instructions(code: Code, url: URL, kind: Kind, listener: bool, out: Path) -> int:
    """Instructions one drain_once.py process executes, start to exit. Only the client's: the
    server's backend is another process, which callgrind does not follow.

    The run leaves out what the clock drives (``--no-clock``): the run history's heartbeats, every
    few seconds, and early commits of chunks that take over a second. valgrind slows the process
    some fifty-fold, so these would count many times what a real run of the same rows pays, and
    vary with the machine's load.
    """
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    drain_once(code, url, "--job", kind.job, "--no-clock", *(["--listener"] if listener else []), wrapper=wrapper)
    match = CALLGRIND_TOTAL.search(out.read_text())
    if match is None:
        raise RuntimeError(f"no summary or totals line in {out}")
    return int(match.group(1))


def callgrind_scenario(server: pg.Server, sizes: Sizes, report: Report, codes: Sequence[Code] = (CURRENT,)) -> None:
    """Client instructions per drained row, each contender without and with a tracing listener.

    Each drain is counted three times: with nothing pending (start-up, imports, connecting: to
    subtract), with ``n`` rows and with ``2 n``. Per row over ``n`` rows includes what a run pays
    once (its statements built and compiled at the first chunks); the rows from ``n`` to ``2 n``
    show what every further chunk costs.
    """
    n = sizes.callgrind
    section = f"7. Client instructions per row, {n:,} rows (callgrind)"
    counts: dict[str, dict[str, int]] = {}
    per_row: dict[str, float] = {}
    further: dict[str, float] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for code in codes:
            url = stack.enter_context(code_database(server, "callgrind", code))
            for kind in KINDS:
                for listener in (False, True):
                    name = contender_name(code, kind, listener)
                    # A drain at full speed first: it writes the bytecode, so that no counted run compiles.
                    drained(report, url, 10 * BATCH, drain_process(code, kind.job, listener))
                    total: dict[int, int] = {}
                    for rows in (0, n, 2 * n):
                        pg.load_rows(url, rows, done=False)
                        total[rows] = callgrind_instructions(code, url, kind, listener, tmp / f"{name}-{rows}.out")
                        pending, _ = pg.row_counts(url)
                        report.check(pending == 0, f"callgrind drain ({code.label}, {kind.job}) left {pending} pending")
                    counts[name] = {"idle": total[0], "drain": total[n], "drain_twice": total[2 * n]}
                    per_row[name] = (total[n] - total[0]) / n
                    further[name] = (total[2 * n] - total[n]) / n
                    log(f"  callgrind, {name}: {per_row[name]:,.0f} instructions/row, {further[name]:,.0f} from row {n:,} on")
    others = [code for code in codes if code.name != CURRENT.name]
    for kind in KINDS:
        for listener in (False, True):
            for code in codes:
                name = contender_name(code, kind, listener)
                what = f"batchjobs.run_pending process, {kind.what}, {code.label}" + (f", {LISTENER}" if listener else "")
                result = f"{per_row[name]:,.0f} instructions/row ({further[name]:,.0f} from row {n:,} on)"
                if code.name == CURRENT.name and others:
                    baseline = contender_name(others[0], kind, listener)
                    share = per_row[name] / per_row[baseline]
                    report.add(
                        section, what, result,
                        f"{share:.3f} of baseline ({further[name] / further[baseline]:.3f} from row {n:,} on)",
                        f"<= baseline (+{CALLGRIND_TOLERANCE - 1:.1%})", verdict(share <= CALLGRIND_TOLERANCE),
                    )
                else:
                    report.add(section, what, result)
    report.data["callgrind"] = {
        "rows": n, "codes": {code.name: code.label for code in codes}, "instructions": counts,
        "instructions_per_row": per_row, "instructions_per_row_from_n": further,
    }


# --- the run ---------------------------------------------------------------------------------------------


def machine(server: Any, database: str = "postgresql") -> dict[str, Any]:
    def proc_field(path: str, key: str) -> str | None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return None
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)

    mem_kb = proc_field("/proc/meminfo", "MemTotal")
    # The code measured is the working tree: note when it differs from the commit.
    commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "../batchjobs") else "")
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor(),
        "ram_gib": round(int(mem_kb.split()[0]) / 1024**2, 1) if mem_kb else None,
        "os": platform.platform(),
        database: server.version(),
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "batchjobs_commit": commit or None,
    }


def check_import_origin() -> None:
    """The in-process contenders and the CLI use the installed batchjobs, the drain processes this
    checkout: say so when they are not the same files (with a non-editable install they are copies)."""
    import batchjobs

    where = Path(batchjobs.__file__).resolve()
    if not where.is_relative_to(ROOT):
        log(f"note: this process imported batchjobs from {where}; run_pending's drain processes import {ROOT / 'batchjobs'}")


@contextmanager
def server_url(database_url: str | None) -> Iterator[str]:
    if database_url:
        yield database_url
    else:
        with pg.embedded_server() as url:
            yield url


# --- 8: Celery -----------------------------------------------------------------------------------------


def celery_scenario(server: pg.Server, sizes: Sizes, report: Report) -> None:
    """Plain Celery beside batchjobs.celery on one Redis, and dispatch latency (see celerybench.py)."""
    try:
        import celerybench
    except ImportError as error:
        report.add("8. Celery", f"skipped: {error} (pip install 'batchjobs[celery]')", "")
        return

    celerybench.celery_scenario(server, report, sizes.celery_plain, sizes.celery_batchjobs, sizes.celery_latency)


def worker_scenario(name: str) -> Callable[..., None]:
    """A scenario of workerbench.py (`batchjobs worker`), imported when it runs: it imports this module."""

    def scenario(server: Any, sizes: Sizes, report: Report) -> None:
        import workerbench

        workerbench.SCENARIOS[name](server, sizes, report)

    scenario.__name__ = f"{name}_scenario"
    return scenario


WORKER_SCENARIOS = ("worker_latency", "worker_throughput", "worker_idle", "worker_memory", "trigger_insert")
SCENARIOS: dict[str, Callable[..., None]] = {
    "drain": drain_scenarios,
    "idle": idle_scenario,
    "concurrency": concurrency_scenario,
    "mark": mark_scenario,
    "inserts": insert_scenario,
    "celery": celery_scenario,
    "callgrind": callgrind_scenario,
    "web": webbench.web_scenario,
    **{name: worker_scenario(name) for name in WORKER_SCENARIOS},
}
BY_DEFAULT = [name for name in SCENARIOS if name != "callgrind"]
#: What runs with --database mysql: the drain beside MySQL's own SQL loop, the idle tick, concurrency,
#: and a polling worker's latency and throughput.
MYSQL_SCENARIOS: dict[str, Callable[..., None]] = {
    "drain": mysql_drain_scenario,
    "idle": idle_scenario,
    "concurrency": concurrency_scenario,
    "worker_latency": worker_scenario("worker_latency"),
    "worker_throughput": worker_scenario("worker_throughput"),
}
WITH_BASELINE = ("drain", "callgrind")  # the scenarios that measure a baseline revision beside the current code


def scenario_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SCENARIOS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["postgresql", "mysql"], default="postgresql", help="Which database to measure. Default: postgresql.")
    parser.add_argument(
        "--database-url", metavar="URL",
        help="Server to use (a role that may CREATE DATABASE). Default: an embedded PostgreSQL; required with --database mysql.",
    )
    parser.add_argument("--quick", action="store_true", help="Small sizes, about two minutes (the worker scenarios under one): for CI.")
    parser.add_argument("--json", type=Path, metavar="PATH", help="Where to write the results (default: results/latest.json; a temp file with --quick).")
    parser.add_argument(
        "--baseline", metavar="REV",
        help="Also measure run_pending (drain, callgrind) on this git revision, from a temporary worktree, in the same run.",
    )
    parser.add_argument("--callgrind", action="store_true", help="Add the callgrind scenario: client instructions per drained row (slow).")
    parser.add_argument(
        "--scenarios", type=scenario_names, metavar="NAME,...",
        help=f"Run only these, in this order ({', '.join(SCENARIOS)}). Default: all but callgrind.",
    )
    args = parser.parse_args(argv)
    mysql = args.database == "mysql"
    if mysql:
        if not args.database_url:
            parser.error("--database mysql needs --database-url, e.g. mysql://root@127.0.0.1:3306/")
        if args.callgrind or any(name not in MYSQL_SCENARIOS for name in args.scenarios or ()):
            parser.error(f"with --database mysql, choose scenarios from {', '.join(MYSQL_SCENARIOS)} (no --callgrind)")
    scenarios = MYSQL_SCENARIOS if mysql else SCENARIOS
    selected = list(args.scenarios or (MYSQL_SCENARIOS if mysql else BY_DEFAULT))
    if args.callgrind and "callgrind" not in selected:
        selected.append("callgrind")
    if "callgrind" in selected and shutil.which("valgrind") is None:
        parser.error("the callgrind scenario needs valgrind on PATH")
    sizes = QUICK if args.quick else FULL
    report = Report(mode="quick" if args.quick else "full")
    started = time.perf_counter()
    check_import_origin()
    with baseline_code(args.baseline) as baseline, server_url(args.database_url) as url:
        codes = [CURRENT, *([baseline] if baseline else [])]
        if mysql:
            import mysqlbench

            server: Any = mysqlbench.Server(url)
        else:
            server = pg.Server(url)
        report.data["machine"] = machine(server, args.database)
        report.data["baseline"] = {"revision": args.baseline, "label": baseline.label} if baseline else None
        database = f"{'MySQL/MariaDB' if mysql else 'PostgreSQL'} {report.data['machine'][args.database].split()[0]}"
        log(f"batchjobs benchmarks ({report.mode}) on {database}")
        # Other processes on the machine skew every number; the load average documents how busy it was.
        load = report.data["load_average_1min"] = {"start": os.getloadavg()[0]}
        timings = report.data["scenario_seconds"] = {}
        for name in selected:
            scenario = scenarios[name]
            scenario_started = time.perf_counter()
            if name in WITH_BASELINE:
                scenario(server, sizes, report, codes)
            else:
                scenario(server, sizes, report)
            timings[name] = time.perf_counter() - scenario_started
            load[f"after_{scenario.__name__}"] = os.getloadavg()[0]
    report.data.update(
        mode=report.mode, sizes=asdict(sizes), scenarios=selected, seconds=time.perf_counter() - started,
        targets={
            "drain_ratio_min": DRAIN_RATIO_TARGET, "drain_plain_keyset_min": PLAIN_KEYSET_TARGET,
            "drain_orm_keyset_min": ORM_KEYSET_TARGET, "callgrind_ratio_max": CALLGRIND_TOLERANCE,
            "idle_ratio_max": IDLE_RATIO_TARGET, "idle_seconds_max": IDLE_SECONDS_TARGET, "mark_rss_ratio_max": MARK_RSS_RATIO_TARGET,
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
    print(f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {database}, Python {m['python']}")
    print(f"load average (1 min) at start: {load['start']:.2f}")
    if baseline:
        print(f"{baseline.label}: --baseline {args.baseline}, beside the current code ({m['batchjobs_commit']}, {CURRENT.root})")
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
