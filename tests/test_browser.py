"""The dashboard in a real browser: Debian's chromium driven by Playwright.

Against a real uvicorn (ASGI, live updates by SSE) and a real gunicorn
gthread (Flask, live updates by polling) server. Playwright's own browser
download does not work on these machines, so the system chromium is used
(``apt-get install chromium``; ``.ci/run`` installs it when missing).
``BGTASKS_SCREENSHOTS=<dir>`` saves screenshots of the list and the detail view.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serverutil import Server, free_port, python_argv

pytestmark = pytest.mark.server

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright is not installed: pip install 'bgtasks[dev]'"
)

CHROMIUM = os.environ.get("BGTASKS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no chromium at {CHROMIUM}: install Debian's (apt-get install chromium) or point "
        "BGTASKS_CHROMIUM at one",
        allow_module_level=True,
    )

XSS = "<img src=x onerror=alert(1)>"
WAIT_MS = 15_000
SHOTS = os.environ.get("BGTASKS_SCREENSHOTS")


def uvicorn() -> Server:
    port = free_port()
    argv = python_argv(
        "-m", "uvicorn", "watch_apps:app", "--host", "127.0.0.1", "--port", str(port)
    )
    return Server(argv, port=port, env={"BGTASKS_WATCH_APP": "asgi"})


def gunicorn() -> Server:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--no-control-socket",
        "-k",
        "gthread",
        "--threads",
        "8",
        "-w",
        "1",
        "-b",
        f"127.0.0.1:{port}",
        "watch_apps:app",
    ]
    return Server(argv, port=port, env={"BGTASKS_WATCH_APP": "flask"})


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(params=["uvicorn", "gunicorn"], scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    with uvicorn() if request.param == "uvicorn" else gunicorn() as srv:
        yield srv


class Page:
    """A tab logged in as admin that records every console error and page error."""

    def __init__(self, browser: Any, srv: Server) -> None:
        self.srv = srv
        self.context = browser.new_context()
        self.context.add_cookies([{"name": "admin", "value": "yes", "url": srv.url}])
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        self.page.on("dialog", on_dialog)

    def open(self, query: str = "") -> Any:
        self.page.goto(f"{self.srv.url}/_bgtasks/{query}")
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, server: Server) -> Iterator[Page]:
    page = Page(browser, server)
    yield page
    try:
        assert page.errors == [], f"the browser console shows errors: {page.errors}"
        assert page.dialogs == []
    finally:
        page.close()


def spawn(srv: Server, kind: str, name: str | None = None) -> str:
    params = {"kind": kind, **({"name": name} if name else {})}
    task_id: str = httpx.post(f"{srv.url}/spawn", params=params, timeout=5).json()["id"]
    return task_id


def steer(srv: Server, task_id: str, **params: str) -> None:
    assert httpx.post(f"{srv.url}/steer/{task_id}", params=params, timeout=5).status_code == 200


def record(srv: Server, task_id: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{srv.url}/_bgtasks/tasks/{task_id}", timeout=5).json()
    return found


def row(page: Any, task_id: str) -> Any:
    return page.locator(f'#tasks tbody tr[data-id="{task_id}"]')


def test_list_shows_running_failed_and_succeeded(tab: Page) -> None:
    srv = tab.srv
    ok = spawn(srv, "ok", "send-email")
    failed = spawn(srv, "fail", "resize-image")
    running = spawn(srv, "hold", "build-report")
    steer(srv, running, done="2", total="5")
    page = tab.open()
    expect = playwright_api.expect
    expect(row(page, ok).locator(".status")).to_have_text("succeeded")
    expect(row(page, failed).locator(".status")).to_have_text("failed")
    expect(row(page, running).locator(".status")).to_have_text("running")
    expect(row(page, running).locator(".name")).to_have_text("build-report")
    expect(row(page, running)).to_contain_text("2 / 5")
    expect(page.locator("#count-running")).not_to_have_text("0")
    expect(page.locator("#scope-note")).to_contain_text("one worker process")
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "dashboard-list.png"), full_page=True)
    # A task started after the page opened appears without a reload.
    later = spawn(srv, "ok", "arrived-later")
    expect(row(page, later).locator(".status")).to_have_text("succeeded")
    steer(srv, running, do="finish")


def test_filters_work_and_survive_a_reload(tab: Page) -> None:
    srv = tab.srv
    ok = spawn(srv, "ok", "filter-ok")
    failed = spawn(srv, "fail", "filter-fail")
    page = tab.open()
    expect = playwright_api.expect
    expect(row(page, ok)).to_be_visible()
    page.check("#filter-failed")
    page.fill("#name-filter", "filter-fail")
    page.click("#filters button[type=submit]")
    expect(row(page, failed)).to_be_visible()
    expect(row(page, ok)).to_have_count(0)
    assert re.search(r"status=failed", page.url) and "name=filter-fail" in page.url
    page.reload()
    expect(row(page, failed)).to_be_visible()
    expect(row(page, ok)).to_have_count(0)
    expect(page.locator("#filter-failed")).to_be_checked()
    expect(page.locator("#name-filter")).to_have_value("filter-fail")
    # Every row shown is a failed one.
    statuses = page.locator("#tasks tbody .status").all_inner_texts()
    assert statuses and set(statuses) == {"failed"}
    page.click("#clear-filters")
    expect(row(page, ok)).to_be_visible()


def test_open_by_id_and_live_progress_in_the_detail_view(tab: Page) -> None:
    srv = tab.srv
    task_id = spawn(srv, "hold", "import-csv")
    page = tab.open()
    page.fill("#open-id", task_id)
    page.click("#open-form button")
    expect = playwright_api.expect
    expect(page.locator("#detail-name")).to_have_text("import-csv")
    assert f"task={task_id}" in page.url
    expect(page.locator("#detail-status")).to_have_text("running")
    steer(srv, task_id, done="3", total="10")
    expect(page.locator("#progress-text")).to_have_text("3 / 10 step 3")
    assert page.locator("#progress-bar").get_attribute("value") == "3"
    steer(srv, task_id, done="7", total="10")
    expect(page.locator("#progress-text")).to_have_text("7 / 10 step 7")
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / "dashboard-detail.png"), full_page=True)
    steer(srv, task_id, do="finish")
    expect(page.locator("#detail-status")).to_have_text("succeeded")
    expect(page.locator("#detail-result")).to_have_text('"finished"')
    expect(page.locator("#cancel")).to_be_hidden()


def test_failed_task_shows_its_error(tab: Page) -> None:
    task_id = spawn(tab.srv, "fail", "will-fail")
    page = tab.open(f"?task={task_id}")
    playwright_api.expect(page.locator("#detail-error")).to_have_text("RuntimeError: it broke")


def test_cancel_cancels(tab: Page) -> None:
    srv = tab.srv
    task_id = spawn(srv, "hold", "long-job")
    page = tab.open(f"?task={task_id}")
    expect = playwright_api.expect
    expect(page.locator("#cancel")).to_be_visible()
    page.click("#cancel")
    expect(page.locator("#detail-status")).to_have_text("cancelled")
    assert record(srv, task_id)["status"] == "cancelled"
    expect(page.locator("#cancel")).to_be_hidden()


def test_a_task_named_like_html_is_shown_as_text(tab: Page) -> None:
    srv = tab.srv
    task_id = spawn(srv, "hold", XSS)
    page = tab.open()
    expect = playwright_api.expect
    expect(row(page, task_id).locator(".name")).to_have_text(XSS)
    assert page.locator("#tasks img").count() == 0
    page.goto(f"{srv.url}/_bgtasks/?task={task_id}")
    expect(page.locator("#detail-name")).to_have_text(XSS)
    assert page.locator("main img").count() == 0
    steer(srv, task_id, do="finish")
    assert tab.dialogs == []


def test_read_only_dashboard_has_no_cancel(browser: Any) -> None:
    port = free_port()
    argv = python_argv(
        "-m", "uvicorn", "watch_apps:app", "--host", "127.0.0.1", "--port", str(port)
    )
    env = {"BGTASKS_WATCH_APP": "asgi", "BGTASKS_READ_ONLY": "1"}
    with Server(argv, port=port, env=env) as srv:
        tab = Page(browser, srv)
        try:
            task_id = spawn(srv, "hold", "read-only-view")
            page = tab.open(f"?task={task_id}")
            expect = playwright_api.expect
            expect(page.locator("#detail-status")).to_have_text("running")
            expect(page.locator("#cancel")).to_be_hidden()
            # Forged by hand (the page never sends it): refused.
            r = httpx.post(
                f"{srv.url}/_bgtasks/api/tasks/{task_id}/cancel",
                headers={"x-bgtasks-action": "cancel"},
                cookies={"admin": "yes"},
                timeout=5,
            )
            assert r.status_code == 403
            assert record(srv, task_id)["status"] == "running"
            steer(srv, task_id, do="finish")
            expect(page.locator("#detail-status")).to_have_text("succeeded")
            assert tab.errors == []
        finally:
            tab.close()


def test_polling_never_overlaps_and_rests_in_hidden_tabs(browser: Any) -> None:
    """Under WSGI the page polls: one request at a time, none while the tab is hidden."""
    with gunicorn() as srv:
        tab = Page(browser, srv)
        # Each list request takes 2.5 s, longer than the 2 s between polls.
        tab.context.add_cookies([{"name": "delay", "value": "2.5", "url": srv.url}])
        state = {"inflight": 0, "most": 0, "sent": 0}

        def is_list(request: Any) -> bool:
            return "/_bgtasks/api/tasks" in request.url

        def sent(request: Any) -> None:
            if is_list(request):
                state["sent"] += 1
                state["inflight"] += 1
                state["most"] = max(state["most"], state["inflight"])

        def done(request: Any) -> None:
            if is_list(request):
                state["inflight"] -= 1

        tab.page.on("request", sent)
        tab.page.on("requestfinished", done)
        tab.page.on("requestfailed", done)
        try:
            page = tab.open()
            page.wait_for_timeout(8_000)
            assert state["sent"] >= 2
            assert state["most"] == 1, "a poll started while another was in flight"
            page.evaluate(
                "Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
                "document.dispatchEvent(new Event('visibilitychange'));"
            )
            for _ in range(100):  # the poll in flight, if any, ends
                if state["inflight"] == 0:
                    break
                page.wait_for_timeout(100)
            hidden_at = state["sent"]
            page.wait_for_timeout(5_000)
            assert state["sent"] <= hidden_at + 1  # at most one timer that was already set
            paused = state["sent"]
            page.wait_for_timeout(3_000)
            assert state["sent"] == paused, "it polls while the tab is hidden"
            page.evaluate(
                "Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
                "document.dispatchEvent(new Event('visibilitychange'));"
            )
            page.wait_for_timeout(1_000)
            assert state["sent"] > paused, "polling did not resume when the tab came back"
            assert state["most"] == 1
            assert tab.errors == []
        finally:
            tab.close()
