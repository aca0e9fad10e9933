"""The CLI's commands and its errors: one line, non-zero exit, never a traceback or a password."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, url_of
from sqlalchemy import Engine
from test_run_pending import add_items


def assert_one_line_error(result: object, *fragments: str) -> None:
    assert result.returncode != 0  # type: ignore[attr-defined]
    err = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_unknown_job(engine: Engine) -> None:
    result = run_cli("-A", "jobapp:jobs", "run-pending", "--job", "nope", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert_one_line_error(result, "unknown job 'nope'", "process_item")


def test_unknown_queue(engine: Engine) -> None:
    result = run_cli("-A", "jobapp:jobs", "run-pending", "-q", "nope", env=cli_env(BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert_one_line_error(result, "unknown queue 'nope'", "items, mail, media")


def test_app_that_fails_to_import_shows_the_import_error(tmp_path: Path) -> None:
    (tmp_path / "brokenapp.py").write_text("import not_a_module_anywhere\n")
    result = run_cli("-A", "brokenapp:jobs", "jobs", cwd=tmp_path)
    assert_one_line_error(result, "cannot import app 'brokenapp'", "No module named 'not_a_module_anywhere'")


def test_attribute_that_is_not_a_registry(tmp_path: Path) -> None:
    (tmp_path / "notregistry.py").write_text("jobs = 42\n")
    result = run_cli("-A", "notregistry:jobs", "jobs", cwd=tmp_path)
    assert_one_line_error(result, "not a batchjobs Registry")


def test_missing_app() -> None:
    result = run_cli("run-pending")
    assert_one_line_error(result, "-A")


def test_unreachable_database_masks_the_password() -> None:
    url = "postgresql://app:s3cret-pw@127.0.0.1:1/appdb"
    result = run_cli("-A", "jobapp:jobs", "--database-url", url, "run-pending")
    assert_one_line_error(result, "cannot connect to postgresql+psycopg://app:***@127.0.0.1:1/appdb")
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_missing_batchjobs_tables(pg_url: str) -> None:
    result = run_cli("-A", "jobapp:jobs", "--database-url", pg_url, "run-pending")
    assert_one_line_error(result, "batchjobs tables are missing", "run `batchjobs migrate`")


def test_no_database_url() -> None:
    result = run_cli("-A", "jobapp:jobs", "run-pending")
    assert_one_line_error(result, "no database URL")


@pytest.mark.parametrize("value", ["5x", "ten", "-3s", "1h-2m"])
def test_malformed_duration(value: str) -> None:
    result = run_cli("-A", "jobapp:jobs", "--database-url", "sqlite://", "run-pending", "--max-runtime", value)
    assert_one_line_error(result, "--max-runtime", "invalid duration")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("55", "invalid duration '55': use a number with a unit, e.g. 30s"),
        ("0", "invalid duration '0': use a number with a unit"),
        ("0s", "--max-runtime: 0ms is too short to handle any row; use at least 1s"),
        ("1ms", "--max-runtime: 1ms is too short to handle any row; use at least 1s"),
    ],
)
@pytest.mark.parametrize("command", ["run-pending", "worker"])
def test_max_runtime_needs_a_unit_and_time_to_handle_a_row(command: str, value: str, error: str) -> None:
    result = run_cli("-A", "jobapp:jobs", "--database-url", "sqlite://", command, "--max-runtime", value)
    assert_one_line_error(result, error)


def test_unsupported_database() -> None:
    result = run_cli("-A", "jobapp:jobs", "--database-url", "oracle://u:pw@127.0.0.1/x", "jobs")
    assert_one_line_error(result, "batchjobs supports PostgreSQL, MySQL, MariaDB and SQLite; this database is oracle")
    assert "pw@" not in result.stderr


def test_jobs_lists_pending_counts(engine: Engine) -> None:
    add_items(engine, 4)
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(engine))
    listing = run_cli("-A", "jobapp:jobs", "jobs", env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "FLAG", "QUEUE", "PENDING"]
    assert lines[1].split() == ["process_item", "Item", "items.processed", "items", "4"]
    data = json.loads(run_cli("-A", "jobapp:jobs", "jobs", "--json", env=env).stdout)
    assert {d["name"]: d["pending"] for d in data} == {"process_item": 4, "send_receipt": 0, "make_thumbnails": 0}


def test_database_url_precedence(engine: Engine, tmp_path: Path) -> None:
    """--database-url beats $BATCHJOBS_DATABASE_URL, which beats $DATABASE_URL."""
    add_items(engine, 2)
    bad = f"sqlite:///{tmp_path / 'missing-dir' / 'x.sqlite3'}"
    good = url_of(engine)
    assert run_cli("-A", "jobapp:jobs", "--database-url", good, "jobs", env=cli_env(BATCHJOBS_DATABASE_URL=bad)).returncode == 0
    assert run_cli("-A", "jobapp:jobs", "jobs", env=cli_env(BATCHJOBS_DATABASE_URL=good, DATABASE_URL=bad)).returncode == 0
    assert run_cli("-A", "jobapp:jobs", "jobs", env=cli_env(DATABASE_URL=good)).returncode == 0
    assert run_cli("-A", "jobapp:jobs", "jobs", env=cli_env(BATCHJOBS_DATABASE_URL=bad, DATABASE_URL=good)).returncode != 0


def test_app_from_environment(engine: Engine) -> None:
    result = run_cli("jobs", env=cli_env(BATCHJOBS_APP="jobapp:jobs", BATCHJOBS_DATABASE_URL=url_of(engine)))
    assert result.returncode == 0 and "process_item" in result.stdout


def test_help_explains_each_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run-pending", "jobs", "migrate", "demo", "failures", "retry", "show-failure", "crontab"):
        assert command in result.stdout
    run_help = run_cli("run-pending", "--help").stdout
    assert "--max-runtime" in run_help and "SIGTERM" in run_help


@pytest.mark.parametrize(("option", "value"), [("--database-url", "sqlite://"), ("-A", "jobapp:jobs"), ("--app", "jobapp:jobs")])
def test_a_global_option_after_the_command_says_where_it_goes(option: str, value: str) -> None:
    result = run_cli("-A", "jobapp:jobs", "status", option, value)
    assert_one_line_error(
        result, f"{option} is an option of batchjobs itself, not of status: put it before the command, as in batchjobs {option} ... status"
    )


def test_an_unknown_option_still_points_at_the_help() -> None:
    result = run_cli("-A", "jobapp:jobs", "status", "--nope")
    assert_one_line_error(result, "No such option '--nope'", "see 'batchjobs status --help'")


@pytest.mark.parametrize(
    ("source", "error", "line"),
    [
        ("x = 1\ndef broken(:\n    pass\n", "SyntaxError: invalid syntax", 2),
        ("import json\n\nraise RuntimeError('boom')\n", "RuntimeError: boom", 3),
        # Raised inside a library the app calls: the app's own line is the one to show.
        ("from sqlalchemy import Column\n\nColumn(1, 2, 3)\n", "ArgumentError", 3),
    ],
)
def test_an_app_that_fails_to_import_names_its_file_and_line(tmp_path: Path, source: str, error: str, line: int) -> None:
    (tmp_path / "brokenapp.py").write_text(source)
    result = run_cli("-A", "brokenapp:jobs", "jobs", cwd=tmp_path)
    assert_one_line_error(
        result, f"cannot import app 'brokenapp': {error}", f"(at {tmp_path / 'brokenapp.py'}:{line})", "BATCHJOBS_DEBUG=1"
    )
    assert "frozen" not in result.stderr


def test_batchjobs_debug_shows_the_full_traceback(tmp_path: Path) -> None:
    (tmp_path / "brokenapp.py").write_text("def load():\n    raise RuntimeError('boom')\n\nload()\n")
    result = run_cli("-A", "brokenapp:jobs", "jobs", cwd=tmp_path, env=cli_env(BATCHJOBS_DEBUG="1"))
    assert result.returncode == 1
    assert "Traceback (most recent call last):" in result.stderr
    assert f'File "{tmp_path / "brokenapp.py"}", line 2, in load' in result.stderr
    # The one line still comes last, as without the setting.
    assert result.stderr.strip().splitlines()[-1].startswith("Error: cannot import app 'brokenapp': RuntimeError: boom")
