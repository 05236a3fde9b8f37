"""The plain WSGI middleware and the per-process loop thread, in process.

Requests go through Werkzeug's test client; the runtime runs on its real
event-loop thread. Process exit is tested in a subprocess; servers are in
test_wsgi_server.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client, EnvironBuilder

import bgtasks
from bgtasks import _loopthread
from bgtasks.wsgi import BackgroundMiddleware, accepted

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
Make = Callable[..., BackgroundMiddleware]


@pytest.fixture
def middlewares() -> Iterator[list[BackgroundMiddleware]]:
    made: list[BackgroundMiddleware] = []
    yield made
    for mw in made:
        assert mw.stop(10), "the runtime did not stop"


@pytest.fixture
def make(middlewares: list[BackgroundMiddleware]) -> Callable[..., BackgroundMiddleware]:
    def make(
        app: Callable[[Environ, StartResponse], Iterable[bytes]], **kw: Any
    ) -> BackgroundMiddleware:
        mw = BackgroundMiddleware(app, **kw)  # type: ignore[arg-type]
        middlewares.append(mw)
        return mw

    return make


def text(status: str, body: str, start_response: StartResponse) -> list[bytes]:
    start_response(status, [("content-type", "text/plain")])
    return [body.encode()]


def scheduling_app(
    work: Callable[..., Any], *args: Any
) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """A plain WSGI app that schedules ``work`` and answers the standard 202."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        handle = bgtasks.wait_until(work, *args)
        return accepted(handle, environ, start_response)

    return app


def finished(mw: BackgroundMiddleware, task_id: str) -> bgtasks.TaskRecord:
    handle = mw.runtime.handle(task_id)
    assert handle is not None
    return handle.wait_sync(5)


def test_runtime_starts_with_the_first_task_not_the_first_request(make: Make) -> None:
    schedule = scheduling_app(lambda: "done")

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/plain":
            return text("200 OK", "plain", start_response)
        return schedule(environ, start_response)

    mw = make(app)
    before = {t for t in threading.enumerate() if t.name == "bgtasks-loop"}
    assert not mw.runtime.started
    assert Client(mw).get("/plain").status_code == 200  # no bgtasks here: nothing starts
    assert not mw.runtime.started
    assert {t for t in threading.enumerate() if t.name == "bgtasks-loop"} == before
    r = Client(mw).post("/work")
    assert r.status_code == 202
    assert mw.runtime.started
    assert finished(mw, r.get_json()["id"]).result == "done"
    threads = [t for t in threading.enumerate() if t.name == "bgtasks-loop"]
    assert any(t.daemon for t in threads)


def test_wait_until_and_the_standard_202(make: Make) -> None:
    mw = make(scheduling_app(lambda a, b: a + b, 2, 3))
    r = Client(mw).post("/work", environ_overrides={"SCRIPT_NAME": "/app"})
    assert r.status_code == 202
    body = r.get_json()
    assert set(body) == {"id", "status", "status_url"}
    assert body["status_url"] == f"/app/_bgtasks/tasks/{body['id']}"
    assert r.headers["Location"] == body["status_url"]
    assert finished(mw, body["id"]).result == 5

    r = Client(mw).get(f"/_bgtasks/tasks/{body['id']}")
    assert r.status_code == 200
    assert r.get_json()["status"] == "succeeded"
    assert r.get_json()["result"] == 5


def test_wait_until_a_coroutine(make: Make) -> None:
    async def compute() -> str:
        await asyncio.sleep(0)
        return "from the loop"

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return accepted(bgtasks.wait_until(compute()), environ, start_response)

    mw = make(app)
    task_id = Client(mw).post("/").get_json()["id"]
    record = finished(mw, task_id)
    assert (record.result, record.name) == (
        "from the loop",
        "test_wait_until_a_coroutine.<locals>.compute",
    )


def test_background_function_returns_a_handle_in_plain_wsgi(
    make: Make,
) -> None:
    @bgtasks.background
    def double(x: int) -> int:
        return 2 * x

    seen: list[object] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        handle = double(21)
        seen.append(handle)
        assert isinstance(handle, bgtasks.TaskHandle)
        return text("200 OK", handle.id, start_response)

    mw = make(app)
    task_id = Client(mw).get("/").get_data(as_text=True)
    assert finished(mw, task_id).result == 42


def test_wait_until_in_a_streamed_body_and_its_close(make: Make) -> None:
    ids: list[str] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"a"
            ids.append(bgtasks.wait_until(lambda: "in the body").id)  # after the app returned
            yield b"b"

        def close(self) -> None:
            ids.append(bgtasks.wait_until(lambda: "at close").id)

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return Body()

    mw = make(app)
    r = Client(mw).get("/")
    assert r.get_data() == b"ab"
    r.close()  # the server closes the body
    assert [finished(mw, task_id).result for task_id in ids] == ["in the body", "at close"]
    with pytest.raises(bgtasks.RuntimeNotActive):  # the request's context did not leak out
        bgtasks.wait_until(lambda: None)


def test_lists_and_file_wrappers_are_returned_as_they_are(make: Make) -> None:
    class FileWrapper:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __iter__(self) -> Iterator[bytes]:
            return iter([self.f.read()])

    body: list[Any] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return body[0](environ)

    mw = make(app)
    environ = EnvironBuilder("/").get_environ()
    environ["wsgi.file_wrapper"] = FileWrapper
    chunks = [b"x"]
    body.append(lambda env: chunks)
    assert mw(dict(environ), lambda *a: None) is chunks
    body[0] = lambda env: env["wsgi.file_wrapper"](io.BytesIO(b"file"))
    wrapped = mw(dict(environ), lambda *a: None)
    assert isinstance(wrapped, FileWrapper)  # the server may sendfile() it


def test_no_signal_handler_is_installed(make: Make) -> None:
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGABRT]
    before = {sig: signal.getsignal(sig) for sig in signals}
    mw = make(scheduling_app(lambda: "ran"))
    task_id = Client(mw).post("/").get_json()["id"]  # starts the runtime and its loop thread
    assert finished(mw, task_id).result == "ran"
    assert {sig: signal.getsignal(sig) for sig in signals} == before


def test_status_routes(make: Make) -> None:
    release = threading.Event()
    mw = make(scheduling_app(release.wait, 5))
    client = Client(mw)
    task_id = client.post("/").get_json()["id"]
    url = f"/_bgtasks/tasks/{task_id}"

    assert client.get("/_bgtasks/tasks/" + "A" * 24).status_code == 404  # unknown
    assert client.get("/_bgtasks/tasks/not..valid").status_code == 404  # malformed
    r = client.post(url)
    assert (r.status_code, r.headers["Allow"]) == (405, "GET, HEAD, DELETE")
    r = client.head(url)
    assert (r.status_code, r.get_data()) == (200, b"")

    done_id = client.post("/").get_json()["id"]
    other = mw.runtime.handle(done_id)
    assert other is not None
    release.set()
    other.wait_sync(5)
    r = client.delete(f"/_bgtasks/tasks/{done_id}")
    assert r.status_code == 409
    assert r.get_json()["status"] == "succeeded"


def test_delete_cancels_a_running_task(make: Make) -> None:
    running = threading.Event()

    async def forever() -> None:
        running.set()
        await asyncio.Event().wait()

    mw = make(scheduling_app(forever))
    client = Client(mw)
    task_id = client.post("/").get_json()["id"]
    assert running.wait(5)
    r = client.delete(f"/_bgtasks/tasks/{task_id}")
    assert r.status_code == 202
    assert finished(mw, task_id).status == "cancelled"


def test_authorize_gets_the_environ_and_can_refuse(
    make: Make,
) -> None:
    calls: list[tuple[str, str]] = []

    def authorize(environ: Environ, record: bgtasks.TaskRecord, action: str) -> bool:
        calls.append((environ["REQUEST_METHOD"], action))
        return environ.get("HTTP_X_USER") == "owner"

    mw = make(scheduling_app(lambda: None), authorize=authorize)
    client = Client(mw)
    task_id = client.post("/").get_json()["id"]
    url = f"/_bgtasks/tasks/{task_id}"
    assert client.get(url).status_code == 404
    assert client.get(url, headers={"X-User": "owner"}).status_code == 200
    assert client.delete(url).status_code == 404
    assert calls == [("GET", "read"), ("GET", "read"), ("DELETE", "cancel")]


def test_an_async_authorize_is_refused_with_the_fix(
    make: Make,
) -> None:
    async def authorize(environ: Environ, record: bgtasks.TaskRecord, action: str) -> bool:
        return True

    mw = make(scheduling_app(lambda: None), authorize=authorize)
    client = Client(mw)
    task_id = client.post("/").get_json()["id"]
    with pytest.raises(TypeError, match=r"Define it with `def`, not `async def`"):
        client.get(f"/_bgtasks/tasks/{task_id}")


def test_registry_full_is_503_with_retry_after(make: Make) -> None:
    release = threading.Event()
    mw = make(scheduling_app(release.wait, 5), runtime=bgtasks.Runtime(max_pending=1))
    client = Client(mw)
    assert client.post("/").status_code == 202
    r = client.post("/")
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "1"
    assert "max_pending=1" in r.get_json()["detail"]
    release.set()


def test_status_prefix_none_serves_no_routes(make: Make) -> None:
    mw = make(lambda environ, sr: text("200 OK", environ["PATH_INFO"], sr), status_prefix=None)
    r = Client(mw).get("/_bgtasks/tasks/abc")
    assert r.get_data(as_text=True) == "/_bgtasks/tasks/abc"


def test_custom_status_prefix(make: Make) -> None:
    mw = make(scheduling_app(lambda: 1), status_prefix="/jobs")
    client = Client(mw)
    location = client.post("/").headers["Location"]
    assert location.startswith("/jobs/")
    assert client.get(location).status_code == 200


def test_stop_drains_and_fires_beforeunload(make: Make) -> None:
    rt = bgtasks.Runtime(shutdown_grace=10)
    reasons: list[str] = []
    rt.on("beforeunload", lambda event: reasons.append(event.reason))
    mw = make(scheduling_app(lambda: threading.Event().wait(0.3) or "slept"), runtime=rt)
    client = Client(mw)
    task_id = client.post("/").get_json()["id"]
    assert mw.stop(10)
    handle = rt.handle(task_id)
    assert handle is not None and handle.status == "succeeded"
    assert reasons == ["shutdown"]
    # A request after the stop is refused as "retry elsewhere".
    r = client.post("/")
    assert r.status_code == 503
    assert "shutting down" in r.get_json()["detail"]


def test_stop_cancels_what_outlives_the_grace(make: Make) -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    rt = bgtasks.Runtime(shutdown_grace=0.2)
    mw = make(scheduling_app(forever), runtime=rt)
    task_id = Client(mw).post("/").get_json()["id"]
    assert mw.stop(5)
    handle = rt.handle(task_id)
    assert handle is not None and handle.status == "cancelled"


def test_middlewares_sharing_a_runtime_share_its_loop_thread(
    make: Make,
) -> None:
    rt = bgtasks.Runtime()
    first = make(scheduling_app(lambda: "a"), runtime=rt)
    second = make(scheduling_app(lambda: "b"), runtime=rt)
    for mw in (first, second):
        task_id = Client(mw).post("/").get_json()["id"]
        assert finished(mw, task_id).status == "succeeded"
    assert _loopthread.host_for(rt) is first._host is second._host


def test_a_fork_after_start_is_refused_with_the_fix(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    mw = make(scheduling_app(lambda: None))
    assert Client(mw).post("/work").status_code == 202  # started in this process
    real_pid = _loopthread.os.getpid()
    monkeypatch.setattr(_loopthread.os, "getpid", lambda: real_pid + 100_000)
    with pytest.raises(RuntimeError, match=r"started in process \d+ before process \d+ was forked"):
        Client(mw).get("/")
    monkeypatch.undo()
    assert Client(mw).get("/").status_code == 202


def test_a_runtime_that_cannot_start_fails_the_request_clearly(
    make: Make,
) -> None:
    rt = bgtasks.Runtime()

    async def use_once() -> None:
        async with rt:
            pass

    asyncio.run(use_once())
    mw = make(lambda environ, sr: text("200 OK", "hi", sr), runtime=rt)
    with pytest.raises(RuntimeError, match="a Runtime runs once"):
        Client(mw).get("/")


def test_fitted_grace() -> None:
    assert _loopthread.fitted_grace(25.0, None) == 25.0
    assert _loopthread.fitted_grace(25.0, 30.0) == 25.0
    assert _loopthread.fitted_grace(40.0, 30.0) == 30.0 - _loopthread.EXIT_MARGIN
    assert _loopthread.fitted_grace(5.0, 2.0) == 0.0
    assert _loopthread.server_graceful_timeout() is None  # not in a gunicorn worker
    assert _loopthread.gunicorn_worker() is None


class FakeWorker:
    """What bgtasks reads of a gunicorn worker: ``cfg``, ``tmp``, ``notify()``."""

    def __init__(self, tmp: Any, *, timeout: float, graceful_timeout: float = 30.0) -> None:
        self.cfg = types.SimpleNamespace(timeout=timeout, graceful_timeout=graceful_timeout)
        self.tmp = tmp

    def notify(self) -> None:
        self.tmp.notify()


class FakeTmp:
    """gunicorn's WorkerTmp: a heartbeat file whose mtime is a monotonic time."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w+b")  # noqa: SIM115 - closed by the test, as gunicorn does

    def fileno(self) -> int:
        return self._file.fileno()

    def notify(self) -> None:
        now = time.monotonic()
        os.utime(self._file.fileno(), (now, now))

    def close(self) -> None:
        self._file.close()


def test_the_drain_keeps_a_gunicorn_workers_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat"
    tmp = FakeTmp(path)
    server = _loopthread.GunicornWorker(FakeWorker(tmp, timeout=2, graceful_timeout=30))
    assert server.drain_limit == 30.0  # it can beat: only graceful_timeout bounds the drain
    assert server.heartbeat_interval == 0.5
    os.utime(path, (0, 0))
    server.heartbeat()
    assert abs(path.stat().st_mtime - time.monotonic()) < 1
    # Gunicorn closes the worker's heartbeat file before the exit hooks run.
    tmp.close()
    os.utime(path, (0, 0))
    server.heartbeat()
    assert abs(path.stat().st_mtime - time.monotonic()) < 1
    server.close()
    assert server.heartbeat_interval is None


def test_a_gunicorn_worker_that_cannot_beat_fits_the_grace_to_its_timeout() -> None:
    server = _loopthread.GunicornWorker(FakeWorker(None, timeout=10, graceful_timeout=30))
    assert server.heartbeat_interval is None
    assert server.drain_limit == 10.0
    server.heartbeat()  # nothing to beat with: no error either
    no_timeout = _loopthread.GunicornWorker(FakeWorker(None, timeout=0, graceful_timeout=30))
    assert (no_timeout.timeout, no_timeout.drain_limit) == (None, 30.0)


EXIT_SCRIPT = """
import json, sys, threading, time
from werkzeug.test import Client, EnvironBuilder
import bgtasks
from bgtasks.wsgi import BackgroundMiddleware

rt = bgtasks.Runtime(shutdown_grace=10)
events = []
rt.on("beforeunload", lambda e: events.append("beforeunload"))

def slow():
    time.sleep(0.5)
    events.append("done")

def report():
    print(json.dumps(events), flush=True)

def app(environ, start_response):
    bgtasks.wait_until(slow)
    start_response("200 OK", [])
    return [b""]

mw = BackgroundMiddleware(app, runtime=rt)
Client(mw).get("/")
import atexit
atexit.register(report)  # atexit runs after the drain (threading's hooks come first)
{how}
"""


@pytest.mark.parametrize(
    "how", ["sys.exit(0)", "raise KeyboardInterrupt", "pass  # the end of the script"]
)
def test_process_exit_drains(how: str) -> None:
    script = textwrap.dedent(EXIT_SCRIPT).format(how=how)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "[]"
    assert json.loads(last) == ["beforeunload", "done"], proc.stderr
