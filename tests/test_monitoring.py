"""status, check and metrics on a database with known pending, failing and dead rows and run history."""

from __future__ import annotations

import json
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jobapp
import pytest
from conftest import blocking_env, cli_env, run_cli, start_cli, url_of, wait_for
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from batchjobs.check import CRITICAL, OK, UNKNOWN, WARNING, Threshold, run_check
from batchjobs.history import STALE_AFTER
from batchjobs.monitoring import status
from batchjobs.store.tables import Failure, RunRecord
from batchjobs.timeutil import utcnow

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def _failure(job: str, key: str, dead: bool) -> Failure:
    return Failure(job=job, row_key=key, attempts=10 if dead else 2, first_failed_at=NOW, last_failed_at=NOW,
                   next_attempt_at=None if dead else NOW + timedelta(minutes=5), dead=dead,
                   error_type="ValueError", error_message="boom", traceback="")


def _run(started: datetime, minutes: float, stats: dict[str, list[int]], outcome: str | None, beat: datetime | None = None) -> RunRecord:
    done = sum(s[0] for s in stats.values())
    failed = sum(s[1] for s in stats.values())
    end = started + timedelta(minutes=minutes)
    return RunRecord(host="web-1", pid=4242, jobs=",".join(stats), queues="", started_at=started,
                     heartbeat_at=beat or end, finished_at=end if outcome else None, rows_done=done,
                     rows_failed=failed, job_stats=json.dumps(stats), outcome=outcome)


@pytest.fixture
def known(engine: Engine) -> Engine:
    """Items: 7 pending (oldest 30 min), 3 done; orders: 2 pending; failures and four runs."""
    with Session(engine) as session, session.begin():
        session.execute(insert(jobapp.Item), [
            {"id": i, "processed": i > 7, "created_at": NOW - timedelta(minutes=30 - i)} for i in range(1, 11)
        ])
        session.execute(insert(jobapp.Order), [{"id": 1}, {"id": 2}])
        session.add_all([_failure("process_item", "1", False), _failure("process_item", "2", False),
                         _failure("process_item", "3", True)])
        session.add_all([
            _run(NOW - timedelta(hours=3), 1, {"process_item": [100, 0], "send_receipt": [5, 0]}, "finished"),
            _run(NOW - timedelta(minutes=40), 2, {"process_item": [30, 2], "send_receipt": [0, 0]}, "finished"),
            _run(NOW - timedelta(minutes=20), 1, {"process_item": [4, 1]}, None, beat=NOW - timedelta(minutes=19)),
            _run(NOW - timedelta(seconds=30), 0, {"send_receipt": [1, 0]}, None, beat=NOW - timedelta(seconds=5)),
        ])
    return engine


def test_status_numbers(known: Engine) -> None:
    with known.connect() as conn:
        current = status(jobapp.jobs, conn, now=NOW)
    by_name = {job.name: job for job in current.jobs}
    item, receipt, thumbs = by_name["process_item"], by_name["send_receipt"], by_name["make_thumbnails"]
    assert (item.pending, item.oldest_pending_age, item.backoff, item.dead, item.done_last_hour) == (7, 29 * 60.0, 2, 1, 34)
    assert (receipt.pending, receipt.oldest_pending_age, receipt.backoff, receipt.dead, receipt.done_last_hour) == (2, None, 0, 0, 1)
    assert (thumbs.pending, thumbs.done_last_hour) == (0, 0)
    assert current.last_run is not None and current.last_run.outcome == "running"
    assert current.last_run.started_at == NOW - timedelta(seconds=30)
    assert [(run.pid, run.outcome) for run in current.alive] == [(4242, "running")]
    with known.connect() as conn:
        crashed = status(jobapp.jobs, conn, now=NOW + STALE_AFTER + timedelta(seconds=10))
    assert crashed.last_run is not None and crashed.last_run.outcome == "crashed" and crashed.alive == []


def test_status_queue_filter_and_json(known: Engine) -> None:
    result = run_cli("-A", "jobapp:jobs", "status", "-q", "mail", "--json", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(known)))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(j["name"], j["pending"]) for j in data["jobs"]] == [("send_receipt", 2)]
    table = run_cli("-A", "jobapp:jobs", "status", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(known))).stdout
    assert table.splitlines()[0].split() == ["JOB", "QUEUE", "PENDING", "OLDEST", "BACKOFF", "DEAD", "DONE", "1H"]
    assert "last run: started" in table and "on web-1 (pid 4242)" in table


@pytest.mark.parametrize(
    ("limits", "code", "problem"),
    [
        ({}, OK, None),
        ({"max_pending": "10"}, OK, None),
        ({"max_pending": "5,10"}, WARNING, "WARNING: process_item has 7 pending (limit 5)"),
        ({"max_pending": "1,5"}, CRITICAL, "CRITICAL: process_item has 7 pending (limit 5)"),
        ({"max_dead": "0"}, CRITICAL, "CRITICAL: process_item has 1 dead (limit 0)"),
        ({"max_since_last_run": "10s,1m"}, WARNING, "WARNING: last run started 30s ago (limit 10s)"),
        ({"max_since_last_run": "5s,10s"}, CRITICAL, "CRITICAL: last run started 30s ago (limit 10s)"),
    ],
)
def test_check_thresholds(known: Engine, limits: dict[str, str], code: int, problem: str | None) -> None:
    thresholds = {
        name: Threshold.parse(value, "--" + name.replace("_", "-"), duration=name in ("max_pending_age", "max_since_last_run"))
        for name, value in limits.items()
    }
    with known.connect() as conn:
        result = run_check(jobapp.jobs, conn, now=NOW, **thresholds)
    assert result.code == code
    line = result.line()
    status_word = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL"}[code]
    assert line.startswith(f"BATCHJOBS {status_word} - ")
    if problem:
        assert problem in line
    else:
        assert "3 job(s): 9 pending, 1 dead, last run 30s ago (running)" in line
    perfdata = line.split(" | ")[1].split()
    assert "'process_item_pending'=7" in " ".join(perfdata)
    assert "'process_item_oldest_pending_age'=1740s" in " ".join(perfdata)


def test_check_pending_age(known: Engine) -> None:
    limit = Threshold.parse("20m,1h", "--max-pending-age", duration=True)
    with known.connect() as conn:
        result = run_check(jobapp.jobs, conn, jobs=["process_item"], max_pending_age=limit, now=NOW)
        blind = run_check(jobapp.jobs, conn, max_pending_age=limit, now=NOW)
    assert result.code == WARNING
    assert "WARNING: process_item's oldest pending row waits 29m00s (limit 20m00s)" in result.line()
    # send_receipt has no pending_since: the check cannot judge it, and says so.
    assert blind.code == UNKNOWN and "needs pending_since= on make_thumbnails, send_receipt" in blind.line()


def test_check_for_one_job(known: Engine) -> None:
    with known.connect() as conn:
        result = run_check(jobapp.jobs, conn, jobs=["send_receipt"], max_dead=Threshold(None, 0), now=NOW)
    assert result.code == OK
    assert "'process_item_pending'" not in result.line() and "'send_receipt_pending'=2;;;0" in result.line()


def test_check_exit_codes_from_the_cli(known: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(known))
    ok = run_cli("-A", "jobapp:jobs", "check", "--max-pending", "100", env=env)
    warn = run_cli("-A", "jobapp:jobs", "check", "--max-pending", "5,100", env=env)
    crit = run_cli("-A", "jobapp:jobs", "check", "--max-dead", "0", env=env)
    assert [r.returncode for r in (ok, warn, crit)] == [OK, WARNING, CRITICAL]
    for result in (ok, warn, crit):
        assert len(result.stdout.strip().splitlines()) == 1 and " | " in result.stdout and result.stderr == ""


@pytest.mark.parametrize(
    "args",
    [
        ["--database-url", "postgresql://u:pw@127.0.0.1:1/x", "check"],
        ["check", "--max-pending", "lots"],
        ["check", "--max-pending", "9,3"],
        ["check", "--no-such-option"],
        ["check", "--job", "nope"],
        # A typo in a monitoring config must not read as "no workers" nor pass silently.
        ["check", "--min-workers", "1", "--queue", "nosuch"],
        ["check", "--queue", "items"],
    ],
)
def test_check_unknown(args: list[str], known: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(known))
    result = run_cli("-A", "jobapp:jobs", *args, env=env)
    assert result.returncode == UNKNOWN, result.stdout + result.stderr
    assert result.stdout.startswith("BATCHJOBS UNKNOWN - ") and len(result.stdout.strip().splitlines()) == 1
    assert "nosuch" not in args or "unknown queue 'nosuch'" in result.stdout
    assert "Traceback" not in result.stderr and "pw@" not in result.stdout


def test_check_unknown_without_batchjobs_tables(pg_url: str) -> None:
    result = run_cli("-A", "jobapp:jobs", "--database-url", pg_url, "check")
    assert result.returncode == UNKNOWN and "run `batchjobs migrate`" in result.stdout


def test_metrics_parse_with_prometheus_client(known: Engine, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    result = run_cli("-A", "jobapp:jobs", "metrics", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(known)))
    assert result.returncode == 0, result.stderr
    samples = {
        (sample.name, sample.labels["job"]): sample.value
        for family in text_string_to_metric_families(result.stdout)
        for sample in family.samples
    }
    assert samples[("batchjobs_pending_rows", "process_item")] == 7
    assert samples[("batchjobs_backoff_rows", "process_item")] == 2
    assert samples[("batchjobs_dead_rows", "process_item")] == 1
    assert samples[("batchjobs_pending_rows", "send_receipt")] == 2
    assert samples[("batchjobs_last_run_rows_done", "send_receipt")] == 1
    assert samples[("batchjobs_last_run_rows_done", "process_item")] == 4
    assert samples[("batchjobs_last_run_rows_failed", "process_item")] == 1
    assert samples[("batchjobs_last_run_timestamp_seconds", "process_item")] == (NOW - timedelta(minutes=20)).timestamp()
    assert ("batchjobs_last_run_timestamp_seconds", "make_thumbnails") not in samples
    # oldest pending age is measured against the real clock here; only its presence is exact.
    assert samples[("batchjobs_oldest_pending_age_seconds", "process_item")] > 0

    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    target = textfiles / "batchjobs.prom"
    written = run_cli("-A", "jobapp:jobs", "metrics", "--textfile", str(target), env=cli_env(BATCHJOBS_DATABASE_URL=url_of(known)))
    assert written.returncode == 0 and written.stdout == ""
    assert list(textfiles.iterdir()) == [target]  # no temporary file left behind
    assert {f.name for f in text_string_to_metric_families(target.read_text())} >= {"batchjobs_pending_rows"}


def test_run_history_records_runs_and_prunes_old_ones(engine: Engine, tmp_path: Path) -> None:
    from batchjobs import run_pending

    with Session(engine) as session, session.begin():
        session.add(_run(utcnow() - timedelta(days=8), 1, {"process_item": [1, 0]}, "finished"))
        session.execute(insert(jobapp.Item), [{"id": i} for i in range(1, 4)])
    summary = run_pending(jobapp.jobs, engine, queues=["items"])
    with Session(engine) as session:
        runs = session.scalars(select(RunRecord)).all()
    assert len(runs) == 1  # the eight-day-old run was pruned (the default keeps 7 days)
    [run] = runs
    assert (run.outcome, run.rows_done, run.rows_failed, run.jobs) == ("finished", 3, 0, "process_item")
    assert json.loads(run.job_stats) == {"process_item": [3, 0]}
    assert run.finished_at is not None and run.finished_at >= run.started_at
    assert summary.done == 3

    from batchjobs import Registry

    short = Registry(keep_history=timedelta(seconds=0))
    short.jobs = jobapp.jobs.jobs
    run_pending(short, engine, queues=["items"])
    with Session(engine) as session:
        assert len(session.scalars(select(RunRecord)).all()) == 1  # only the run just made


def test_killed_run_shows_as_crashed_once_its_heartbeat_is_stale(engine: Engine, tmp_path: Path) -> None:
    with Session(engine) as session, session.begin():
        session.execute(insert(jobapp.Item), [{"id": i} for i in range(1, 4)])
    env = blocking_env(engine, tmp_path, 2)
    run = start_cli("-A", "jobapp:jobs", "run-pending", "-q", "items", env=env)
    wait_for(lambda: (tmp_path / "reached-2").exists(), "row 2 to be in progress", run)
    with engine.connect() as conn:
        live = status(jobapp.jobs, conn)
    assert live.last_run is not None and live.last_run.outcome == "running" and live.last_run.pid == run.pid
    assert [r.pid for r in live.alive] == [run.pid]
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    with engine.connect() as conn:
        later = status(jobapp.jobs, conn, now=utcnow() + STALE_AFTER + timedelta(seconds=10))
    assert later.last_run is not None and later.last_run.outcome == "crashed" and later.alive == []


def test_interrupted_and_json_logs(engine: Engine, tmp_path: Path) -> None:
    with Session(engine) as session, session.begin():
        session.execute(insert(jobapp.Item), [{"id": i} for i in range(1, 6)])
    env = cli_env(JOBAPP_POISON="3", BATCHJOBS_DATABASE_URL=url_of(engine))
    result = run_cli("-A", "jobapp:jobs", "run-pending", "--log-format", "json", "-v", env=env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    rows = [(e["job"], e["row_key"], e["outcome"]) for e in events if "duration" in e]
    assert rows == [("process_item", str(i), "failed" if i == 3 else "done") for i in range(1, 6)]
    assert all(isinstance(e["duration"], float) for e in events if "duration" in e)
    [error] = [e for e in events if e["level"] == "error"]
    assert error["row_key"] == "3" and "ValueError: poison row 3" in error["error"]
    summary = json.loads(result.stdout)
    assert (summary["event"], summary["done"], summary["failed"]) == ("run finished", 4, 1)
    quiet = run_cli("-A", "jobapp:jobs", "run-pending", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine), BATCHJOBS_LOG_FORMAT="json"))
    assert (quiet.stdout, quiet.stderr) == ("", "")
