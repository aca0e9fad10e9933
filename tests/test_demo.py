"""`batchjobs demo`: the example app end to end, to an outbox folder and to a real SMTP server."""

from __future__ import annotations

import email
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cli_env, run_cli


def test_demo_writes_welcome_emails_to_the_outbox(tmp_path: Path) -> None:
    result = run_cli("demo", "--signups", "50", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "batchjobs-demo.sqlite3").exists()
    emails = sorted((tmp_path / "outbox").glob("*.eml"))
    assert len(emails) == 45  # every tenth user has not confirmed their email
    message = email.message_from_bytes(emails[0].read_bytes())
    assert message["From"] == "welcome@example.com" and message["Subject"].startswith("Welcome aboard")
    assert "45 welcome emails delivered" in result.stdout
    assert "5 users wait for their email confirmation" in result.stdout
    assert "a second run-pending found 0 rows" in result.stdout

    # The commands the demo suggests work as printed.
    suggested = [line.split()[1:] for line in result.stdout.splitlines() if line.strip().startswith("batchjobs -A")]
    assert [args[-1] for args in suggested][:2] == ["status", "failures"]
    overview = run_cli(*suggested[0], cwd=tmp_path)
    assert overview.returncode == 0, overview.stderr
    # Nothing pending, nothing failing, 45 done in the last hour (from the run history).
    assert re.search(r"send_welcome_email\s+mail\s+0\s+-\s+0\s+0\s+45\n", overview.stdout), overview.stdout
    assert run_cli(*suggested[1], cwd=tmp_path).stdout.strip() == "no failing rows"
    idle = run_cli(*suggested[2], cwd=tmp_path)
    assert (idle.returncode, idle.stdout, idle.stderr) == (0, "", "")


def test_demo_on_postgresql_never_prints_the_password(pg_url: str, tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    # The server trusts local connections, so any password works, and none may be printed.
    url = make_url(pg_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    result = run_cli("demo", "--database-url", url, "--signups", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 18
    assert not (tmp_path / "batchjobs-demo.sqlite3").exists()
    assert "s3cret-pw" not in result.stdout + result.stderr
    assert "export BATCHJOBS_DATABASE_URL=" in result.stdout
    # The environment variable is not the demo's: it must never aim the demo at an app's database.
    elsewhere = run_cli("demo", "--signups", "5", cwd=tmp_path, env=cli_env(BATCHJOBS_DATABASE_URL=url))
    assert elsewhere.returncode == 0 and (tmp_path / "batchjobs-demo.sqlite3").exists()


def test_demo_reports_failed_deliveries(tmp_path: Path) -> None:
    import socket as sock

    with sock.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("demo", "--signups", "10", cwd=tmp_path, env=cli_env(SMTP_URL=f"smtp://127.0.0.1:{port}"))
    assert result.returncode == 0
    assert "0 welcome emails delivered" in result.stdout
    assert "9 deliveries failed and will be retried with backoff" in result.stdout
    assert "a second run-pending found 0 rows to do: the failed ones wait out their backoff" in result.stdout
    assert "ConnectionRefusedError" in result.stderr


@pytest.fixture
def smtp_server() -> Iterator[tuple[str, list[email.message.Message]]]:
    from aiosmtpd.controller import Controller

    received: list[email.message.Message] = []

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            received.append(email.message_from_bytes(envelope.content))  # type: ignore[attr-defined]
            return "250 OK"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"smtp://127.0.0.1:{port}", received
    finally:
        controller.stop()


def test_demo_sends_through_smtp(smtp_server: tuple[str, list[email.message.Message]], tmp_path: Path) -> None:
    url, received = smtp_server
    result = run_cli("demo", "--signups", "30", cwd=tmp_path, env=cli_env(SMTP_URL=url))
    assert result.returncode == 0, result.stderr
    assert f"27 welcome emails delivered to {url}" in result.stdout
    assert sorted(int(m["X-User-Id"]) for m in received) == [n for n in range(1, 31) if n % 10]
    assert not (tmp_path / "outbox").exists()


def test_a_second_demo_in_the_same_folder_counts_its_own_signups(tmp_path: Path) -> None:
    assert run_cli("demo", "--signups", "20", cwd=tmp_path).returncode == 0
    again = run_cli("demo", "--signups", "20", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "20 users signed up; 2 have not confirmed" in again.stdout
    assert "2 users wait for their email confirmation" in again.stdout, again.stdout
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 36


def test_the_suggested_run_pending_writes_to_the_demos_own_outbox(tmp_path: Path) -> None:
    result = run_cli("demo", "--signups", "10", "--outbox", "mail out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    suggested = [line.strip() for line in result.stdout.splitlines() if "run-pending" in line and "batchjobs -A" in line]
    assert suggested and suggested[0].startswith("OUTBOX_DIR='mail out' batchjobs -A "), result.stdout
    assert not (tmp_path / "outbox").exists()
