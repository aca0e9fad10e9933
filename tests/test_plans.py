"""The pending query rides the partial index: O(pending), not O(table). Checked with EXPLAIN."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import jobapp
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from batchjobs.store import store_for
from batchjobs.store.postgresql import FAILURES_NOW
from batchjobs.store.tables import Failure


def _is_mysql(engine: Engine) -> bool:
    return engine.dialect.name in ("mysql", "mariadb")


def numbers_sql(count: int) -> str:
    """MySQL/MariaDB: a derived table of n = 1..count (a power of ten), from cross-joined digits."""
    digits = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)"
    places = len(str(count)) - 1
    value = " + ".join(f"d{i}.d * {10 ** i}" for i in range(places))
    joined = ", ".join(f"{digits} d{i}" for i in range(places))
    return f"(SELECT {value} + 1 AS n FROM {joined})"


def _big_table_few_pending(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("INSERT INTO items (id, category, processed) SELECT g, 'a', true FROM generate_series(1, 200000) g"))
        elif _is_mysql(engine):
            conn.execute(text(f"INSERT INTO items (id, category, processed) SELECT n, 'a', true FROM {numbers_sql(100000)} g"))
            conn.execute(text("INSERT INTO items (id, category, processed) SELECT id + 100000, 'a', true FROM items"))
        else:
            conn.execute(text(
                "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 200000) "
                "INSERT INTO items (id, category, processed) SELECT n, 'a', 1 FROM g"
            ))
        conn.execute(text("UPDATE items SET processed = false WHERE id % 20000 = 0"))
        # Failure records for most pending rows, so the anti-join has something to consider.
        now = datetime.now(timezone.utc)
        conn.execute(
            Failure.__table__.insert(),
            [
                {"job": "process_item", "row_key": str(i), "attempts": 1, "first_failed_at": now,
                 "last_failed_at": now, "next_attempt_at": now, "dead": False, "error_type": "E",
                 "error_message": "", "traceback": ""}
                for i in range(20000, 200001, 40000)
            ],
        )
    with engine.connect() as conn:
        conn.execute(text("ANALYZE TABLE items, batchjobs_failures" if _is_mysql(engine) else "ANALYZE"))
        conn.commit()


def _plan(engine: Engine, stmt: object) -> str:
    with Session(engine) as session:
        compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})  # type: ignore[attr-defined]
        if _is_mysql(engine):
            # One line per table: "table type=... key=... rows=... extra=..."
            rows = session.execute(text(f"EXPLAIN {compiled}")).mappings().all()
            return "\n".join(
                f"{row['table']} type={row['type']} key={row['key']} rows={row['rows']} extra={row['Extra']}" for row in rows
            )
        prefix = "EXPLAIN" if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN"
        rows = session.execute(text(f"{prefix} {compiled}")).all()
    return "\n".join(str(row[-1]) for row in rows)


def _claim_part(plan: str) -> str:
    """PostgreSQL: the part of a claim's plan that locks rows, the WITH query its failure re-check
    joins to (see PostgreSQLChunkStatements); the whole plan elsewhere."""
    lines = plan.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "CTE batchjobs_claimed"]
    if not starts:
        return plan
    indent = len(lines[starts[0]]) - len(lines[starts[0]].lstrip())
    part = []
    for line in lines[starts[0] + 1 :]:
        if len(line) - len(line.lstrip()) <= indent:
            break
        part.append(line.strip().removeprefix("->  "))
    return "\n".join(part)


def test_claim_walks_the_partial_index_in_key_order(engine: Engine) -> None:
    _big_table_few_pending(engine)
    job = jobapp.jobs.job("process_item")
    now = datetime.now(timezone.utc)
    plan = _plan(engine, store_for(engine).chunk_statements(job, 50).claim.params(now=now, run_started=now))

    assert "ix_items_processed_pending" in plan, plan
    assert "batchjobs_failures" in plan, plan
    if engine.dialect.name == "postgresql":
        # Walk the partial index in key order and stop at the limit: no scan of the table, no sort.
        # (The claimed rows are sorted again after their re-check's join: at most the limit.)
        claim = _claim_part(plan)
        assert "Index Scan using ix_items_processed_pending on items" in claim, plan
        assert "Seq Scan on items" not in plan and "Sort" not in claim, plan
        assert claim.splitlines()[0].startswith("Limit") and "LockRows" in claim, plan
        assert f"Function Scan on {FAILURES_NOW}" in plan, plan
    elif _is_mysql(engine):
        # The pending part of the (flag, key) index, in key order: no table scan, no filesort;
        # the failure lookups (whether the job has records, then the row's) probe the failure
        # table's primary key.
        [walk] = [line for line in plan.splitlines() if line.startswith("items ")]
        assert "key=ix_items_processed_pending" in walk and "type=ref" in walk, plan
        assert "filesort" not in plan and "type=ALL" not in plan, plan
        lookups = [line for line in plan.splitlines() if line.startswith("batchjobs_failures ")]
        assert lookups and all("key=PRIMARY" in lookup for lookup in lookups), plan
    else:
        assert "SCAN items USING INDEX ix_items_processed_pending" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


def test_keyset_claim_starts_its_walk_at_the_key(engine: Engine) -> None:
    """A run's later claims seek to the last key reached instead of walking from the start."""
    _big_table_few_pending(engine)
    job = jobapp.jobs.job("process_item")
    now = datetime.now(timezone.utc)
    stmt = store_for(engine).chunk_statements(job, 50).claim_after.params(now=now, run_started=now, batchjobs_after=100000)
    plan = _plan(engine, stmt)
    if engine.dialect.name == "postgresql":
        assert "Index Scan using ix_items_processed_pending on items" in plan, plan
        assert "Index Cond: (id > 100000)" in plan, plan
    elif _is_mysql(engine):
        [walk] = [line for line in plan.splitlines() if line.startswith("items ")]
        assert "key=ix_items_processed_pending" in walk and "type=range" in walk, plan
        assert "filesort" not in plan, plan
    else:
        assert "SEARCH items USING INDEX ix_items_processed_pending (id>?)" in plan, plan


def test_the_server_reuses_the_claim_plan(pg_engine: Engine) -> None:
    """PostgreSQL plans the claim once, not once per chunk: its generic plan must not look more
    expensive than a custom one (with the limit as a parameter it did, so every claim was
    planned afresh)."""
    with pg_engine.begin() as conn:
        conn.execute(text("INSERT INTO items (id, category, processed) SELECT g, 'a', false FROM generate_series(1, 200000) g"))
        conn.execute(text("ANALYZE items"))
    job = jobapp.jobs.job("process_item")
    compiled = store_for(pg_engine).chunk_statements(job, 100).claim_after.compile(dialect=pg_engine.dialect)
    now = datetime.now(timezone.utc)
    params = compiled.construct_params({"now": now, "run_started": now, "batchjobs_after": 0})
    raw = pg_engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert driver is not None
        # batchjobs' engines prepare statements on a direct connection (nothing behind a pooler,
        # see the README); the server must then find a generic plan for the claim.
        threshold, driver.prepare_threshold = driver.prepare_threshold, 5
        # The server tries a custom plan five times before it considers the generic one.
        for after in range(0, 1000, 100):
            driver.execute(compiled.string, {**params, "batchjobs_after": after}, prepare=True).fetchall()
        row = driver.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE '%SKIP LOCKED%'"
        ).fetchone()
    finally:
        driver.prepare_threshold = threshold
        raw.rollback()
        raw.close()
    assert row is not None and row[0] > 0, row


def test_pending_count_uses_the_partial_index(engine: Engine) -> None:
    _big_table_few_pending(engine)
    from sqlalchemy import func, select

    job = jobapp.jobs.job("process_item")
    plan = _plan(engine, select(func.count()).select_from(job.table).where(job.pending()))
    assert "ix_items_processed_pending" in plan, plan
    with engine.connect() as conn:
        assert store_for(engine).pending_count(conn, job) == 10


def test_status_queries_on_a_million_rows_ride_the_partial_index(pg_engine: Engine) -> None:
    """status and check count pending rows and find the oldest one: O(pending), not O(table)."""
    from sqlalchemy import func, select

    from batchjobs.monitoring import status

    engine = pg_engine
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO items (id, category, processed) SELECT g, 'a', g % 100000 <> 0 FROM generate_series(1, 1000000) g"))
    with engine.connect() as conn:
        conn.execute(text("ANALYZE items"))
        conn.commit()
    job = jobapp.jobs.job("process_item")
    count_plan = _plan(engine, select(func.count()).select_from(job.table).where(job.pending()))
    oldest_plan = _plan(engine, select(func.min(job.pending_since)).where(job.pending()))
    for plan in (count_plan, oldest_plan):
        assert "ix_items_processed_pending" in plan and "Seq Scan on items" not in plan, plan
    with engine.connect() as conn:
        [item] = [j for j in status(jobapp.jobs, conn).jobs if j.name == "process_item"]
    assert item.pending == 10


def test_claim_cost_estimate_stays_below_jit_threshold(pg_engine: Engine) -> None:
    """A large backlog with many failure records must not make the planner expect a long walk.

    PostgreSQL JIT-compiles any plan estimated above ``jit_above_cost`` (100,000 by default),
    which adds milliseconds to every claim. The estimate must stay near the real cost: a walk
    of the partial index that stops after ``limit`` rows.
    """
    with pg_engine.begin() as conn:
        conn.execute(text("INSERT INTO items (id, category, processed) SELECT g, 'a', false FROM generate_series(1, 200000) g"))
        now = datetime.now(timezone.utc)
        conn.execute(
            text(
                "INSERT INTO batchjobs_failures (job, row_key, attempts, first_failed_at, last_failed_at, dead,"
                " error_type, error_message, traceback)"
                " SELECT 'process_item', g::text, 10, :now, :now, true, 'E', '', '' FROM generate_series(1, 100000, 2) g"
            ),
            {"now": now},
        )
        conn.execute(text("ANALYZE items"))
        conn.execute(text("ANALYZE batchjobs_failures"))
    job = jobapp.jobs.job("process_item")
    now = datetime.now(timezone.utc)
    plan = _plan(pg_engine, store_for(pg_engine).chunk_statements(job, 100).claim.params(now=now, run_started=now))
    total_cost = float(re.search(r"cost=[\d.]+\.\.([\d.]+)", plan.splitlines()[0]).group(1))  # type: ignore[union-attr]
    assert total_cost < 100_000, plan
    assert "Index Scan using ix_items_processed_pending on items" in plan, plan


def test_a_claim_of_given_keys_looks_them_up_by_key(engine: Engine) -> None:
    """run_rows's claim costs an index probe per key, never a walk of the table or of every pending row."""
    _big_table_few_pending(engine)
    job = jobapp.jobs.job("process_item")
    store = store_for(engine)
    now = datetime.now(timezone.utc)
    keys = store.key_list(job.primary_key, [20000, 60000, 7], engine.dialect)
    plan = _plan(engine, store.chunk_statements(job, 50).claim_keys.params(now=now, run_started=now, batchjobs_keys=keys))
    if engine.dialect.name == "postgresql":
        assert "Seq Scan on items" not in plan, plan
        assert "Index Scan using items_pkey on items" in plan or "Index Scan using ix_items_processed_pending on items" in plan, plan
    elif _is_mysql(engine):
        [walk] = [line for line in plan.splitlines() if line.startswith("items ")]
        assert "type=ALL" not in walk and "type=index" not in walk, plan
    else:
        assert "SCAN items" not in plan, plan
def test_web_overview_queries_on_a_million_rows_ride_the_partial_index(pg_engine: Engine) -> None:
    """Every statement the web page's overview sends to an app table walks the pending index."""
    import pytest
    from sqlalchemy import event

    pytest.importorskip("werkzeug", reason="the web page needs Werkzeug: pip install 'batchjobs[web]'")
    from werkzeug.test import Client

    from batchjobs.web import create_app

    engine = pg_engine
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO items (id, category, processed) SELECT g, 'a', g % 100 <> 0 FROM generate_series(1, 1000000) g"))
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()
    sent: list[tuple[str, object]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def capture(_conn: object, _cursor: object, statement: str, parameters: object, _context: object, _many: bool) -> None:
        if re.search(r"\bFROM items\b", statement):
            sent.append((statement, parameters))

    page = Client(create_app(jobapp.jobs, engine)).get("/")
    event.remove(engine, "before_cursor_execute", capture)

    assert page.status_code == 200 and '<td class="num pending">10000</td>' in page.get_data(as_text=True)
    assert len(sent) == 2, sent  # the pending count and the oldest pending row of process_item
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for statement, parameters in sent:
            cursor.execute(f"EXPLAIN {statement}", parameters)
            plan = "\n".join(str(row[0]) for row in cursor.fetchall())
            assert "ix_items_processed_pending" in plan and "Seq Scan on items" not in plan, (statement, plan)
    finally:
        raw.close()
