"""The web page in a real browser: headless Chromium (Debian's package) driven by Playwright.

Where no Chromium or no Playwright can be had, the test skips with one line saying which. The
screenshots go to the test's temporary folder, or to $BATCHJOBS_WEB_SCREENSHOTS when set (the
docs' screenshot is made that way).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import jobapp
import pytest
import webdata
from sqlalchemy import Engine

from batchjobs.db import create_engine
from batchjobs.schema import migrate

pytest.importorskip("werkzeug", reason="the web page needs Werkzeug: pip install 'batchjobs[web]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="no Playwright for Python: pip install playwright")

from werkzeug.serving import make_server  # noqa: E402

from batchjobs.web import create_app  # noqa: E402

#: Debian's chromium package; Playwright drives it instead of downloading a browser of its own.
CHROMIUM = os.environ.get("BATCHJOBS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    jobapp.Base.metadata.create_all(engine)
    migrate(engine)
    webdata.seed(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def served(seeded: Engine) -> Iterator[str]:
    """The page on 127.0.0.1 and a free port, served from a thread of this process."""
    server = make_server("127.0.0.1", 0, create_app(jobapp.jobs, seeded, refresh=0), threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="web-test-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set BATCHJOBS_TEST_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        try:
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except sync_api.Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(exc).splitlines()[0]}")
        try:
            yield launched
        finally:
            launched.close()


def test_overview_traceback_retry_and_confirm(served: str, seeded: Engine, browser: object, tmp_path: Path) -> None:
    shots = Path(os.environ.get("BATCHJOBS_WEB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

    page.goto(served + "/")
    row = page.locator('tr[data-job="process_item"]')
    sync_api.expect(row.locator("td.pending")).to_have_text("25")
    sync_api.expect(row.locator("td.dead")).to_have_text("2")
    sync_api.expect(row.locator("td.backoff")).to_have_text("3")
    sync_api.expect(page.locator('tr[data-job="send_receipt"] td.pending')).to_have_text("7")
    # uPlot drew both charts, from the files the package ships (the page loads nothing from elsewhere).
    sync_api.expect(page.locator("#chart-pending canvas")).to_have_count(1)
    sync_api.expect(page.locator("#chart-done canvas")).to_have_count(1)
    page.screenshot(path=str(shots / "web-overview.png"), full_page=True)

    page.click('tr[data-job="process_item"] a')
    page.click('tr[data-key="19"] td:first-child a')
    sync_api.expect(page.locator("#traceback")).to_contain_text("mailer.SMTPRecipientsRefused: <nobody@example.invalid> refused")
    sync_api.expect(page.locator("#traceback")).to_contain_text('File "/srv/app/mailer.py", line 17, in send')
    page.screenshot(path=str(shots / "web-traceback.png"), full_page=True)

    page.click("text=Retry this row")
    sync_api.expect(page.locator("h1")).to_have_text("Retry row 19?")
    assert "19" in webdata.failure_keys(seeded), "nothing changes before the confirmation"
    page.screenshot(path=str(shots / "web-confirm.png"))
    page.click("text=Confirm")

    sync_api.expect(page.locator(".flash")).to_have_text("1 row(s) will be tried again on the next run.")
    sync_api.expect(page.locator('tr[data-key="19"]')).to_have_count(0)
    assert webdata.failure_keys(seeded) == {"16", "17", "18", "20"}
    assert webdata.item_states(seeded)[19] is False, "row 19 is pending, with no failure record holding it back"
    page.screenshot(path=str(shots / "web-job.png"), full_page=True)
    assert errors == []
