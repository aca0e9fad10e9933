"""The web page without a browser: what it shows, and every way a write is refused.

The app is driven through Werkzeug's test client (a real WSGI call, no mocks) on a real database;
the standalone command runs as a real subprocess.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import jobapp
import pytest
import webdata
from conftest import BATCHJOBS, cli_env, run_cli, url_of, wait_for
from sqlalchemy import Engine, func, select, text

from batchjobs import run_pending
from batchjobs.db import create_engine
from batchjobs.history import RunRecorder
from batchjobs.schema import migrate
from batchjobs.store import store_for
from batchjobs.store.tables import BACKLOG, FAILURES, RUNS
from batchjobs.summary import JobStats, RunSummary
from batchjobs.timeutil import utcnow

pytest.importorskip("werkzeug", reason="the web page needs Werkzeug: pip install 'batchjobs[web]'")
pytest.importorskip("jinja2", reason="the web page needs Jinja2: pip install 'batchjobs[web]'")

from werkzeug.middleware.dispatcher import DispatcherMiddleware  # noqa: E402
from werkzeug.test import Client, TestResponse  # noqa: E402
from werkzeug.wrappers import Response  # noqa: E402

from batchjobs.web import create_app  # noqa: E402
from batchjobs.web.security import CSRF_COOKIE, CSRF_FIELD, check_bind, is_loopback  # noqa: E402


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = create_engine(sqlite_url)
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    yield engine
    engine.dispose()


def _token(client: Client, path: str = "/") -> str:
    """Load a page as a browser would; the CSRF token is its cookie and in its forms."""
    client.get(path)
    cookie = client.get_cookie(CSRF_COOKIE)
    assert cookie is not None
    return cookie.value


def _no_internals(response: TestResponse) -> None:
    """An answer carries no traceback, no SQL and no driver name (a stored failure's traceback aside)."""
    body = response.get_data(as_text=True)
    if 'id="traceback"' in body:
        return
    for leak in ("Traceback", "[SQL:", "FROM items", "batchjobs_failures", "sqlalchemy", "psycopg", "pymysql", "sqlite3"):
        assert leak not in body, (response.status, body)


def test_overview_shows_each_jobs_backlog(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine))

    page = client.get("/")

    assert page.status_code == 200
    html = page.get_data(as_text=True)
    row = re.search(r'<tr data-job="process_item">(.*?)</tr>', html, re.S)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    # 25 pending (16..40), 3 backing off, 2 dead; the run history's last run is shown with its outcome.
    shown = [re.sub(r"<[^>]+>", "", cell).strip() for cell in cells]
    assert (shown[0], shown[2], shown[4], shown[5]) == ("process_item", "25", "3", "2")
    assert '<span class="badge bad">2</span>' in cells[5]
    assert shown[7].startswith("finished")
    assert 'id="chart-data"' in html and '"process_item"' in html
    assert '<meta http-equiv="refresh" content="10">' in html
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
    for asset in ("uPlot.iife.min.js", "uPlot.min.css", "batchjobs.js", "batchjobs.css", "uPlot.LICENSE"):
        assert client.get(f"/static/{asset}").status_code == 200, asset


def test_job_page_lists_failing_rows_and_a_traceback(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine))

    page = client.get("/jobs/process_item").get_data(as_text=True)
    dead = client.get("/jobs/process_item?dead=1").get_data(as_text=True)
    one = client.get("/jobs/process_item/failure?key=19")

    assert re.findall(r'data-key="(\d+)"', page) == ["16", "17", "18", "19", "20"]
    assert re.findall(r'data-key="(\d+)"', dead) == ["19", "20"]
    assert "mailer.SMTPRecipientsRefused: &lt;nobody@example.invalid&gt; refused" in page
    assert one.status_code == 200
    assert 'File &#34;/srv/app/mailer.py&#34;, line 17, in send' in one.get_data(as_text=True)


def test_runs_page_marks_crashed_runs(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine))

    first = client.get("/runs").get_data(as_text=True)
    last = client.get("/runs?page=6").get_data(as_text=True)
    beyond = client.get("/runs?page=7").get_data(as_text=True)

    assert "289 run(s)" in first
    # The two runs that stopped beating without an end (the 41st and 42nd newest) crashed; the
    # worker that beats still runs.
    assert first.count('<tr class="outcome-row-finished">') == 47
    assert first.count('<tr class="outcome-row-crashed">') == 2
    assert first.count('<tr class="outcome-row-running">') == 1
    assert ">older &rarr;<" in first and ">older &rarr;<" not in last
    assert last.count('<tr class="outcome-row-finished">') == 39
    assert "No runs recorded." in beyond


def test_retry_one_row_after_confirming_and_logs_who(sqlite_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine, user=lambda environ: environ.get("HTTP_X_TEST_USER")))
    token = _token(client, "/jobs/process_item/failure?key=19")

    asked = client.post("/jobs/process_item/retry", data={CSRF_FIELD: token, "key": "19"})
    assert asked.status_code == 200 and "Retry row 19?" in asked.get_data(as_text=True)
    assert "19" in webdata.failure_keys(sqlite_engine), "nothing changes before the confirmation"

    with caplog.at_level(logging.INFO, logger="batchjobs.web"):
        done = client.post(
            "/jobs/process_item/retry",
            data={CSRF_FIELD: token, "key": "19", "confirmed": "1"},
            headers={"X-Test-User": "alice"},
        )

    assert done.status_code == 303
    assert done.headers["Location"].endswith("/jobs/process_item?done=retried&rows=1")
    assert webdata.failure_keys(sqlite_engine) == {"16", "17", "18", "20"}
    assert webdata.item_states(sqlite_engine)[19] is False  # pending, and now claimable again
    assert "alice (unknown address): retry row '19' of job process_item: 1 row(s) cleared" in caplog.text
    assert "1 row(s) will be tried again" in client.get(done.headers["Location"]).get_data(as_text=True)


def test_retry_all_dead_and_requeue_a_key_range(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine))
    token = _token(client)

    asked = client.post("/jobs/process_item/retry", data={CSRF_FIELD: token, "all_dead": "1"})
    assert '<b id="rows">2</b>' in asked.get_data(as_text=True)
    client.post("/jobs/process_item/retry", data={CSRF_FIELD: token, "all_dead": "1", "confirmed": "1"})
    assert webdata.failure_keys(sqlite_engine) == {"16", "17", "18"}

    fields = {CSRF_FIELD: token, "action": "requeue", "low": "3", "high": "7"}
    preview = client.post("/jobs/process_item/change", data=fields)
    assert '<b id="rows">5</b>' in preview.get_data(as_text=True)
    assert not any(webdata.item_states(sqlite_engine)[i] is False for i in range(3, 8))
    changed = client.post("/jobs/process_item/change", data={**fields, "confirmed": "1"})
    assert changed.headers["Location"].endswith("done=requeue&rows=5")
    states = webdata.item_states(sqlite_engine)
    assert [states[i] for i in range(1, 10)] == [True, True, False, False, False, False, False, True, True]

    client.post("/jobs/process_item/change", data={**fields, "action": "mark-done", "low": "16", "high": "17", "confirmed": "1"})
    assert webdata.item_states(sqlite_engine)[16] is True
    assert webdata.failure_keys(sqlite_engine) == {"18"}, "marking done clears the rows' failure records"


def test_standalone_auth_refuses_without_the_password(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine, auth=("ops", "s3cret")))

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    assert client.get("/").status_code == 401
    assert client.get("/").headers["WWW-Authenticate"].startswith('Basic realm="batchjobs"')
    assert client.get("/", headers=basic("ops", "wrong")).status_code == 401
    assert client.get("/", headers=basic("root", "s3cret")).status_code == 401
    assert client.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.post("/jobs/process_item/retry", data={"all_dead": "1", "confirmed": "1"}).status_code == 401
    assert client.get("/", headers=basic("ops", "s3cret")).status_code == 200
    assert webdata.failure_keys(sqlite_engine) == {"16", "17", "18", "19", "20"}


def test_writes_without_the_csrf_token_are_refused(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine))
    token = _token(client)
    confirmed = {"all_dead": "1", "confirmed": "1"}

    refused = [
        client.post("/jobs/process_item/retry", data=confirmed),  # no token in the form
        client.post("/jobs/process_item/retry", data={**confirmed, CSRF_FIELD: "x" * 43}),  # not the cookie's
        client.post("/jobs/process_item/retry", data={**confirmed, CSRF_FIELD: token}, headers={"Origin": "https://evil.example"}),
        Client(create_app(jobapp.jobs, sqlite_engine)).post("/jobs/process_item/retry", data={**confirmed, CSRF_FIELD: token}),
        client.get("/jobs/process_item/retry?all_dead=1&confirmed=1"),  # a link cannot write
    ]

    assert [r.status_code for r in refused] == [403, 403, 403, 403, 405]
    assert webdata.failure_keys(sqlite_engine) == {"16", "17", "18", "19", "20"}
    same_site = client.post("/jobs/process_item/retry", data={**confirmed, CSRF_FIELD: token}, headers={"Origin": "http://localhost"})
    assert same_site.status_code == 303


def test_read_only_shows_no_buttons_and_refuses_writes(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine)
    client = Client(create_app(jobapp.jobs, sqlite_engine, read_only=True))
    token = _token(client)

    pages = [client.get(path).get_data(as_text=True) for path in ("/", "/jobs/process_item", "/jobs/process_item/failure?key=19", "/runs")]
    writes = [
        client.post("/jobs/process_item/retry", data={CSRF_FIELD: token, "key": "19", "confirmed": "1"}),
        client.post("/jobs/process_item/change", data={CSRF_FIELD: token, "action": "requeue", "low": "1", "high": "9", "confirmed": "1"}),
    ]

    for html in pages:
        assert "<form" not in html and "<button" not in html
        assert "read-only" in html
    assert [w.status_code for w in writes] == [403, 403]
    assert webdata.failure_keys(sqlite_engine) == {"16", "17", "18", "19", "20"}
    assert webdata.item_states(sqlite_engine)[1] is True


@pytest.mark.parametrize(
    ("method", "path", "data", "code"),
    [
        ("GET", "/jobs/no_such_job", None, 404),
        ("GET", "/jobs/process_item/failure?key=999", None, 404),
        ("GET", "/jobs/process_item/failure", None, 400),
        ("GET", "/jobs/process_item/failure?key=" + "9" * 300, None, 400),
        ("GET", "/jobs/process_item/failure?key=1%00", None, 400),
        ("GET", "/jobs/process_item?page=0", None, 400),
        ("GET", "/jobs/process_item?page=-1", None, 400),
        ("GET", "/jobs/process_item?page=1e9", None, 400),
        ("GET", "/runs?page=99999999999999999999999999", None, 400),
        ("GET", "/runs?page=10001", None, 400),
        ("GET", "/nothing/here", None, 404),
        ("GET", "/static/../app.py", None, 404),
        ("POST", "/jobs/process_item/change", {"action": "requeue", "low": "abc", "high": "5"}, 400),
        ("POST", "/jobs/process_item/change", {"action": "requeue", "low": "1", "high": "9" * 40}, 400),
        ("POST", "/jobs/process_item/change", {"action": "requeue", "low": "1"}, 400),
        ("POST", "/jobs/process_item/change", {"action": "drop-table", "low": "1", "high": "5"}, 400),
        ("POST", "/jobs/process_item/retry", {"key": "999", "confirmed": "1"}, 400),
        ("POST", "/jobs/process_item/retry", {"key": "999"}, 404),
        ("POST", "/jobs/no_such_job/retry", {"all_dead": "1"}, 404),
    ],
)
def test_bad_parameters_get_a_plain_error_page(
    sqlite_engine: Engine, method: str, path: str, data: dict[str, str] | None, code: int
) -> None:
    webdata.seed(sqlite_engine, history=False)
    client = Client(create_app(jobapp.jobs, sqlite_engine))
    token = _token(client)

    response = client.open(path, method=method, data={**(data or {}), CSRF_FIELD: token} if method == "POST" else None)

    assert response.status_code == code, response.get_data(as_text=True)
    _no_internals(response)


INJECTIONS = ["1' OR '1'='1", "1; DROP TABLE items; --", '1" OR 1=1 --', "1) OR (1=1", "%' OR 1=1 --", "1 UNION SELECT 1"]


def test_injection_attempts_in_every_parameter_change_nothing(engine: Engine) -> None:
    webdata.seed(engine, history=False)
    # A failure record whose key looks like SQL: retrying it must clear exactly that record.
    with engine.begin() as conn:
        conn.execute(FAILURES.insert(), [webdata.failure(INJECTIONS[0], dead=True, now=utcnow())])
    client = Client(create_app(jobapp.jobs, engine))
    token = _token(client)
    before_items, before_failures = webdata.item_states(engine), webdata.failure_keys(engine)

    responses = []
    for evil in INJECTIONS:
        quoted = urllib.request.quote(evil, safe="")
        responses += [
            client.get(f"/jobs/{quoted}"),
            client.get(f"/jobs/process_item?page={quoted}"),
            client.get(f"/jobs/process_item?dead={quoted}&done={quoted}&rows={quoted}"),
            client.get(f"/jobs/process_item/failure?key={quoted}"),
            client.get(f"/runs?page={quoted}"),
            client.post(f"/jobs/{quoted}/retry", data={CSRF_FIELD: token, "all_dead": "1", "confirmed": "1"}),
            client.post("/jobs/process_item/retry", data={CSRF_FIELD: token, "key": evil + "x", "confirmed": "1"}),
            client.post("/jobs/process_item/change", data={CSRF_FIELD: token, "action": evil, "low": "1", "high": "2", "confirmed": "1"}),
            client.post("/jobs/process_item/change", data={CSRF_FIELD: token, "action": "requeue", "low": evil, "high": "2", "confirmed": "1"}),
            client.post("/jobs/process_item/change", data={CSRF_FIELD: token, "action": "requeue", "low": "1", "high": evil, "confirmed": "1"}),
        ]

    assert all(r.status_code in (200, 400, 404) for r in responses), sorted({r.status_code for r in responses})
    for response in responses:
        _no_internals(response)
    assert webdata.item_states(engine) == before_items
    assert webdata.failure_keys(engine) == before_failures

    shown = client.get("/jobs/process_item/failure?key=" + urllib.request.quote(INJECTIONS[0], safe=""))
    assert shown.status_code == 200 and "1&#39; OR &#39;1&#39;=&#39;1" in shown.get_data(as_text=True)
    retried = client.post("/jobs/process_item/retry", data={CSRF_FIELD: token, "key": INJECTIONS[0], "confirmed": "1"})
    assert retried.status_code == 303
    assert webdata.failure_keys(engine) == before_failures - {INJECTIONS[0]}
    assert webdata.item_states(engine) == before_items


def test_mounted_under_a_prefix_links_and_cookie_stay_under_it(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine, history=False)
    outer = DispatcherMiddleware(Response("the app", status=200), {"/ops/jobs": create_app(jobapp.jobs, sqlite_engine)})
    client = Client(outer)

    page = client.get("/ops/jobs/")
    html = page.get_data(as_text=True)

    assert page.status_code == 200
    assert 'href="/ops/jobs/jobs/process_item"' in html and 'src="/ops/jobs/static/batchjobs.js"' in html
    assert "Path=/ops/jobs/" in page.headers["Set-Cookie"] and "SameSite=Strict" in page.headers["Set-Cookie"]
    token = client.get_cookie(CSRF_COOKIE, path="/ops/jobs/")
    assert token is not None
    done = client.post("/ops/jobs/jobs/process_item/retry", data={CSRF_FIELD: token.value, "key": "19", "confirmed": "1"})
    assert done.headers["Location"].startswith("/ops/jobs/jobs/process_item?")


def test_database_not_migrated_is_a_clear_503(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    response = Client(create_app(jobapp.jobs, engine)).get("/")
    assert response.status_code == 503
    assert "run `batchjobs migrate`" in response.get_data(as_text=True)
    _no_internals(response)


def test_runs_sample_the_backlog_every_five_minutes(sqlite_engine: Engine) -> None:
    now = webdata.seed(sqlite_engine, history=False)
    # Every pending row backs off, so the runs leave each backlog as it was.
    with sqlite_engine.begin() as conn:
        conn.execute(
            FAILURES.insert(),
            [webdata.failure(str(key), dead=False, now=now) for key in range(21, 41)]
            + [webdata.failure(str(key), dead=False, now=now, job="send_receipt") for key in range(1, 8)],
        )

    run_pending(jobapp.jobs, sqlite_engine, queues=["mail"])
    run_pending(jobapp.jobs, sqlite_engine, queues=["mail"])
    run_pending(jobapp.jobs, sqlite_engine, queues=["items", "media"])

    with sqlite_engine.connect() as conn:
        samples = conn.execute(select(BACKLOG.c.job, BACKLOG.c.pending).order_by(BACKLOG.c.id)).all()
    # Taken as each run ends: one per job, however many runs end within five minutes.
    assert [tuple(s) for s in samples] == [("send_receipt", 7), ("process_item", 25), ("make_thumbnails", 0)]
    chart = Client(create_app(jobapp.jobs, sqlite_engine)).get("/").get_data(as_text=True)
    assert re.search(r'"pending": \[\[(null, )+25\]', chart), "the overview's chart ends with the sample just taken"


def test_a_table_a_migration_holds_costs_the_sample_not_the_run(pg_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    webdata.seed(pg_engine, history=False)
    with pg_engine.connect() as migration:
        migration.execute(text("LOCK TABLE items IN ACCESS EXCLUSIVE MODE"))
        with caplog.at_level(logging.WARNING, logger="batchjobs"):
            summary = run_pending(jobapp.jobs, pg_engine, lock_timeout=0.5)
        migration.rollback()

    assert summary.jobs["send_receipt"].done == 7, "the other jobs' rows were handled"
    lines = [record.getMessage() for record in caplog.records]
    assert "job process_item: its table stayed locked for 500ms (a migration?); skipped in this run" in lines
    assert [line for line in lines if line.startswith("backlog history")] == [
        "backlog history: pending rows not counted this time: canceling statement due to user request"
    ]
    with pg_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(BACKLOG)).scalar_one() == 0


def test_a_long_running_worker_samples_the_backlog_as_its_heartbeat_comes_round(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine, history=False)
    job = jobapp.jobs.job("process_item")
    started = utcnow()
    minutes = [0]  # the worker's clock: the test moves it on

    def clock() -> datetime:
        return started + timedelta(minutes=minutes[0])

    summary = RunSummary(jobs={job.name: JobStats()})
    recorder = RunRecorder(store_for(sqlite_engine), summary, [], clock, heartbeat_every=0.05, kind="worker", backlog=[job])

    def samples() -> list[tuple[Any, ...]]:
        with sqlite_engine.connect() as conn:
            return [tuple(row) for row in conn.execute(select(BACKLOG.c.job, BACKLOG.c.pending, BACKLOG.c.sampled_at))]

    def beaten() -> bool:
        with sqlite_engine.connect() as conn:
            last = conn.execute(select(RUNS.c.heartbeat_at).where(RUNS.c.id == recorder.run_id)).scalar_one()
        return bool(last >= clock())

    recorder.open()
    with recorder.running():
        recorder.start_heartbeat()
        minutes[0] = 4  # within five minutes of the start: no sample yet
        wait_for(beaten, "a heartbeat four minutes on")
        assert samples() == []
        minutes[0] = 6
        wait_for(lambda: len(samples()) == 1, "the sample of a heartbeat six minutes on")
        with sqlite_engine.begin() as conn:
            conn.execute(jobapp.Item.__table__.update().where(jobapp.Item.id > 30).values(processed=True))
        minutes[0] = 10  # within five minutes of that sample
        wait_for(beaten, "a heartbeat ten minutes on")
        assert len(samples()) == 1
        minutes[0] = 12
        wait_for(lambda: len(samples()) == 2, "the sample of a heartbeat twelve minutes on")
    # The worker's end takes none either: the last sample is not five minutes old.
    assert [(name, pending) for name, pending, _ in samples()] == [("process_item", 25), ("process_item", 15)]


def test_the_loopback_rule() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""))
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", ("ops", "pw"))
    with pytest.raises(Exception, match="refusing to serve on 0.0.0.0 without a password"):
        check_bind("0.0.0.0", None)


def test_web_command_refuses_other_hosts_without_a_password(sqlite_engine: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(sqlite_engine))

    refused = run_cli("-A", "jobapp:jobs", "web", "--host", "0.0.0.0", "--port", "0", env=env, timeout=30)
    bad_auth = run_cli("-A", "jobapp:jobs", "web", "--auth", "nopassword", env=env, timeout=30)

    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: refusing to serve on 0.0.0.0 without a password: pass --auth user:password or set "
        "$BATCHJOBS_WEB_AUTH (or bind 127.0.0.1)"
    ]
    assert bad_auth.returncode == 1 and bad_auth.stderr.count("\n") == 1 and "user:password" in bad_auth.stderr


def test_web_command_on_a_port_in_use_is_one_line(sqlite_engine: Engine) -> None:
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(sqlite_engine))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("-A", "jobapp:jobs", "web", "--port", str(port), env=env, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: cannot serve on 127.0.0.1:{port}: Address already in use"]


def test_web_command_serves_with_a_password_from_the_environment(sqlite_engine: Engine) -> None:
    webdata.seed(sqlite_engine, history=False)
    env = cli_env(BATCHJOBS_DATABASE_URL=url_of(sqlite_engine), BATCHJOBS_WEB_AUTH="ops:s3cret")
    server = subprocess.Popen(
        [BATCHJOBS, "-A", "jobapp:jobs", "web", "--host", "0.0.0.0", "--port", "0", "--read-only"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # bounded: the process prints it or exits
        match = re.match(r"batchjobs web page at http://0\.0\.0\.0:(\d+)/ \(password, read-only; Ctrl-C stops it\)", line)
        assert match, (line, server.poll())
        url = f"http://127.0.0.1:{match.group(1)}/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        request = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()})
        with urllib.request.urlopen(request, timeout=10) as page:
            html = page.read().decode()
        assert refused.value.code == 401
        assert '<td class="num pending">25</td>' in html and "s3cret" not in html
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "s3cret" not in out + err
