"""The list and stats API and the dashboard's routes, in-process, for ASGI, WSGI and Flask."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import flask
import httpx
import pytest
from starlette.applications import Starlette
from werkzeug.test import Client

import bgtasks
from bgtasks import wsgi
from bgtasks._dashboard import DashboardRoutes
from bgtasks._listing import (
    ListQuery,
    QueryError,
    decode_cursor,
    encode_cursor,
    list_registry,
    parse_list_query,
)
from bgtasks.asgi import BackgroundMiddleware
from bgtasks.flask import BgTasks

pytestmark = pytest.mark.anyio
XSS = "<img src=x onerror=alert(1)>"
JSON_HEADERS = {
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}
CANCEL = {"x-bgtasks-action": "cancel"}


def admin(request: Any) -> bool:
    return bool(request.headers.get("x-admin") == "yes")


def admin_environ(environ: Any) -> bool:
    return bool(environ.get("HTTP_X_ADMIN") == "yes")


# --------------------------------------------------------------------------- the listing itself
class FakeTask:
    def __init__(self, i: int, status: str, name: str) -> None:
        self._id = f"task{i:06d}"
        self._name = name
        self._status = status
        self._created_at = 1000.0 + i // 3  # ties on time: the order must still hold

    @property
    def record(self) -> bgtasks.TaskRecord:
        return bgtasks.TaskRecord(
            id=self._id, name=self._name, status=self._status, created_at=self._created_at
        )


def registry(n: int) -> dict[str, Any]:
    statuses = ["pending", "running", "succeeded", "failed", "cancelled"]
    tasks = [FakeTask(i, statuses[i % 5], f"job{i % 3}") for i in range(n)]
    return {t._id: t for t in tasks}


def walk(reg: dict[str, Any], **kw: Any) -> list[str]:
    seen: list[str] = []
    cursor = None
    for _ in range(1000):
        query = ListQuery(cursor=cursor, **kw)
        page = list_registry(reg, query)
        seen.extend(r.id for r in page.items)
        cursor = page.next_cursor
        if cursor is None:
            return seen
    raise AssertionError("the cursor never ended")


def test_pages_visit_every_task_once_newest_first() -> None:
    reg = registry(237)
    seen = walk(reg, limit=50)
    assert seen == list(reversed(reg))
    assert walk(reg, limit=237) == seen
    assert walk(reg, limit=1)[:3] == seen[:3]


def test_filters_by_status_and_name() -> None:
    reg = registry(100)
    seen = walk(reg, statuses=("failed", "running"), names=("job1",), limit=7)
    expected = [
        k
        for k in reversed(reg)
        if reg[k]._status in ("failed", "running") and reg[k]._name == "job1"
    ]
    assert seen == expected and expected


def test_new_tasks_during_paging_and_expired_cursor_task() -> None:
    reg = registry(30)
    first = list_registry(reg, ListQuery(limit=10))
    reg.update({t._id: t for t in [FakeTask(99, "pending", "new")]})  # lands on an earlier page
    assert first.next_cursor is not None
    last = first.items[-1].id
    del reg[last]  # the cursor's own task expires
    rest = walk_from(reg, first.next_cursor)
    assert [r.id for r in first.items] + rest == [f"task{i:06d}" for i in range(29, -1, -1)]


def walk_from(reg: dict[str, Any], cursor: str | None) -> list[str]:
    seen: list[str] = []
    while cursor is not None:
        page = list_registry(reg, ListQuery(limit=10, cursor=cursor))
        seen.extend(r.id for r in page.items)
        cursor = page.next_cursor
    return seen


def test_query_parsing_and_its_errors() -> None:
    q = parse_list_query({"status": ["failed", "failed"], "name": ["a"], "limit": ["5"]})
    assert q == ListQuery(statuses=("failed",), names=("a",), limit=5)
    cursor = encode_cursor(12.5, "abc")
    assert parse_list_query({"cursor": [cursor]}).after == (12.5, "abc")
    assert decode_cursor(cursor) == (12.5, "abc")
    for bad, message in [
        ({"status": ["done"]}, "status must be one of"),
        ({"limit": ["0"]}, "limit must be a whole number from 1 to 500"),
        ({"limit": ["x"]}, "limit must be"),
        ({"limit": ["1", "2"]}, "limit at most once"),
        ({"cursor": ["garbage!"]}, "invalid cursor 'garbage!': pass back the next_cursor"),
        ({"cursor": [encode_cursor(1, "a")[:-2] + "zz"]}, "invalid cursor"),
        ({"name": [""]}, "name must be 1 to 200 characters"),
    ]:
        with pytest.raises(QueryError, match=message):
            parse_list_query(bad)


def test_a_dashboard_needs_a_callable_and_a_good_prefix() -> None:
    with pytest.raises(TypeError, match="dashboard must be a function"):
        DashboardRoutes(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dashboard_prefix must start with '/'"):
        DashboardRoutes(admin, prefix="admin/")


# --------------------------------------------------------------------------- ASGI
@pytest.fixture
async def asgi() -> AsyncIterator[tuple[httpx.AsyncClient, BackgroundMiddleware]]:
    from asgi_lifespan import LifespanManager

    mw = BackgroundMiddleware(Starlette(), dashboard=admin, runtime=bgtasks.Runtime())
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers={"x-admin": "yes"}
        ) as client:
            yield client, mw


async def some_tasks(rt: bgtasks.Runtime) -> tuple[str, asyncio.Event]:
    gate = asyncio.Event()

    async def ok() -> dict[str, int]:
        return {"n": 1}

    async def fail() -> None:
        raise RuntimeError("nope")

    async def hold() -> None:
        await gate.wait()

    for _i in range(3):
        await rt.wait_until(ok(), name="ok").wait(5)
    await rt.wait_until(fail(), name="fail").wait(5)
    held = rt.wait_until(hold(), name=XSS)
    return held.id, gate


async def test_asgi_list_stats_and_detail(asgi: tuple[httpx.AsyncClient, Any]) -> None:
    client, mw = asgi
    _held, gate = await some_tasks(mw.runtime)
    r = await client.get("/_bgtasks/api/tasks", params={"limit": 2})
    assert r.status_code == 200
    for key, value in JSON_HEADERS.items():
        assert r.headers[key] == value
    body = r.json()
    assert [i["name"] for i in body["items"]] == [XSS, "fail"]
    assert all("result" not in i for i in body["items"])
    assert body["scope"] == "process"
    r = await client.get("/_bgtasks/api/tasks", params={"cursor": body["next_cursor"]})
    assert [i["name"] for i in r.json()["items"]] == ["ok"] * 3
    assert r.json()["next_cursor"] is None
    r = await client.get(
        "/_bgtasks/api/tasks", params=[("status", "failed"), ("status", "running")]
    )
    assert [i["status"] for i in r.json()["items"]] == ["running", "failed"]
    r = await client.get("/_bgtasks/api/tasks", params={"name": "ok", "limit": 501})
    assert r.status_code == 400 and "limit must be" in r.json()["detail"]
    stats = (await client.get("/_bgtasks/api/stats")).json()
    assert stats["by_status"] == {
        "pending": 0,
        "running": 1,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 0,
    }
    assert stats["by_name"] == {"ok": 3, "fail": 1, XSS: 1}
    assert stats["total"] == 5
    ok_id = (await client.get("/_bgtasks/api/tasks", params={"name": "ok"})).json()["items"][0][
        "id"
    ]
    detail = (await client.get(f"/_bgtasks/api/tasks/{ok_id}")).json()
    assert detail["result"] == {"n": 1}
    assert (await client.get("/_bgtasks/api/tasks/unknown")).status_code == 404
    gate.set()


async def test_asgi_page_and_files(asgi: tuple[httpx.AsyncClient, Any]) -> None:
    client, _ = asgi
    r = await client.get("/_bgtasks")
    assert r.status_code == 308 and r.headers["location"] == "/_bgtasks/"
    r = await client.get("/_bgtasks/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and 'src="static/app.js"' in r.text
    assert 'data-live="sse"' in r.text
    for name, content_type in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        r = await client.get(f"/_bgtasks/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == content_type
        assert r.headers["x-content-type-options"] == "nosniff"
    assert (await client.get("/_bgtasks/static/../__init__.py")).status_code == 404
    assert (await client.get("/_bgtasks/nothing")).status_code == 404
    assert (await client.put("/_bgtasks/api/tasks")).status_code == 405


async def test_asgi_dashboard_is_404_when_the_callable_says_no(
    asgi: tuple[httpx.AsyncClient, Any],
) -> None:
    client, _ = asgi
    for path in (
        "/_bgtasks/",
        "/_bgtasks/api/tasks",
        "/_bgtasks/api/stats",
        "/_bgtasks/static/app.js",
    ):
        r = await client.get(path, headers={"x-admin": "no"})
        assert r.status_code == 404, path


async def test_asgi_without_dashboard_every_path_is_the_apps() -> None:
    from asgi_lifespan import LifespanManager

    mw = BackgroundMiddleware(Starlette())
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/_bgtasks/")).status_code == 404
            assert (await client.get("/_bgtasks/api/tasks")).status_code == 404


async def test_asgi_async_dashboard_callable() -> None:
    from asgi_lifespan import LifespanManager

    async def allow(request: Any) -> bool:
        await asyncio.sleep(0)
        return True

    mw = BackgroundMiddleware(Starlette(), dashboard=allow)
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/_bgtasks/api/stats")).status_code == 200


async def test_asgi_cancel_and_its_guards(asgi: tuple[httpx.AsyncClient, Any]) -> None:
    client, mw = asgi
    held, _gate = await some_tasks(mw.runtime)
    url = f"/_bgtasks/api/tasks/{held}/cancel"
    assert (await client.get(url)).status_code == 405
    r = await client.post(url)
    assert r.status_code == 403 and "x-bgtasks-action" in r.json()["detail"]
    r = await client.post(url, headers={**CANCEL, "sec-fetch-site": "cross-site"})
    assert r.status_code == 403 and "another site" in r.json()["detail"]
    r = await client.post(url, headers={**CANCEL, "origin": "https://evil.example"})
    assert r.status_code == 403 and "another origin" in r.json()["detail"]
    assert mw.runtime.get(held).status == "running"
    r = await client.post(
        url, headers={**CANCEL, "origin": "http://t", "sec-fetch-site": "same-origin"}
    )
    assert r.status_code == 200
    handle = mw.runtime.handle(held)
    assert (await handle.wait(5)).status == "cancelled"
    r = await client.post(url, headers=CANCEL)
    assert r.status_code == 409 and r.json()["status"] == "cancelled"
    r = await client.post("/_bgtasks/api/tasks/unknown/cancel", headers=CANCEL)
    assert r.status_code == 404


async def test_asgi_read_only_refuses_cancels() -> None:
    from asgi_lifespan import LifespanManager

    mw = BackgroundMiddleware(Starlette(), dashboard=lambda r: True, dashboard_read_only=True)
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held, gate = await some_tasks(mw.runtime)
            r = await client.post(f"/_bgtasks/api/tasks/{held}/cancel", headers=CANCEL)
            assert r.status_code == 403 and "read-only" in r.json()["detail"]
            page = (await client.get("/_bgtasks/")).text
            assert 'data-read-only="yes"' in page
            gate.set()


async def test_asgi_dashboard_prefix_and_result_hidden() -> None:
    from asgi_lifespan import LifespanManager

    mw = BackgroundMiddleware(
        Starlette(), dashboard=lambda r: True, dashboard_prefix="/ops/tasks", include_result=False
    )
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def ok() -> int:
                return 5

            handle = mw.runtime.wait_until(ok(), name="ok")
            await handle.wait(5)
            r = await client.get(f"/ops/tasks/api/tasks/{handle.id}")
            assert r.status_code == 200 and "result" not in r.json()
            assert (await client.get("/_bgtasks/api/tasks")).status_code == 404


# --------------------------------------------------------------------------- WSGI and Flask
@pytest.fixture
def plain_wsgi() -> Iterator[tuple[Client, wsgi.BackgroundMiddleware]]:
    mw = wsgi.BackgroundMiddleware(lambda e, s: [], dashboard=admin_environ)
    mw._host.ensure_started()
    try:
        yield Client(mw), mw
    finally:
        assert mw.stop(10)


def sync_tasks(rt: bgtasks.Runtime) -> tuple[str, threading.Event]:
    gate = threading.Event()

    def fail() -> None:
        raise RuntimeError("nope")

    for fn, name in ((lambda: 1, "ok"), (fail, "fail")):
        handle = rt.wait_until(fn, name=name)
        handle.wait_sync(5)
    held = rt.wait_until(gate.wait, 10, name=XSS)
    return held.id, gate


def check_sync_dashboard(
    get: Callable[..., Any], post: Callable[..., Any], rt: bgtasks.Runtime
) -> None:
    held, gate = sync_tasks(rt)
    try:
        r = get("/_bgtasks/api/tasks")
        assert r.status_code == 200
        assert [i["name"] for i in r.get_json()["items"]] == [XSS, "fail", "ok"]
        for key, value in JSON_HEADERS.items():
            assert r.headers[key] == value
        assert get("/_bgtasks/api/tasks?limit=0").status_code == 400
        assert get("/_bgtasks/api/stats").get_json()["by_status"]["failed"] == 1
        page = get("/_bgtasks/")
        assert page.status_code == 200 and b'data-live="poll"' in page.data
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert get("/_bgtasks/api/events").status_code == 404  # WSGI pages poll
        assert get("/_bgtasks/api/stats", headers={"x-admin": "no"}).status_code == 404
        url = f"/_bgtasks/api/tasks/{held}/cancel"
        assert post(url).status_code == 403
        assert post(url, headers={**CANCEL, "Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert post(url, headers=CANCEL).status_code == 200
        handle = rt.handle(held)
        assert handle is not None and handle.wait_sync(5).status == "cancelled"
    finally:
        gate.set()


def test_wsgi_dashboard(plain_wsgi: tuple[Client, wsgi.BackgroundMiddleware]) -> None:
    client, mw = plain_wsgi
    headers = {"X-Admin": "yes"}

    def get(path: str, headers: dict[str, str] = headers) -> Any:
        return client.get(path, headers=headers)

    def post(path: str, headers: dict[str, str] | None = None) -> Any:
        return client.post(path, headers={"X-Admin": "yes", **(headers or {})})

    check_sync_dashboard(get, post, mw.runtime)


def test_wsgi_async_dashboard_callable_is_refused_with_the_fix() -> None:
    async def allow(environ: Any) -> bool:
        return True

    mw = wsgi.BackgroundMiddleware(lambda e, s: [], dashboard=allow)  # type: ignore[arg-type]
    try:
        with pytest.raises(TypeError, match="not `async def`"):
            Client(mw).get("/_bgtasks/api/stats")
    finally:
        assert mw.stop(10)


def test_flask_dashboard_runs_the_callable_in_the_request_context() -> None:
    app = flask.Flask(__name__)
    seen: list[str] = []

    def allow(request: Any) -> bool:
        seen.append(flask.request.path)
        return bool(request.headers.get("X-Admin") == "yes")

    ext = BgTasks(app, dashboard=allow)
    client = app.test_client()
    try:

        def get(path: str, headers: dict[str, str] | None = None) -> Any:
            return client.get(path, headers=headers or {"X-Admin": "yes"})

        def post(path: str, headers: dict[str, str] | None = None) -> Any:
            return client.post(path, headers={"X-Admin": "yes", **(headers or {})})

        client.get("/")  # starts the runtime
        check_sync_dashboard(get, post, ext.runtime_for(app))
        assert "/_bgtasks/api/tasks" in seen
    finally:
        assert ext.stop(app, 10)


def test_flask_push_on_its_status_routes() -> None:
    app = flask.Flask(__name__)
    ext = BgTasks(app)
    client = app.test_client()
    try:
        client.get("/")
        rt = ext.runtime_for(app)
        gate = threading.Event()
        handle = rt.wait_until(gate.wait, 10, name="gated")
        r = client.get(f"/_bgtasks/tasks/{handle.id}?wait=0.05")
        assert r.status_code == 200 and r.get_json()["status"] == "running"
        threading.Timer(0.1, gate.set).start()
        r = client.get(f"/_bgtasks/tasks/{handle.id}/events")
        assert r.status_code == 200 and b'"status":"succeeded"' in r.data
        r = client.get(f"/_bgtasks/tasks/{handle.id}")  # the plain status view still answers
        assert r.status_code == 200
    finally:
        assert ext.stop(app, 10)


# --------------------------------------------------------------------------- a shared store
async def test_sqlite_store_lists_every_process_tasks_and_push_polls_the_store(
    tmp_path: Any,
) -> None:
    """Two runtimes on one SQLite file, as two worker processes: either one's
    dashboard lists both's tasks, and a long-poll on one follows a task the other runs."""
    from asgi_lifespan import LifespanManager

    from bgtasks import WatchConfig

    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    other = bgtasks.Runtime(store=url)
    mw = BackgroundMiddleware(
        Starlette(),
        runtime=bgtasks.Runtime(store=url),
        dashboard=lambda r: True,
        watch=WatchConfig(poll=0.05),
    )
    gate = asyncio.Event()

    async def work(n: int) -> int:
        await gate.wait()
        return n

    async with other, LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            theirs = [other.wait_until(work(i), name=f"theirs-{i}") for i in range(3)]
            mine = mw.runtime.wait_until(work(9), name="mine")
            await other.store.flush()  # type: ignore[attr-defined]
            await mw.runtime.store.flush()  # type: ignore[attr-defined]
            seen: list[str] = []
            cursor = None
            while True:
                params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
                page = (await client.get("/_bgtasks/api/tasks", params=params)).json()
                assert page["scope"] == "store"
                seen += [item["name"] for item in page["items"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert seen == ["mine", "theirs-2", "theirs-1", "theirs-0"]
            stats = (await client.get("/_bgtasks/api/stats")).json()
            assert stats["scope"] == "store" and stats["by_status"]["running"] == 4
            assert stats["by_name"]["mine"] == 1
            # A long-poll here on a task the other runtime runs: read again every poll.
            waiting = asyncio.ensure_future(
                client.get(f"/_bgtasks/tasks/{theirs[0].id}", params={"wait": "10"})
            )
            await asyncio.sleep(0.1)
            assert not waiting.done()
            gate.set()
            r = await asyncio.wait_for(waiting, 10)
            assert r.json()["status"] == "succeeded" and r.json()["result"] == 0
            await mine.wait(5)
            assert mw.watch.slots.taken == 0 and mw.runtime._hub.count() == 0
