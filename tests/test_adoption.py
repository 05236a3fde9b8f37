"""Adding bgtasks to an app changes nothing for routes and tests that do not use it.

One regression test (or more) per item of the "transparent adoption" issue:
FastAPI without a lifespan, trio, Flask streaming, Flask app factories,
Flask's deprecations, warnings.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from flask import Flask, g, has_request_context, request, stream_with_context

import bgtasks
from bgtasks.asgi import BackgroundMiddleware, stop_runtime
from bgtasks.flask import BgTasks

with warnings.catch_warnings():
    # Starlette asks for httpx2 and works with httpx; the warning is not ours.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bgtasks-loop" and t.is_alive()]


def wait_for(predicate: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def fastapi_app() -> tuple[FastAPI, bgtasks.Runtime]:
    rt = bgtasks.Runtime(shutdown_grace=2.0)
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=rt)

    @app.get("/plain")
    def plain() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/plain-async")
    async def plain_async() -> dict[str, str]:
        return {"hello": "async"}

    @app.post("/job")
    @bgtasks.background
    async def job(n: int) -> int:
        await asyncio.sleep(0)
        return n

    @app.post("/sync-job")
    @bgtasks.background
    def sync_job(n: int) -> int:
        return n * 10

    return app, rt


def finished(rt: bgtasks.Runtime, task_id: str) -> bgtasks.TaskRecord:
    handle = rt.handle(task_id)
    assert handle is not None, f"unknown task {task_id}"
    return handle.wait_sync(WAIT)


# ------------------------------------------------------------ 1. FastAPI without a lifespan
def test_testclient_without_with_leaves_plain_routes_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, rt = fastapi_app()
    client = TestClient(app)  # as FastAPI's tutorial writes it: no `with`
    before = loop_threads()
    with caplog.at_level(logging.DEBUG, logger="bgtasks"):
        for _ in range(3):
            assert client.get("/plain").json() == {"hello": "world"}
            assert client.get("/plain-async").json() == {"hello": "async"}
    assert not rt.started
    assert loop_threads() == before
    assert caplog.records == []


def test_testclient_without_with_answers_202_on_every_request() -> None:
    app, rt = fastapi_app()
    client = TestClient(app)
    try:
        ids = [client.post("/job", params={"n": n}).json()["id"] for n in range(3)]
        ids += [client.post("/sync-job", params={"n": n}).json()["id"] for n in range(3)]
        assert [finished(rt, i).result for i in ids] == [0, 1, 2, 0, 10, 20]
        status = client.get(f"/_bgtasks/tasks/{ids[0]}")
        assert status.status_code == 200 and status.json()["result"] == 0
        assert client.get("/plain").json() == {"hello": "world"}
    finally:
        assert stop_runtime(rt, WAIT)


def test_asgi_transport_from_several_asyncio_runs() -> None:
    """pytest-asyncio's default: one event loop per test, the app shared."""
    app, rt = fastapi_app()

    async def one_test(n: int) -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/plain")).json() == {"hello": "world"}
            r = await client.post("/job", params={"n": n})
            assert r.status_code == 202, r.text
            task_id: str = r.json()["id"]
            return task_id

    try:
        ids = [asyncio.run(one_test(n)) for n in range(3)]
        assert [finished(rt, i).result for i in ids] == [0, 1, 2]
    finally:
        assert stop_runtime(rt, WAIT)


def test_a_lifespan_after_requests_without_one_gets_a_fresh_runtime() -> None:
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware)

    @app.post("/job")
    @bgtasks.background
    async def job() -> str:
        return "ok"

    plain = TestClient(app)
    first = plain.post("/job").json()
    with TestClient(app) as client:  # now with a lifespan
        second = client.post("/job").json()
        assert client.get(second["status_url"]).status_code == 200
    third = plain.post("/job").json()  # and without one again
    wait_for(
        lambda: plain.get(third["status_url"]).json()["status"] == "succeeded", "the third task"
    )
    assert first["id"] != second["id"] != third["id"]


def test_a_lifespan_on_a_loop_that_stopped_leaves_requests_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lifespan ran on loop A, which is not running; requests come on loop B."""
    from asgi_lifespan import LifespanManager

    app, rt = fastapi_app()
    loop_a = asyncio.new_event_loop()
    started: asyncio.Future[None] = loop_a.create_future()
    release: asyncio.Future[None] = loop_a.create_future()

    async def hold() -> None:
        async with LifespanManager(app):
            started.set_result(None)
            await release

    task = loop_a.create_task(hold())
    loop_a.run_until_complete(started)
    try:
        assert rt.started

        async def requests_on_loop_b() -> None:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for _ in range(2):
                    assert (await client.get("/plain")).json() == {"hello": "world"}

        with caplog.at_level(logging.WARNING, logger="bgtasks"):
            asyncio.run(requests_on_loop_b())
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 1 and "another event loop" in warned[0], warned
    finally:
        release.set_result(None)
        loop_a.run_until_complete(task)
        loop_a.close()
    assert not rt.started


# ------------------------------------------------------------------------------- 2. trio
def test_trio_plain_routes_pass_through() -> None:
    trio = pytest.importorskip("trio")
    app, rt = fastapi_app()

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/plain")).json() == {"hello": "world"}
            assert (await client.get("/plain-async")).json() == {"hello": "async"}

    trio.run(main)
    assert not rt.started


def test_trio_background_routes_run_on_their_own_loop_thread() -> None:
    trio = pytest.importorskip("trio")
    app, rt = fastapi_app()
    ids: list[str] = []

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for n in range(2):
                r = await client.post("/job", params={"n": n})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            r = await client.post("/sync-job", params={"n": 3})
            ids.append(r.json()["id"])
            status = await client.get(f"/_bgtasks/tasks/{ids[0]}")
            assert status.status_code == 200

    try:
        trio.run(main)
        assert [finished(rt, i).result for i in ids] == [0, 1, 30]
    finally:
        assert stop_runtime(rt, WAIT)


@bgtasks.background(durable=True)
async def durable_plus_one(n: int) -> int:
    return n + 1


def test_trio_durable_and_keyed_background_routes(tmp_path: Path) -> None:
    trio = pytest.importorskip("trio")
    rt = bgtasks.Runtime(store=f"sqlite:///{tmp_path}/tasks.db", shutdown_grace=2.0)
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    app.post("/durable")(durable_plus_one)
    got: dict[str, Any] = {}

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = await client.post("/durable", params={"n": 1})
            assert first.status_code == 202, first.text
            keyed = [
                (await client.post("/durable", params={"n": 2}, headers={"Idempotency-Key": "k"}))
                for _ in range(2)
            ]
            got.update(first=first.json()["id"], keyed=[r.json()["id"] for r in keyed])

    try:
        trio.run(main)
        assert got["keyed"][0] == got["keyed"][1]
        assert finished(rt, got["first"]).result == 2
    finally:
        assert stop_runtime(rt, WAIT)


def test_trio_lifespan_runs_the_runtime_on_its_own_thread() -> None:
    trio = pytest.importorskip("trio")
    from asgi_lifespan import LifespanManager

    app, rt = fastapi_app()
    seen: dict[str, Any] = {}

    async def main() -> None:
        async with LifespanManager(app) as manager:
            seen["started"] = rt.started
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                r = await client.post("/job", params={"n": 7})
                seen["id"] = r.json()["id"]
                handle = rt.handle(seen["id"])
                assert handle is not None
                record = await trio.to_thread.run_sync(handle.wait_sync, WAIT)
                seen["result"] = record.result

    trio.run(main)
    assert seen == {"started": True, "id": seen["id"], "result": 7}
    assert not rt.started  # the lifespan's end drained it


# -------------------------------------------------------------------- 3. Flask streaming
def streaming_app(with_bgtasks: bool) -> Flask:
    app = Flask("streaming")
    if with_bgtasks:
        BgTasks(app, runtime=bgtasks.Runtime(shutdown_grace=2.0))

    @app.get("/plain")
    def plain() -> Any:
        def body() -> Iterator[str]:
            yield "a"
            yield "b"

        return app.response_class(body())

    @app.get("/with-context")
    def with_context() -> Any:
        g.who = "sync"

        def body() -> Iterator[str]:
            yield request.args.get("x", "?")
            yield g.who

        return app.response_class(stream_with_context(body()))

    @app.get("/async-with-context")
    async def async_with_context() -> Any:
        g.who = "async"

        def body() -> Iterator[str]:
            yield request.args.get("x", "?")
            yield g.who

        return app.response_class(stream_with_context(body()))

    return app


def flask_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(part) for part in version("flask").split(".")[:3] if part.isdigit())


# Flask fixed stream_with_context in async views in 3.1.2 (before: it fails, bgtasks or not).
ASYNC_STREAMS = pytest.mark.skipif(
    flask_version() < (3, 1, 2), reason="stream_with_context fails in async views before 3.1.2"
)


@pytest.mark.parametrize("with_bgtasks", [False, True])
@pytest.mark.parametrize(
    "path", ["/plain", "/with-context", pytest.param("/async-with-context", marks=ASYNC_STREAMS)]
)
def test_flask_streamed_responses_are_untouched(with_bgtasks: bool, path: str) -> None:
    app = streaming_app(with_bgtasks)
    expected = {"/plain": "ab", "/with-context": "1sync", "/async-with-context": "1async"}
    client = app.test_client()
    with client:
        assert client.get(path, query_string={"x": "1"}).get_data(as_text=True) == expected[path]
        assert client.get(path, query_string={"x": "1"}).get_data(as_text=True) == expected[path]
    assert not has_request_context()  # no corrupt context left behind
    assert client.get(path, query_string={"x": "1"}).get_data(as_text=True) == expected[path]
    if with_bgtasks:
        app.extensions["bgtasks"].middleware.stop(WAIT)


def test_flask_work_scheduled_from_a_streamed_body_sees_the_request() -> None:
    app = Flask("streaming")
    ext = BgTasks(app, runtime=bgtasks.Runtime(shutdown_grace=2.0))
    ids: list[str] = []

    @app.get("/stream")
    def stream() -> Any:
        def body() -> Iterator[str]:
            yield "x"
            ids.append(bgtasks.wait_until(lambda: request.args["q"]).id)
            yield "y"

        return app.response_class(stream_with_context(body()))

    client = app.test_client()
    with client:
        assert client.get("/stream?q=42").get_data(as_text=True) == "xy"
    try:
        assert finished(ext.runtime_for(app), ids[0]).result == "42"
    finally:
        ext.stop(app, WAIT)


@pytest.mark.server
def test_flask_streamed_responses_under_a_real_server() -> None:
    from serverutil import Server, free_port, python_argv

    port = free_port()
    argv = python_argv(
        "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "2"
    )
    with (
        Server([*argv, "wsgi_apps:app"], port=port) as srv,
        httpx.Client(base_url=srv.url, timeout=WAIT) as client,
    ):
        paths = [("/stream", "0123456789" * 50), ("/stream-with-context?x=q", "q" * 200)]
        if flask_version() >= (3, 1, 2):
            paths.append(("/async-stream-with-context?x=r", "r" * 200))
        for path, want in paths:
            r = client.get(path)
            assert (r.status_code, r.text) == (200, want), (path, srv.output())
        output = srv.output()
    assert "Traceback" not in output, output


def test_flask_routes_that_do_not_use_bgtasks_start_nothing() -> None:
    app = Flask("plain")
    BgTasks(app)
    rules = {rule.rule for rule in app.url_map.iter_rules()}

    @app.get("/hello")
    def hello() -> str:
        return "hello"

    before = set(loop_threads())
    assert {rule.rule for rule in app.url_map.iter_rules()} == rules | {"/hello"}
    client = app.test_client()
    for _ in range(3):
        assert client.get("/hello").get_data(as_text=True) == "hello"
    assert not app.extensions["bgtasks"].runtime.started
    assert set(loop_threads()) == before


def test_a_flask_app_with_bgtasks_is_freed_by_reference_counting() -> None:
    gc.disable()
    try:
        app = Flask("refcount")
        BgTasks(app)
        weak = weakref.ref(app)
        del app
        assert weak() is None
    finally:
        gc.enable()


# ----------------------------------------------------------------- 4. Flask app factories
def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts /proc/self/fd")
@pytest.mark.timeout(120)
def test_dropped_flask_apps_release_their_runtime_thread_and_descriptors() -> None:
    def create_app() -> Flask:
        app = Flask("factory")
        BgTasks(app)  # its own runtime, from the config

        @app.post("/job")
        @bgtasks.background
        def job() -> str:
            return request.path

        @app.post("/async-job")
        @bgtasks.background
        async def async_job() -> str:
            return request.path

        return app

    def serve_one(i: int) -> None:
        app = create_app()
        client = app.test_client()
        r = client.post("/job" if i % 2 else "/async-job")
        assert r.status_code == 202
        handle = app.extensions["bgtasks"].runtime.handle(r.get_json()["id"])
        assert handle.wait_sync(WAIT).status == "succeeded"

    others = set(loop_threads())  # other tests' runtimes

    def ours() -> set[threading.Thread]:
        return set(loop_threads()) - others

    serve_one(0)  # warm up: imports, the first thread pools
    gc.collect()
    wait_for(lambda: not ours(), "the warm-up app's loop thread to end")
    threads, fds = threading.active_count(), open_fds()
    for i in range(400):
        serve_one(i)
        if i % 50 == 49:
            gc.collect()
    gc.collect()
    wait_for(lambda: not ours(), "every dropped app's loop thread to end", 60)
    wait_for(lambda: threading.active_count() <= threads, "worker threads to end", 30)
    assert open_fds() <= fds + 2, (fds, open_fds())


# --------------------------------------------------------- 5 and 6. deprecations, warnings
def run_python(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )


def test_bgtasks_flask_imports_nothing_flask_deprecates() -> None:
    source = (ROOT / "bgtasks" / "flask.py").read_text()
    for name in ("RequestContext", "request_ctx", "flask.ctx", "flask.globals", "_cv_"):
        assert name not in source, name


def test_imports_and_requests_emit_no_warning_under_w_error() -> None:
    code = """
import warnings
import bgtasks, bgtasks.asgi, bgtasks.wsgi, bgtasks.flask
from flask import Flask
from bgtasks.flask import BgTasks

app = Flask("w")
ext = BgTasks(app)

@app.get("/plain")
def plain():
    return "plain"

@app.post("/job")
@bgtasks.background
def job():
    return 1

client = app.test_client()
assert client.get("/plain").data == b"plain"
r = client.post("/job")
assert r.status_code == 202
assert ext.runtime_for(app).handle(r.get_json()["id"]).wait_sync(10).result == 1
assert ext.stop(app, 10)
print("ok")
"""
    done = run_python(code, "-W", "error")
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "ok", "")
