"""The schedule `batchjobs crontab` prints: exact text, and every cron line really runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jobapp
import pytest
from conftest import cli_env, run_cli
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import Session

from batchjobs import BatchJobsError, Registry
from batchjobs.crontab import render_schedule
from batchjobs.db import create_engine
from batchjobs.schema import migrate

APP = "jobapp:jobs"
WELCOME = "batchjobs.examples.welcome.app:jobs"
REPO = Path(__file__).parent.parent
# The placeholders crontab.example uses, so its line can be compared with generated output.
EXAMPLE_PYTHON = "/srv/myapp/venv/bin/python"
EXAMPLE_WORKDIR = "/srv/myapp"
EXAMPLE_LOG = "/srv/myapp/log/batchjobs.log"


def job_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def cron_command(line: str) -> str:
    """What cron hands to the shell: the text after the five time fields, % handled as cron does."""
    command = line.split(None, 5)[5]
    assert "%" not in command.replace("\\%", ""), "a bare % would cut the command short in cron"
    return command.replace("\\%", "%")


def run_line(line: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # cron starts commands in $HOME: run from elsewhere so the line's own `cd` has to work.
    command = ["bash", "-c", cron_command(line)]
    return subprocess.run(command, cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=120)


def pending(engine: Engine) -> dict[str, int]:
    """Pending rows per queue of jobapp."""
    with Session(engine) as session:
        return {
            job.queue: session.scalar(select(func.count()).select_from(job.table).where(job.pending())) or 0
            for job in jobapp.jobs.jobs.values()
        }


@pytest.fixture
def app_engine(pg_engine: Engine) -> Engine:
    return pg_engine


def in_tmp(tmp_path: Path, **options: str) -> str:
    """The schedule for jobapp as the tests run it: this python, tmp_path as workdir, a log there."""
    return render_schedule(
        jobapp.jobs, APP, python=sys.executable, workdir=str(tmp_path), log=str(tmp_path / "cron.log"), **options
    )


def test_cron_has_one_exact_line_per_queue(tmp_path: Path) -> None:
    text = in_tmp(tmp_path)

    prefix = f"* * * * * cd {tmp_path} && {sys.executable} -m batchjobs -A jobapp:jobs run-pending"
    assert job_lines(text) == [
        f"{prefix} --queue items --max-runtime 55s >> {tmp_path}/cron.log 2>&1",
        f"{prefix} --queue mail --max-runtime 55s >> {tmp_path}/cron.log 2>&1",
        f"{prefix} --queue media --max-runtime 55s >> {tmp_path}/cron.log 2>&1",
    ]


def test_cron_header_lists_jobs_and_never_a_database_url() -> None:
    registry = Registry(database_url="postgresql://app:s3cret@db.internal/app")
    registry.jobs = jobapp.jobs.jobs
    text = render_schedule(registry, APP)

    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "# batchjobs schedule for -A jobapp:jobs: run-pending for each queue, every minute." in header
    assert "#   items  process_item     Item   items.processed" in header
    assert "#   mail   send_receipt     Order  orders.receipt_sent_at" in header
    assert "#   media  make_thumbnails  Image  images.thumbnail_done" in header
    assert "# BATCHJOBS_DATABASE_URL=postgresql://user@host/db" in header
    assert any("BATCHJOBS_DATABASE_URL must be set" in line for line in header)
    assert "s3cret" not in text and "db.internal" not in text


def test_cron_without_python_workdir_or_log_uses_the_console_script_and_lets_cron_mail() -> None:
    text = render_schedule(jobapp.jobs, APP)

    assert job_lines(text)[0] == "* * * * * batchjobs -A jobapp:jobs run-pending --queue items --max-runtime 55s"
    assert "PATH" in text  # the console script must be found by cron: the header says so


def test_cron_quotes_paths_and_escapes_percent() -> None:
    text = render_schedule(
        jobapp.jobs,
        APP,
        python="/opt/my env/bin/python",
        workdir="/srv/it's 100%",
        log="/var/log/a b.log",
        max_runtime="50s",
    )

    assert job_lines(text)[1] == (
        "* * * * * cd '/srv/it'\"'\"'s 100\\%' && '/opt/my env/bin/python' -m batchjobs -A jobapp:jobs"
        " run-pending --queue mail --max-runtime 50s >> '/var/log/a b.log' 2>&1"
    )


def test_a_database_url_variable_of_another_name_is_passed_explicitly() -> None:
    text = render_schedule(jobapp.jobs, APP, database_url_env="MYAPP_DB")

    assert job_lines(text)[0] == (
        '* * * * * batchjobs -A jobapp:jobs --database-url "$MYAPP_DB" run-pending --queue items --max-runtime 55s'
    )
    assert "# MYAPP_DB=postgresql://user@host/db" in text.splitlines()
    # DATABASE_URL is read by batchjobs itself, so it needs no option.
    assert "--database-url" not in render_schedule(jobapp.jobs, APP, database_url_env="DATABASE_URL")


def test_every_cron_line_runs_its_queue(app_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    with Session(app_engine) as session, session.begin():
        session.execute(insert(jobapp.Item), [{"id": i} for i in range(1, 4)])
        session.execute(insert(jobapp.Order), [{"id": i} for i in range(1, 5)])
        session.execute(insert(jobapp.Image), [{"id": i} for i in range(1, 6)])
    log = tmp_path / "cron.log"
    text = in_tmp(tmp_path)
    home = tmp_path / "home"
    home.mkdir()

    expected = {"items": 3, "mail": 4, "media": 5}
    for line, queue in zip(job_lines(text), ["items", "mail", "media"]):
        result = run_line(line, home, BATCHJOBS_DATABASE_URL=pg_url)
        assert result.returncode == 0, result.stderr
        assert result.stdout == result.stderr == ""  # all output went to the log
        assert pending(app_engine)[queue] == 0, line
        assert f"batchjobs: {expected[queue]} done, 0 failed" in log.read_text().splitlines()[-1]
    assert len(log.read_text().splitlines()) == 3


def test_a_line_with_awkward_paths_and_its_own_url_variable_runs(
    app_engine: Engine, pg_url: str, tmp_path: Path
) -> None:
    with Session(app_engine) as session, session.begin():
        session.execute(insert(jobapp.Order), [{"id": 1}, {"id": 2}])
    workdir = tmp_path / "it's 100% here"
    workdir.mkdir()
    text = render_schedule(
        jobapp.jobs,
        APP,
        python=sys.executable,
        workdir=str(workdir),
        log=str(workdir / "cron $HOME.log"),
        database_url_env="MYAPP_DB",
    )
    mail_line = job_lines(text)[1]

    result = run_line(mail_line, tmp_path, MYAPP_DB=pg_url)

    assert result.returncode == 0, result.stderr
    assert pending(app_engine)["mail"] == 0
    assert "batchjobs: 2 done" in (workdir / "cron $HOME.log").read_text()


def test_the_welcome_example_line_runs(pg_url: str, tmp_path: Path) -> None:
    from batchjobs.examples.welcome.app import Base, User, jobs

    engine = create_engine(pg_url)
    Base.metadata.create_all(engine)
    migrate(engine)
    with Session(engine) as session, session.begin():
        session.execute(insert(User), [{"email": f"u{n}@example.com", "name": f"U{n}"} for n in range(3)])
    text = render_schedule(jobs, WELCOME, python=sys.executable, workdir=str(tmp_path), log=str(tmp_path / "cron.log"))
    (line,) = job_lines(text)
    home = tmp_path / "home"
    home.mkdir()

    result = run_line(line, home, BATCHJOBS_DATABASE_URL=pg_url)

    assert result.returncode == 0, result.stderr
    with Session(engine) as session:
        assert session.scalars(select(User.welcome_email_sent)).all() == [True] * 3
    engine.dispose()
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 3  # the `cd` put the outbox in workdir


def test_crontab_example_matches_generated_line() -> None:
    from batchjobs.examples.welcome.app import jobs

    example = (REPO / "crontab.example").read_text()
    generated = render_schedule(jobs, WELCOME, python=EXAMPLE_PYTHON, workdir=EXAMPLE_WORKDIR, log=EXAMPLE_LOG)

    assert job_lines(example) == job_lines(generated)
    assert "# BATCHJOBS_DATABASE_URL=postgresql://user@host/db" in example.splitlines()


def split_units(text: str) -> dict[str, str]:
    """The files of a systemd schedule, split at its '# ---- file: NAME ----' lines."""
    files: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("# ---- file: ") and line.endswith(" ----"):
            current = files.setdefault(line.removeprefix("# ---- file: ").removesuffix(" ----"), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() + "\n" for name, lines in files.items()}


def test_systemd_has_a_service_and_a_timer_per_queue(tmp_path: Path) -> None:
    log = tmp_path / "cron.log"
    text = in_tmp(tmp_path, format="systemd")
    units = split_units(text)

    queues = ("items", "mail", "media")
    assert sorted(units) == [f"batchjobs-{queue}.{kind}" for queue in queues for kind in ("service", "timer")]
    service = units["batchjobs-mail.service"].splitlines()
    assert "Type=oneshot" in service
    assert f"WorkingDirectory={tmp_path}" in service
    assert "EnvironmentFile=-/etc/batchjobs.env" in service
    command = f"{sys.executable} -m batchjobs -A jobapp:jobs run-pending --queue mail --max-runtime 55s"
    assert f"ExecStart={command}" in service
    assert f"StandardOutput=append:{log}" in service and "StandardError=inherit" in service
    timer = units["batchjobs-mail.timer"].splitlines()
    for setting in ("OnCalendar=minutely", "AccuracySec=1s", "Persistent=false", "WantedBy=timers.target"):
        assert setting in timer
    assert "systemctl enable --now batchjobs-items.timer batchjobs-mail.timer batchjobs-media.timer" in text


def test_systemd_quotes_for_systemd_not_for_the_shell(tmp_path: Path) -> None:
    text = render_schedule(jobapp.jobs, APP, python="/opt/my env/bin/python", workdir="/srv/100%", format="systemd")
    service = split_units(text)["batchjobs-items.service"].splitlines()

    command = '"/opt/my env/bin/python" -m batchjobs -A jobapp:jobs run-pending --queue items --max-runtime 55s'
    assert f"ExecStart={command}" in service
    assert "WorkingDirectory=/srv/100%%" in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    python_dir = tmp_path / "my env"
    python_dir.mkdir()
    (python_dir / "python").symlink_to(sys.executable)
    workdir = tmp_path / "it's 100%"
    workdir.mkdir()
    text = render_schedule(
        jobapp.jobs,
        APP,
        python=str(python_dir / "python"),
        workdir=str(workdir),
        log=str(tmp_path / "a.log"),
        database_url_env="MYAPP_DB",
        format="systemd",
    )
    units = split_units(text)
    for name, content in units.items():
        (tmp_path / name).write_text(content)

    command = ["systemd-analyze", "verify", *(str(tmp_path / name) for name in units)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_unknown_format_and_empty_registry_are_clear_errors() -> None:
    with pytest.raises(BatchJobsError, match="unknown schedule format 'launchd'"):
        render_schedule(jobapp.jobs, APP, format="launchd")
    with pytest.raises(BatchJobsError, match="has no jobs registered"):
        render_schedule(Registry(), "empty:jobs")
    with pytest.raises(BatchJobsError, match="invalid duration"):
        render_schedule(jobapp.jobs, APP, max_runtime="55 seconds")


def test_python_dash_m_batchjobs_works() -> None:
    command = [sys.executable, "-m", "batchjobs", "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: batchjobs ")


def test_crontab_command_prints_the_schedule() -> None:
    result = run_cli("-A", "jobapp:jobs", "crontab", "--python", "/srv/app/venv/bin/python", "--workdir", "/srv/app")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert lines == [
        f"* * * * * cd /srv/app && /srv/app/venv/bin/python -m batchjobs -A jobapp:jobs run-pending --queue {q} --max-runtime 55s"
        for q in ("items", "mail", "media")
    ]
    systemd = run_cli("-A", "jobapp:jobs", "crontab", "--format", "systemd")
    assert systemd.returncode == 0 and systemd.stdout.count("# ---- file: batchjobs-") == 6


def test_systemd_workers_restart_always_and_start_an_absolute_command(tmp_path: Path) -> None:
    text = render_schedule(jobapp.jobs, APP, workdir=str(tmp_path), format="systemd", worker=True)
    units = split_units(text)
    assert sorted(units) == [f"batchjobs-worker-{queue}.service" for queue in ("items", "mail", "media")]
    service = units["batchjobs-worker-mail.service"].splitlines()
    for setting in ("Type=simple", "Restart=always", "KillSignal=SIGTERM", "WantedBy=multi-user.target"):
        assert setting in service
    # No --python given: systemd refuses a relative command, so this Python runs -m batchjobs.
    assert f"ExecStart={sys.executable} -m batchjobs -A jobapp:jobs worker --queue mail" in service
    with pytest.raises(BatchJobsError, match="use the systemd format"):
        render_schedule(jobapp.jobs, APP, worker=True)


def test_systemd_timer_services_without_python_start_an_absolute_command(tmp_path: Path) -> None:
    # systemd refuses a relative ExecStart; without --python the units name this Python.
    units = split_units(render_schedule(jobapp.jobs, APP, workdir=str(tmp_path), format="systemd"))
    starts = [line for name, unit in units.items() if name.endswith(".service") for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert len(starts) == 3
    assert all(line.startswith(f"ExecStart={sys.executable} -m batchjobs ") for line in starts), starts
