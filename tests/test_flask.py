"""The Flask extension, in process with Flask's test client.

The runtime runs on its real event-loop thread; every app is stopped at the
end of its test.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import io
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, g, jsonify, request, stream_with_context, url_for
from flask import globals as flask_globals
from flask.testing import FlaskClient

import bgtasks
from bgtasks.flask import BgTasks, BgTasksState


@pytest.fixture
def apps() -> Iterator[list[Flask]]:
    made: list[Flask] = []
    yield made
    for app in made:
        state = app.extensions["bgtasks"]
        assert state.middleware.stop(10), "the runtime did not stop"


@pytest.fixture
def make_app(apps: list[Flask]) -> Callable[..., Flask]:
    def make(**options: Any) -> Flask:
        app = Flask("t")
        app.config["TESTING"] = True
        config = options.pop("config", {})
        app.config.update(config)
        BgTasks(app, **options)
        apps.append(app)
        return app

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


def runtime(app: Flask) -> bgtasks.Runtime:
    state = app.extensions["bgtasks"]
    assert isinstance(state, BgTasksState)
    return state.runtime


def finished(app: Flask, task_id: str) -> bgtasks.TaskRecord:
    handle = runtime(app).handle(task_id)
    assert handle is not None, f"unknown task {task_id}"
    return handle.wait_sync(5)


# --------------------------------------------------------------------------- installing
def test_init_app_keeps_state_in_app_extensions(apps: list[Flask]) -> None:
    ext = BgTasks()
    app = Flask("t")
    ext.init_app(app)
    apps.append(app)
    state = app.extensions["bgtasks"]
    assert isinstance(state, BgTasksState)
    assert isinstance(state.runtime, bgtasks.Runtime)
    assert ext.runtime_for(app) is state.runtime
    assert app not in vars(ext).values()
    with app.app_context():
        assert ext.runtime_for() is state.runtime
    with pytest.raises(RuntimeError, match=r"already installed .* call init_app once"):
        ext.init_app(app)


def test_one_extension_many_apps_each_with_its_own_runtime(apps: list[Flask]) -> None:
    ext = BgTasks()
    first, second = Flask("a"), Flask("b")
    for a in (first, second):
        ext.init_app(a)
        apps.append(a)
    assert ext.runtime_for(first) is not ext.runtime_for(second)


def test_runtime_from_config(make_app: Callable[..., Flask]) -> None:
    app = make_app(
        config={
            "BGTASKS_SHUTDOWN_GRACE": 7.5,
            "BGTASKS_MAX_PENDING": 3,
            "BGTASKS_MAX_CONCURRENCY": 2,
            "BGTASKS_MEMORY_LIMIT": "512MiB",
            "BGTASKS_LIMITS": bgtasks.Limits(wall_clock=30, cpu_time=10),
            "BGTASKS_RETENTION": 60,
            "BGTASKS_MAX_FINISHED": 50,
            "BGTASKS_MAX_THREADS": 4,
            "BGTASKS_STATUS_PREFIX": "/jobs",
        }
    )
    rt = runtime(app)
    assert (rt.shutdown_grace, rt.max_pending, rt.max_concurrency) == (7.5, 3, 2)
    assert rt.memory_limit == 512 * 1024 * 1024
    assert rt.limits == bgtasks.Limits(wall_clock=30, cpu_time=10)
    assert (rt.retention, rt.max_finished, rt.max_threads) == (60.0, 50, 4)

    @app.post("/go")
    @bgtasks.background
    def go() -> None:
        return None

    r = app.test_client().post("/go")
    assert r.headers["Location"].startswith("/jobs/")
    assert app.test_client().get(r.headers["Location"]).status_code == 200


def test_config_limits_stop_a_task(make_app: Callable[..., Flask]) -> None:
    app = make_app(config={"BGTASKS_LIMITS": bgtasks.Limits(wall_clock=0.2)})

    @app.post("/slow")
    @bgtasks.background
    async def slow() -> None:
        await asyncio.sleep(10)

    record = finished(app, app.test_client().post("/slow").get_json()["id"])
    assert record.status == "failed"
    assert record.error is not None and record.error.type == "WallClockLimitExceeded"


def test_config_memory_limit_refuses_work_above_it(make_app: Callable[..., Flask]) -> None:
    # Any Python process is above 90% of 1 MiB: new work is refused with a 503.
    app = make_app(config={"BGTASKS_MEMORY_LIMIT": "1MiB"})

    @app.post("/go")
    def go() -> str:
        bgtasks.wait_until(lambda: None)
        return "scheduled"

    client = app.test_client()
    deadline = time.monotonic() + 5
    while (r := client.post("/go")).status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.02)  # the RSS is sampled every 0.1 s
    assert r.status_code == 503
    assert "memory_limit=1048576" in r.get_json()["detail"]


@pytest.mark.parametrize("how", ["argument", "config"])
def test_status_routes_can_be_turned_off(make_app: Callable[..., Flask], how: str) -> None:
    if how == "argument":
        app = make_app(status_prefix=None, config={"BGTASKS_STATUS_PREFIX": "/jobs"})
    else:
        app = make_app(config={"BGTASKS_STATUS_PREFIX": None})

    @app.post("/go")
    @bgtasks.background
    def go() -> int:
        return 1

    client = app.test_client()
    r = client.post("/go")
    assert r.status_code == 202
    # The 202 still names the default status URL (served elsewhere, if at all).
    assert r.headers["Location"] == f"/_bgtasks/tasks/{r.get_json()['id']}"
    assert finished(app, r.get_json()["id"]).result == 1
    assert "bgtasks.task_status" not in app.view_functions
    assert client.get(r.headers["Location"]).status_code == 404
    assert app.extensions["bgtasks"].serves_status is False


def test_a_passed_runtime_is_used(make_app: Callable[..., Flask]) -> None:
    rt = bgtasks.Runtime(shutdown_grace=1)
    app = make_app(runtime=rt)
    assert runtime(app) is rt


def test_not_installed_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"call BgTasks\(app\) first"):
        BgTasks().runtime_for(Flask("bare"))


# --------------------------------------------------------------------------- @background views
def test_background_view_answers_202_and_runs_in_the_request_context(app: Flask) -> None:
    release = threading.Event()
    seen: dict[str, Any] = {}
    torn_down: list[str] = []

    @app.before_request
    def who() -> None:
        g.user = request.headers.get("X-User")

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        torn_down.append(threading.current_thread().name)

    @app.post("/reports/<int:year>")
    @bgtasks.background
    def report(year: int) -> dict[str, Any]:
        assert release.wait(5)  # the request has ended by now
        seen.update(
            year=year,
            json=request.get_json(),
            header=request.headers["X-User"],
            user=g.user,
            app=current_app.name,
            url=url_for("report", year=year + 1),
            path=request.path,
        )
        return {"rows": 3}

    client = app.test_client()
    r = client.post("/reports/2024", json={"q": "x"}, headers={"X-User": "ada"})
    assert r.status_code == 202
    body = r.get_json()
    assert set(body) == {"id", "status", "status_url"}
    assert body["status_url"] == f"/_bgtasks/tasks/{body['id']}"
    assert r.headers["Location"] == body["status_url"]
    assert len(torn_down) == 1  # the request is over
    release.set()

    record = finished(app, body["id"])
    assert record.status == "succeeded", record.error
    assert record.result == {"rows": 3}
    assert seen == {
        "year": 2024,
        "json": {"q": "x"},
        "header": "ada",
        "user": "ada",
        "app": "t",
        "url": "/reports/2025",
        "path": "/reports/2024",
    }
    # The task had its own request context, torn down in the task's thread.
    assert len(torn_down) == 2
    assert torn_down[1].startswith("bgtasks-worker")


def test_form_and_files_parsed_before_the_view_reach_the_task(app: Flask) -> None:
    seen: dict[str, Any] = {}

    @app.before_request
    def csrf_like() -> None:
        assert request.form.get("token") == "t0k"  # consumes the body stream

    @app.post("/upload")
    @bgtasks.background
    def upload() -> None:
        f = request.files["doc"]
        seen.update(token=request.form["token"], name=f.filename, data=f.read())

    r = app.test_client().post(
        "/upload",
        data={"token": "t0k", "doc": (io.BytesIO(b"file body"), "a.txt")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 202
    assert finished(app, r.get_json()["id"]).status == "succeeded"
    assert seen == {"token": "t0k", "name": "a.txt", "data": b"file body"}


def test_form_parsed_in_the_task(app: Flask) -> None:
    @app.post("/form")
    @bgtasks.background
    def form() -> str:
        return request.form["a"] + request.files["f"].read().decode()

    r = app.test_client().post(
        "/form",
        data={"a": "x", "f": (io.BytesIO(b"yz"), "f.txt")},
        content_type="multipart/form-data",
    )
    assert finished(app, r.get_json()["id"]).result == "xyz"


def test_async_background_view(app: Flask) -> None:
    @app.post("/async")
    @bgtasks.background
    async def work() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"json": request.get_json(), "on_loop": threading.current_thread().name}

    r = app.test_client().post("/async", json=[1, 2])
    assert r.status_code == 202
    record = finished(app, r.get_json()["id"])
    assert record.result == {"json": [1, 2], "on_loop": "bgtasks-loop"}


def test_view_return_values_become_json_results(app: Flask) -> None:
    @app.post("/jsonify")
    @bgtasks.background
    def with_jsonify() -> Any:
        return jsonify(ok=True)

    @app.post("/tuple")
    @bgtasks.background
    def with_tuple() -> Any:
        return {"made": 1}, 201

    @app.post("/text")
    @bgtasks.background
    def with_text() -> str:
        return "plain"

    client = app.test_client()
    results = [
        finished(app, client.post(path).get_json()["id"]).result
        for path in ("/jsonify", "/tuple", "/text")
    ]
    assert results == [{"ok": True}, {"made": 1}, "plain"]


def test_decorators_above_background_still_answer_202(app: Flask) -> None:
    def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def check(*args: Any, **kwargs: Any) -> Any:
            if request.headers.get("X-User") is None:
                return "who are you?", 401
            return view(*args, **kwargs)

        return check

    @app.post("/guarded")
    @login_required
    @bgtasks.background
    def guarded() -> str:
        return "ran"

    client = app.test_client()
    assert client.post("/guarded").status_code == 401
    r = client.post("/guarded", headers={"X-User": "ada"})
    assert r.status_code == 202
    assert finished(app, r.get_json()["id"]).result == "ran"


def test_background_function_called_from_a_view_returns_a_handle(app: Flask) -> None:
    @bgtasks.background
    def send_email(to: str) -> str:
        return f"{to} via {request.path}"

    @app.post("/signup")
    def signup() -> dict[str, str]:
        handle = send_email("ada@example.com")
        assert isinstance(handle, bgtasks.TaskHandle)
        return {"task": handle.id}

    r = app.test_client().post("/signup")
    assert r.status_code == 200
    record = finished(app, r.get_json()["task"])
    assert record.result == "ada@example.com via /signup"


def test_wait_until_from_a_sync_view(app: Flask) -> None:
    def audit(action: str) -> str:
        return f"{action} by {g.user} on {request.path}"

    async def notify() -> str:
        await asyncio.sleep(0)
        return f"notified {current_app.name} {request.args['n']}"

    @app.post("/act")
    def act() -> dict[str, str]:
        g.user = "ada"
        first = bgtasks.wait_until(audit, "delete")
        second = bgtasks.wait_until(notify())
        return {"first": first.id, "second": second.id}

    ids = app.test_client().post("/act?n=7").get_json()
    first, second = finished(app, ids["first"]), finished(app, ids["second"])
    assert first.result == "delete by ada on /act"
    assert first.name.endswith("audit")
    assert second.result == "notified t 7"
    assert second.name.endswith("notify")


def test_wait_until_from_a_plain_async_view(app: Flask) -> None:
    def audit(action: str) -> str:
        return f"{action} by {g.user} on {request.path} in {threading.current_thread().name}"

    async def notify() -> str:
        await asyncio.sleep(0)
        return f"notified {current_app.name} {request.args['n']}"

    @app.post("/act")
    async def act() -> dict[str, str]:  # not @background: Flask runs it with asgiref
        g.user = "ada"
        first = bgtasks.wait_until(audit, "delete")
        second = bgtasks.wait_until(notify())
        await asyncio.sleep(0)
        return {"first": first.id, "second": second.id}

    r = app.test_client().post("/act?n=7")
    assert r.status_code == 200
    ids = r.get_json()
    first, second = finished(app, ids["first"]), finished(app, ids["second"])
    assert first.status == second.status == "succeeded", (first.error, second.error)
    assert first.result.startswith("delete by ada on /act in bgtasks-worker")
    assert second.result == "notified t 7"


def test_wait_until_in_a_streamed_response(app: Flask) -> None:
    ids: list[str] = []

    @app.get("/stream")
    def stream() -> Any:
        def plain() -> Iterator[str]:
            yield "a"
            ids.append(bgtasks.wait_until(lambda: "from the body").id)  # after the view returned
            yield "b"

        @stream_with_context
        def with_request() -> Iterator[str]:
            yield "c"
            ids.append(bgtasks.wait_until(lambda: request.args["q"]).id)

        return app.response_class(itertools.chain(plain(), with_request()))

    r = app.test_client().get("/stream?q=x")
    assert r.get_data(as_text=True) == "abc"
    assert [finished(app, task_id).result for task_id in ids] == ["from the body", "x"]


def test_no_signal_handler_is_installed(make_app: Callable[..., Flask]) -> None:
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGABRT]
    before = {sig: signal.getsignal(sig) for sig in signals}
    app = make_app()

    @app.post("/go")
    @bgtasks.background
    def go() -> None:
        return None

    r = app.test_client().post("/go")  # starts the runtime and its loop thread
    assert finished(app, r.get_json()["id"]).status == "succeeded"
    assert {sig: signal.getsignal(sig) for sig in signals} == before


def test_the_task_sees_the_requests_routing(app: Flask) -> None:
    seen: dict[str, Any] = {}

    @app.url_value_preprocessor
    def pop_lang(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values is not None and "lang" in values:
            g.lang = values.pop("lang")

    @app.get("/<lang>/items/<int:item>")
    @bgtasks.background
    def item(item: int) -> None:
        seen.update(
            item=item,
            lang=g.lang,
            endpoint=request.endpoint,
            rule=request.url_rule.rule if request.url_rule else None,
            url=url_for("item", lang="en", item=item + 1, _external=True),
        )

    @app.errorhandler(404)
    def missing(exc: Exception) -> tuple[str, int]:
        # Work scheduled where routing failed still gets a request context.
        seen["missing"] = bgtasks.wait_until(lambda: (request.path, request.endpoint)).id
        return "nope", 404

    client = app.test_client()
    r = client.get("/fr/items/7", base_url="http://shop.example:8080")
    assert r.status_code == 202
    assert finished(app, r.get_json()["id"]).status == "succeeded"
    assert seen == {
        "item": 7,
        "lang": "fr",
        "endpoint": "item",
        "rule": "/<lang>/items/<int:item>",
        "url": "http://shop.example:8080/en/items/8",
    }
    assert client.get("/nowhere").status_code == 404
    assert finished(app, seen["missing"]).result == ["/nowhere", None]


def test_an_app_with_its_own_request_context_class_keeps_it(app: Flask) -> None:
    # Flask 3.1: a RequestContext; 3.2: an AppContext (RequestContext is deprecated).
    base: Any = type(app.test_request_context())
    merged = base.__name__ == "AppContext"
    current = "app_ctx" if merged else "request_ctx"

    class MyContext(base):  # type: ignore[misc]
        pass

    def request_context(environ: Any) -> Any:
        return MyContext.from_environ(app, environ) if merged else MyContext(app, environ)

    app.request_context = request_context  # type: ignore[method-assign]

    @app.post("/x/<int:n>")
    @bgtasks.background
    def x(n: int) -> list[Any]:
        ctx = getattr(flask_globals, current)._get_current_object()
        return [type(ctx).__name__, n, request.view_args, url_for("x", n=n + 1)]

    r = app.test_client().post("/x/3")
    assert finished(app, r.get_json()["id"]).result == ["MyContext", 3, {"n": 3}, "/x/4"]


def test_idempotency_key_header_returns_the_same_task(app: Flask) -> None:
    @app.post("/charge")
    @bgtasks.background
    def charge() -> None:
        return None

    client = app.test_client()
    first = client.post("/charge", headers={"Idempotency-Key": "k1"}).get_json()["id"]
    again = client.post("/charge", headers={"Idempotency-Key": "k1"}).get_json()["id"]
    other = client.post("/charge").get_json()["id"]
    assert first == again != other
    # Long keys are hashed (as by the ASGI adapter), not dropped; whitespace does not count.
    long_key = "k" * 1000
    a = client.post("/charge", headers={"Idempotency-Key": long_key}).get_json()["id"]
    b = client.post("/charge", headers={"Idempotency-Key": f" {long_key} "}).get_json()["id"]
    c = client.post("/charge", headers={"Idempotency-Key": long_key + "x"}).get_json()["id"]
    assert a == b != c


def test_a_task_that_raises_fails_and_tears_down_with_the_error(app: Flask) -> None:
    errors: list[BaseException | None] = []

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        errors.append(exc)

    @app.post("/boom")
    @bgtasks.background(retries=1)
    def boom() -> None:
        raise ValueError(request.get_data(as_text=True))

    runtime(app).backoff = bgtasks.Backoff(initial=0, max=0, jitter=0)
    r = app.test_client().post("/boom", data="body")
    record = finished(app, r.get_json()["id"])
    assert record.status == "failed"
    assert record.attempts == 2
    assert record.error is not None and record.error.message == "body"  # re-read per attempt
    task_errors = [e for e in errors if e is not None]
    assert [str(e) for e in task_errors] == ["body", "body"]


# --------------------------------------------------------------------------- status routes
def _running_task(app: Flask) -> tuple[FlaskClient, str, threading.Event]:
    release = threading.Event()
    started = threading.Event()

    @app.post("/hold")
    @bgtasks.background
    def hold() -> None:
        started.set()
        release.wait(5)

    client = app.test_client()
    task_id = client.post("/hold").get_json()["id"]
    assert started.wait(5)
    return client, task_id, release


def test_status_routes_are_flask_routes(app: Flask) -> None:
    @app.after_request
    def cors(response: Any) -> Any:
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    client, task_id, release = _running_task(app)
    url = f"/_bgtasks/tasks/{task_id}"
    with app.test_request_context():
        assert url_for("bgtasks.task_status", task_id=task_id) == url
    r = client.get(url)
    assert (r.status_code, r.get_json()["status"]) == (200, "running")
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert client.head(url).status_code == 200
    assert client.get("/_bgtasks/tasks/" + "A" * 24).status_code == 404
    assert client.get("/_bgtasks/tasks/bad..id").status_code == 404
    assert client.post(url).status_code == 405
    release.set()
    finished(app, task_id)
    r = client.delete(url)
    assert (r.status_code, r.get_json()["status"]) == (409, "succeeded")


def test_delete_cancels(app: Flask) -> None:
    client, task_id, release = _running_task(app)
    try:
        r = client.delete(f"/_bgtasks/tasks/{task_id}")
        assert r.status_code == 202
        assert finished(app, task_id).status == "cancelled"
    finally:
        release.set()


def test_authorize_runs_in_the_status_request_context(make_app: Callable[..., Flask]) -> None:
    calls: list[tuple[str, str, str]] = []

    def authorize(req: Any, record: bgtasks.TaskRecord, action: str) -> bool:
        calls.append((req.method, action, current_app.name))
        return bool(req.headers.get("X-User") == "owner")

    app = make_app(authorize=authorize)

    @app.post("/go")
    @bgtasks.background
    def go() -> int:
        return 1

    client = app.test_client()
    r = client.post("/go")
    url = r.headers["Location"]
    finished(app, r.get_json()["id"])
    assert client.get(url).status_code == 404
    assert client.get(url, headers={"X-User": "owner"}).get_json()["result"] == 1
    assert client.delete(url).status_code == 404
    assert calls == [("GET", "read", "t"), ("GET", "read", "t"), ("DELETE", "cancel", "t")]


def test_include_result_false_hides_results(make_app: Callable[..., Flask]) -> None:
    app = make_app(include_result=False)

    @app.post("/go")
    @bgtasks.background
    def go() -> str:
        return "secret"

    client = app.test_client()
    r = client.post("/go")
    finished(app, r.get_json()["id"])
    assert "result" not in client.get(r.headers["Location"]).get_json()


# --------------------------------------------------------------------------- overload, shutdown
def test_registry_full_is_503_with_retry_after(make_app: Callable[..., Flask]) -> None:
    app = make_app(config={"BGTASKS_MAX_PENDING": 1})
    release = threading.Event()

    @app.post("/hold")
    @bgtasks.background
    def hold() -> None:
        release.wait(5)

    @app.post("/plain")
    def plain() -> str:
        bgtasks.wait_until(release.wait, 5)
        return "scheduled"

    client = app.test_client()
    try:
        assert client.post("/hold").status_code == 202
        for path in ("/hold", "/plain"):
            r = client.post(path)
            assert r.status_code == 503
            assert r.headers["Retry-After"] == "1"
            assert "max_pending=1" in r.get_json()["detail"]
    finally:
        release.set()


def test_an_apps_own_registry_full_handler_is_kept(apps: list[Flask]) -> None:
    app = Flask("t")

    @app.errorhandler(bgtasks.RegistryFull)
    def mine(exc: bgtasks.RegistryFull) -> tuple[str, int]:
        return "busy, mine", 429

    BgTasks(app, runtime=bgtasks.Runtime(max_pending=1))
    apps.append(app)
    release = threading.Event()

    @app.post("/hold")
    @bgtasks.background
    def hold() -> None:
        release.wait(5)

    client = app.test_client()
    client.post("/hold")
    r = client.post("/hold")
    release.set()
    assert (r.status_code, r.get_data(as_text=True)) == (429, "busy, mine")


def test_stop_drains_and_fires_beforeunload(app: Flask) -> None:
    rt = runtime(app)
    reasons: list[str] = []
    rt.on("beforeunload", lambda event: reasons.append(event.reason))

    @app.post("/slow")
    @bgtasks.background
    def slow() -> str:
        threading.Event().wait(0.3)
        return current_app.name

    task_id = app.test_client().post("/slow").get_json()["id"]
    assert BgTasks().stop(app, 10)
    handle = rt.handle(task_id)
    assert handle is not None and (handle.status, handle.record.result) == ("succeeded", "t")
    assert reasons == ["shutdown"]
    r = app.test_client().post("/slow")
    assert r.status_code == 503


def test_the_example_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The example's default store is a SQLite file in the working directory.
    monkeypatch.setenv("BGTASKS_STORE", f"sqlite:///{tmp_path}/example.db")
    monkeypatch.delitem(sys.modules, "examples.flask_app.app", raising=False)
    example = importlib.import_module("examples.flask_app.app")
    app, tasks = example.app, example.tasks
    assert runtime(app).store.durable

    client = app.test_client()
    try:
        r = client.post("/reports", json={"rows": 1}, headers={"X-User": "ada"})
        assert r.status_code == 202
        record = finished(app, r.get_json()["id"])
        assert record.result == {
            "rows": 1,
            "requested_by": "ada",
            "download": "/downloads/report-1.csv",
        }
        assert client.get(r.headers["Location"]).get_json()["progress"]["done"] == 1
        r = client.post("/signup", data={"email": "ada@example.com"})
        assert r.status_code == 201
        task_id = r.get_json()["welcome_email"].rsplit("/", 1)[1]
        assert finished(app, task_id).result == "ada@example.com"
    finally:
        assert tasks.stop(app, 10)


@bgtasks.background(durable=True)
def ship_order(order_id: int) -> dict[str, Any]:
    return {"order": order_id, "json": request.get_json()}


def test_durable_view_with_the_sqlite_store(make_app: Callable[..., Flask], tmp_path: Any) -> None:
    app = make_app(config={"BGTASKS_STORE": f"sqlite:///{tmp_path}/tasks.db"})
    app.add_url_rule("/orders/<int:order_id>", view_func=ship_order, methods=["POST"])
    client = app.test_client()
    r = client.post("/orders/7", json={"express": True})
    assert r.status_code == 202
    record = finished(app, r.get_json()["id"])
    assert record.result == {"order": 7, "json": {"express": True}}
    assert client.get(r.headers["Location"]).get_json()["status"] == "succeeded"


def test_the_task_sees_the_requests_session_headers_and_its_own_json(app: Flask) -> None:
    from flask import session

    app.secret_key = "test"

    @app.post("/login")
    def login() -> str:
        session["user"] = "ada"
        return "ok"

    seen: dict[str, Any] = {}

    @app.post("/job")
    def job() -> tuple[str, int]:
        data = request.get_json()

        def task() -> None:
            seen.update(
                user=session.get("user"),
                agent=request.headers.get("X-Agent"),
                args=request.args.to_dict(),
                json=request.get_json(),
                cookies=sorted(request.cookies),
            )

        handle = bgtasks.wait_until(task)
        data["changed"] = True  # the request's parsed JSON is its own
        return handle.id, 202

    client = app.test_client()
    client.post("/login")
    r = client.post("/job?x=1", json={"n": 1}, headers={"X-Agent": "t"})
    assert finished(app, r.get_data(as_text=True)).status == "succeeded"
    assert seen == {
        "user": "ada",
        "agent": "t",
        "args": {"x": "1"},
        "json": {"n": 1},
        "cookies": ["session"],
    }
