"""The ASGI adapter in-process: FastAPI and Starlette through a real lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import subprocess
import sys
import threading
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

import bgtasks
from bgtasks import RegistryFull
from bgtasks._ids import new_id
from bgtasks._loopthread import host_for
from bgtasks.asgi import BackgroundMiddleware, accepted_response, document_background_routes
from bgtasks.stores import MemoryStore

with warnings.catch_warnings():
    # Starlette asks for httpx2 and works with httpx; the warning is not ours.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

PREFIX = "/_bgtasks/tasks"
WAIT = 5.0


class Item(BaseModel):
    name: str
    qty: int = 1


class Report(BaseModel):
    url: str


def user_name() -> str:
    return "ada"


def current_user(name: Annotated[str, Depends(user_name)]) -> str:
    return name.upper()


def make_app(rt: bgtasks.Runtime | None = None, **options: Any) -> tuple[FastAPI, bgtasks.Runtime]:
    rt = rt or bgtasks.Runtime(shutdown_grace=5.0)
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=rt, **options)
    return app, rt


# The two ways to use the middleware: added to the app (inside its
# ServerErrorMiddleware) or wrapping it (outside everything the app builds).
HOW = ["add_middleware", "direct"]


def serve(app: Starlette, how: str, **options: Any) -> Any:
    """The ASGI app to run: ``app`` with the middleware added, or wrapped in it."""
    if how == "add_middleware":
        app.add_middleware(BackgroundMiddleware, **options)
        return app
    return BackgroundMiddleware(app, **options)


def finished(rt: bgtasks.Runtime, task_id: str) -> bgtasks.TaskRecord:
    handle = rt.handle(task_id)
    assert handle is not None, f"the runtime does not know task {task_id}"
    return handle.wait_sync(WAIT)


# ---------------------------------------------------------------------- 202 routes
@pytest.mark.parametrize("how", HOW)
def test_background_endpoint_answers_202_and_the_location_reports_success(how: str) -> None:
    rt = bgtasks.Runtime(shutdown_grace=5.0)
    app = FastAPI()

    @app.post("/items")
    @bgtasks.background
    async def make_item(item: Item) -> dict[str, Any]:
        return {"made": item.name, "qty": item.qty}

    with TestClient(serve(app, how, runtime=rt)) as client:
        r = client.post("/items", json={"name": "bolt", "qty": 3})
        assert r.status_code == 202
        body = r.json()
        assert set(body) == {"id", "status", "status_url"}
        assert body["status"] == "pending"
        assert r.headers["location"] == body["status_url"] == f"{PREFIX}/{body['id']}"
        assert len(body["id"]) >= 22  # at least 128 random bits, URL-safe
        finished(rt, body["id"])
        status = client.get(r.headers["location"])
        assert status.status_code == 200
        record = status.json()
        assert record["status"] == "succeeded"
        assert record["result"] == {"made": "bolt", "qty": 3}
        assert record["name"].endswith("make_item")


def test_invalid_body_is_fastapis_422_and_schedules_nothing() -> None:
    app, rt = make_app()
    calls: list[Item] = []

    @app.post("/items")
    @bgtasks.background
    def make_item(item: Item) -> None:
        calls.append(item)

    with TestClient(app) as client:
        r = client.post("/items", json={"qty": "many"})
        assert r.status_code == 422
        assert {e["loc"][-1] for e in r.json()["detail"]} == {"name", "qty"}
        assert sum(rt.stats().values()) == 0
    assert calls == []


def test_path_query_and_depends_are_resolved_from_the_original_signature() -> None:
    app, rt = make_app()

    @app.post("/orgs/{org}/reports")
    @bgtasks.background
    async def build(
        org: int, user: Annotated[str, Depends(current_user)], item: Item, fmt: str = "pdf"
    ) -> dict[str, Any]:
        return {"org": org, "user": user, "fmt": fmt, "item": item.name}

    with TestClient(app) as client:
        r = client.post("/orgs/7/reports?fmt=csv", json={"name": "q3"})
        assert r.status_code == 202, r.text
        record = finished(rt, r.json()["id"])
        assert record.result == {"org": 7, "user": "ADA", "fmt": "csv", "item": "q3"}
        assert client.post("/orgs/seven/reports", json={"name": "q3"}).status_code == 422
        assert rt.stats()["succeeded"] == 1


def test_sync_and_async_endpoints_and_functions() -> None:
    app, rt = make_app()
    threads: dict[str, int] = {}

    @app.post("/sync")
    @bgtasks.background
    def sync_job(n: int) -> int:
        threads["sync"] = threading.get_ident()
        return n * 2

    @app.post("/async")
    @bgtasks.background
    async def async_job(n: int) -> int:
        threads["async"] = threading.get_ident()
        return n * 3

    with TestClient(app) as client:
        a = client.post("/sync?n=2")
        b = client.post("/async?n=2")
        assert (a.status_code, b.status_code) == (202, 202)
        assert finished(rt, a.json()["id"]).result == 4
        assert finished(rt, b.json()["id"]).result == 6
    assert threads["sync"] != threads["async"]  # the sync function ran in a worker thread


def test_wait_until_in_sync_and_async_endpoints() -> None:
    app, rt = make_app()
    done: list[str] = []

    async def audit(what: str) -> str:
        done.append(what)
        return what

    @app.post("/async")
    async def async_endpoint() -> dict[str, str]:
        handle = bgtasks.wait_until(audit("async"))
        return {"id": handle.id}

    @app.post("/sync")
    def sync_endpoint() -> dict[str, str]:  # runs in Starlette's threadpool
        handle = bgtasks.wait_until(done.append, "sync")
        return {"id": handle.id}

    with TestClient(app) as client:
        a = client.post("/async")
        b = client.post("/sync")
        assert (a.status_code, b.status_code) == (200, 200)
        assert finished(rt, a.json()["id"]).status == "succeeded"
        assert finished(rt, b.json()["id"]).status == "succeeded"
    assert sorted(done) == ["async", "sync"]


def test_background_function_called_inside_another_endpoint_returns_a_handle() -> None:
    app, rt = make_app()

    @bgtasks.background
    async def send_email(to: str) -> str:
        return f"sent to {to}"

    @app.post("/signup")
    async def signup(email: str) -> dict[str, str]:
        handle = send_email(email)
        assert isinstance(handle, bgtasks.TaskHandle)
        return {"email_task": handle.id}

    with TestClient(app) as client:
        r = client.post("/signup?email=a@example.com")
        assert r.status_code == 200
        assert finished(rt, r.json()["email_task"]).result == "sent to a@example.com"


def test_accepted_response_for_an_endpoint_that_schedules_itself() -> None:
    app, rt = make_app()

    @bgtasks.background
    async def export(kind: str) -> str:
        return kind

    @app.post("/exports/{kind}")
    async def start_export(kind: str) -> Response:
        if kind == "forbidden":
            raise HTTPException(403, "no")
        return accepted_response(export.submit(kind))  # type: ignore[no-any-return]

    with TestClient(app) as client:
        assert client.post("/exports/forbidden").status_code == 403
        r = client.post("/exports/csv")
        assert r.status_code == 202
        assert r.headers["location"] == r.json()["status_url"]
        assert finished(rt, r.json()["id"]).result == "csv"
    with pytest.raises(bgtasks.RuntimeNotActive, match="BackgroundMiddleware"):
        accepted_response(None)  # type: ignore[arg-type]


def test_idempotency_key_header_returns_the_existing_task() -> None:
    app, rt = make_app()
    release = threading.Event()

    @app.post("/charge")
    @bgtasks.background
    def charge(amount: int) -> int:
        release.wait(WAIT)
        return amount

    with TestClient(app) as client:
        first = client.post("/charge?amount=5", headers={"Idempotency-Key": "k-1"})
        again = client.post("/charge?amount=5", headers={"Idempotency-Key": "k-1"})
        other = client.post("/charge?amount=5", headers={"Idempotency-Key": "k-2"})
        long_key = "x" * 1000
        long1 = client.post("/charge?amount=1", headers={"Idempotency-Key": long_key})
        long2 = client.post("/charge?amount=1", headers={"Idempotency-Key": long_key})
        release.set()
        assert first.json()["id"] == again.json()["id"] != other.json()["id"]
        assert long1.json()["id"] == long2.json()["id"]
        assert rt.stats()["pending"] + rt.stats()["running"] + rt.stats()["succeeded"] == 3


def test_root_path_and_mounted_apps_get_the_middlewares_own_status_url() -> None:
    app, rt = make_app()
    sub = FastAPI()

    @sub.post("/jobs")
    @bgtasks.background
    async def sub_job() -> str:
        return "sub"

    app.mount("/v2", sub)

    with TestClient(app, root_path="/api") as client:
        r = client.post("/api/v2/jobs")  # servers put root_path in path (ASGI spec)
        assert r.status_code == 202
        location = r.headers["location"]
        assert location == f"/api{PREFIX}/{r.json()['id']}"
        finished(rt, r.json()["id"])
        assert client.get(location).json()["result"] == "sub"


# ---------------------------------------------------------------------- status routes
def test_status_routes_read_cancel_and_refuse_bad_ids() -> None:
    app, rt = make_app()
    started = threading.Event()

    @app.post("/slow")
    @bgtasks.background
    async def slow() -> None:
        started.set()
        await asyncio.Event().wait()  # runs until cancelled

    @app.post("/fast")
    @bgtasks.background
    async def fast() -> int:
        return 1

    with TestClient(app) as client:
        running = client.post("/slow").json()
        assert started.wait(WAIT)
        url = running["status_url"]
        assert client.get(url).json()["status"] == "running"
        head = client.head(url)
        assert head.status_code == 200 and head.content == b""

        cancel = client.delete(url)
        assert cancel.status_code == 202
        assert finished(rt, running["id"]).status == "cancelled"
        assert client.get(url).json()["status"] == "cancelled"
        again = client.delete(url)
        assert again.status_code == 409
        assert again.json()["status"] == "cancelled"

        done = client.post("/fast").json()
        finished(rt, done["id"])
        assert client.delete(done["status_url"]).status_code == 409

        unknown = new_id()  # well formed, never issued
        assert client.get(f"{PREFIX}/{unknown}").status_code == 404
        assert client.delete(f"{PREFIX}/{unknown}").status_code == 404
        for bad in (
            "abc",
            "x" * 5000,
            "..%2F..%2Fetc",
            f"{done['id']}/extra",
            "%00" * len(unknown),
            "",
        ):
            r = client.get(f"{PREFIX}/{bad}")
            assert r.status_code == 404, (bad, r.status_code)
            assert r.json() == {"detail": "Task not found"}
        post = client.post(url)
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD, DELETE"


def test_status_prefix_is_configurable() -> None:
    app, rt = make_app(status_prefix="/jobs")

    @app.post("/go")
    @bgtasks.background
    async def go() -> int:
        return 1

    with TestClient(app) as client:
        r = client.post("/go")
        assert r.headers["location"].startswith("/jobs/")
        finished(rt, r.json()["id"])
        assert client.get(r.headers["location"]).json()["status"] == "succeeded"
        assert client.get(f"{PREFIX}/{r.json()['id']}").status_code == 404  # the app's own 404
    with pytest.raises(ValueError, match="status_prefix must start with '/'"):
        BackgroundMiddleware(app, status_prefix="jobs/")


@pytest.mark.parametrize("hook_kind", ["sync", "async"])
def test_authorize_hook_and_include_result(hook_kind: str) -> None:
    seen: list[tuple[str, str]] = []

    def decide(request: Request, record: bgtasks.TaskRecord, action: str) -> bool:
        seen.append((record.id, action))
        user = request.headers.get("x-user")
        if user is None:
            raise HTTPException(401, "log in", headers={"WWW-Authenticate": "Bearer"})
        return user == "owner" or (user == "reader" and action == "read")

    async def decide_async(request: Request, record: bgtasks.TaskRecord, action: str) -> bool:
        return decide(request, record, action)

    hook = decide if hook_kind == "sync" else decide_async
    app, rt = make_app(authorize=hook, include_result=False)

    @app.post("/secret")
    @bgtasks.background
    async def secret() -> str:
        return "the answer"

    with TestClient(app) as client:
        url = client.post("/secret").headers["location"]
        task_id = url.rsplit("/", 1)[1]
        finished(rt, task_id)
        owner = client.get(url, headers={"x-user": "owner"})
        assert owner.status_code == 200
        assert "result" not in owner.json()
        assert owner.json()["status"] == "succeeded"
        assert client.get(url, headers={"x-user": "reader"}).status_code == 200
        assert client.get(url, headers={"x-user": "mallory"}).status_code == 404
        assert client.delete(url, headers={"x-user": "reader"}).status_code == 404
        anonymous = client.get(url)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"] == "Bearer"
        assert client.delete(url, headers={"x-user": "owner"}).status_code == 409
    assert (task_id, "cancel") in seen and (task_id, "read") in seen


def test_status_reads_of_a_non_memory_store_run_off_the_event_loop() -> None:
    loop_threads: set[int] = set()
    load_threads: list[int] = []

    class FileLikeStore(MemoryStore):
        durable = True

        async def open(self) -> None:
            loop_threads.add(threading.get_ident())
            await super().open()

        def load(self, task_id: str) -> bgtasks.TaskRecord | None:
            load_threads.append(threading.get_ident())
            return None

    app, _ = make_app(bgtasks.Runtime(store=FileLikeStore()))
    with TestClient(app) as client:
        assert client.get(f"{PREFIX}/{new_id()}").status_code == 404
    assert len(load_threads) == 1
    assert load_threads[0] not in loop_threads


# ---------------------------------------------------------------------- overload
@pytest.mark.parametrize("how", HOW)
def test_registry_full_becomes_503_with_retry_after(how: str) -> None:
    rt = bgtasks.Runtime(max_pending=1, shutdown_grace=5.0)
    app = FastAPI()
    release = threading.Event()

    @app.post("/job")
    @bgtasks.background
    def job() -> None:
        release.wait(WAIT)

    @app.post("/plain")
    async def plain() -> dict[str, str]:
        return {"id": bgtasks.wait_until(asyncio.sleep(0)).id}

    # A 500 would raise here: the TestClient re-raises what the app raised.
    with TestClient(serve(app, how, runtime=rt)) as client:
        try:
            assert client.post("/job").status_code == 202
            for path in ("/job", "/plain"):
                r = client.post(path)
                assert r.status_code == 503, path
                assert r.headers["retry-after"] == "1"
                assert "max_pending=1" in r.json()["detail"]
        finally:
            release.set()
        wait_idle(client, rt)
        assert client.post("/job").status_code == 202


@pytest.mark.parametrize("how", HOW)
def test_registry_full_in_a_mounted_app_becomes_503_too(how: str) -> None:
    # A mounted FastAPI app has its own ServerErrorMiddleware: the middleware is
    # outside it however it was added.
    rt = bgtasks.Runtime(max_pending=1, shutdown_grace=5.0)
    app, sub = FastAPI(), FastAPI()
    release = threading.Event()

    @sub.post("/job")
    @bgtasks.background
    def job() -> None:
        release.wait(WAIT)

    app.mount("/v2", sub)
    with TestClient(serve(app, how, runtime=rt)) as client:
        try:
            assert client.post("/v2/job").status_code == 202
            r = client.post("/v2/job")
            assert (r.status_code, r.headers["retry-after"]) == (503, "1")
            assert "max_pending=1" in r.json()["detail"]
        finally:
            release.set()
        wait_idle(client, rt)
    assert RegistryFull not in app.exception_handlers or how == "direct"


async def refuse() -> None:
    """An endpoint whose work the runtime refused, as ``wait_until`` may."""
    raise RegistryFull("the runtime holds max_pending=7 unfinished tasks", retry_after=2.6)


def test_wrapping_an_app_that_already_ran_still_answers_503() -> None:
    app = FastAPI()
    app.api_route("/refused", methods=["POST", "HEAD"])(refuse)

    with TestClient(app) as client:  # builds the app's middleware stack
        client.get("/")
    assert app.middleware_stack is not None
    with TestClient(BackgroundMiddleware(app)) as client:
        r = client.post("/refused")
        assert (r.status_code, r.headers["retry-after"]) == (503, "3")
        assert r.json() == {"detail": "the runtime holds max_pending=7 unfinished tasks"}
        head = client.head("/refused")
        assert (head.status_code, head.content) == (503, b"")
        assert head.headers["content-length"] == r.headers["content-length"]
        assert client.get("/missing").status_code == 404  # the app's own answers are untouched


@pytest.mark.parametrize("how", HOW)
def test_the_apps_own_registry_full_handler_is_kept(how: str) -> None:
    app = FastAPI()
    app.post("/refused")(refuse)

    async def busy(request: Request, exc: Exception) -> Response:
        return JSONResponse({"busy": str(exc)}, status_code=429)

    app.add_exception_handler(bgtasks.BgTasksError, busy)
    with TestClient(serve(app, how)) as client:
        r = client.post("/refused")
        assert r.status_code == 429 and "max_pending=7" in r.json()["busy"]
    assert app.exception_handlers[bgtasks.BgTasksError] is busy
    assert RegistryFull not in app.exception_handlers


def wait_idle(client: TestClient, rt: bgtasks.Runtime) -> None:
    assert client.portal is not None
    assert client.portal.call(rt.drain, WAIT)


# ---------------------------------------------------------------------- OpenAPI
@pytest.mark.parametrize("how", HOW)
def test_openapi_documents_202_with_the_accepted_body_and_the_request_as_before(how: str) -> None:
    app = FastAPI()

    @app.post("/reports/{org}")
    @bgtasks.background
    async def build_report(org: int, item: Item, year: int = 2024) -> Report:
        return Report(url="x")

    @app.post("/explicit", status_code=202)
    @bgtasks.background
    def explicit(item: Item) -> Report:
        return Report(url="x")

    @app.post("/normal")
    async def normal(item: Item) -> Report:
        return Report(url="x")

    with TestClient(serve(app, how)) as client:
        schema = client.get("/openapi.json").json()
    op = schema["paths"]["/reports/{org}"]["post"]
    assert set(op["responses"]) == {"202", "422"}
    ok = op["responses"]["202"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/TaskAccepted"}
    assert op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Item"
    }
    assert {p["name"]: p["in"] for p in op["parameters"]} == {"org": "path", "year": "query"}
    accepted = schema["components"]["schemas"]["TaskAccepted"]
    assert set(accepted["properties"]) == {"id", "status", "status_url"}
    assert set(schema["paths"]["/explicit"]["post"]["responses"]) == {"202", "422"}
    for path in ("/reports/{org}", "/explicit"):
        background_op = schema["paths"][path]["post"]
        # The handler's return type (Report) is the task's result, not the answer.
        assert "Report" not in json.dumps(background_op["responses"]), path
        assert background_op["requestBody"] == op["requestBody"], path
    assert op["requestBody"]["required"] is True
    item = schema["components"]["schemas"]["Item"]
    assert set(item["properties"]) == {"name", "qty"} and item["required"] == ["name"]
    normal_ok = schema["paths"]["/normal"]["post"]["responses"]["200"]
    assert normal_ok["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Report"
    }


def test_document_background_routes_without_starting_the_app() -> None:
    app = FastAPI()

    @app.post("/go")
    @bgtasks.background
    async def go() -> int:
        return 1

    before = app.openapi()["paths"]["/go"]["post"]["responses"]
    assert "200" in before  # status code not known yet, but the body is already TaskAccepted
    assert before["200"]["content"]["application/json"]["schema"]["$ref"].endswith("TaskAccepted")
    assert document_background_routes(app) == 1
    assert set(app.openapi()["paths"]["/go"]["post"]["responses"]) == {"202"}
    assert document_background_routes(app) == 0
    assert document_background_routes(object()) == 0


# ---------------------------------------------------------------------- other middleware
class Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Any, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-passed"] = "1"
        return response


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_base_http_middleware_neither_delays_the_202_nor_cancels_the_task(where: str) -> None:
    rt = bgtasks.Runtime(shutdown_grace=5.0)
    app = FastAPI()
    if where == "inside":  # added first: nearer the routes than ours
        app.add_middleware(Passthrough)
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    if where == "outside":
        app.add_middleware(Passthrough)
    started, release = threading.Event(), threading.Event()

    @app.post("/job")
    @bgtasks.background
    def job() -> str:
        started.set()
        release.wait(WAIT)
        return "done"

    with TestClient(app) as client:
        r = client.post("/job")  # returns while the task is still waiting: not delayed
        assert r.status_code == 202 and r.headers["x-passed"] == "1"
        assert started.wait(WAIT)
        handle = rt.handle(r.json()["id"])
        assert handle is not None and handle.status == "running"
        client.get("/nothing")  # more requests through the middleware meanwhile
        release.set()
        assert finished(rt, r.json()["id"]).status == "succeeded"


# ---------------------------------------------------------------------- lifespan
@pytest.mark.parametrize("how", HOW)
def test_lifespan_composes_with_the_apps_own_lifespan(how: str) -> None:
    events: list[str] = []
    rt = bgtasks.Runtime(shutdown_grace=5.0)
    warm_done = threading.Event()

    async def warm_cache() -> None:
        warm_done.set()
        events.append("warm-cache task ran")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append(f"app startup (runtime started={rt.started})")
        bgtasks.wait_until(warm_cache())  # the runtime is already active here
        yield
        events.append(f"app shutdown (runtime started={rt.started})")

    app = FastAPI(lifespan=lifespan)
    served = serve(app, how, runtime=rt)

    @rt.on("beforeunload")
    def unloading(event: bgtasks.BeforeUnloadEvent) -> None:
        events.append(f"beforeunload {event.reason}")

    @app.post("/job")
    @bgtasks.background
    async def job() -> None:
        events.append("job ran")

    with TestClient(served) as client:
        assert rt.started
        assert client.post("/job").status_code == 202
        assert warm_done.wait(WAIT)
    assert not rt.started
    assert events[0] == "app startup (runtime started=True)"
    # The runtime drained (beforeunload, tasks) before the app's own shutdown ran.
    assert events[-2:] == ["beforeunload shutdown", "app shutdown (runtime started=False)"]
    assert {"warm-cache task ran", "job ran"} <= set(events)


def test_fastapi_on_event_handlers_compose_too() -> None:
    events: list[str] = []
    app, rt = make_app()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # on_event is deprecated

        @app.on_event("startup")
        async def startup() -> None:
            events.append(f"startup {rt.started}")

        @app.on_event("shutdown")
        async def shutdown() -> None:
            events.append(f"shutdown {rt.started}")

    with TestClient(app):
        pass
    assert events == ["startup True", "shutdown False"]


def test_startup_failure_of_the_app_stops_the_runtime() -> None:
    rt = bgtasks.Runtime()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("database is down")
        yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    with pytest.raises(RuntimeError, match="database is down"), TestClient(app):
        pass
    assert not rt.started


def test_a_runtime_runs_one_lifespan_but_a_default_one_is_renewed() -> None:
    rt = bgtasks.Runtime()
    app, _ = make_app(rt)
    with TestClient(app):
        pass
    with pytest.raises(RuntimeError, match="a Runtime runs once"), TestClient(app):
        pass

    default = FastAPI()
    default.add_middleware(BackgroundMiddleware)

    @default.post("/job")
    @bgtasks.background
    async def job() -> int:
        return 1

    for _ in range(2):
        with TestClient(default) as client:
            assert client.post("/job").status_code == 202


async def plain_asgi_app(scope: Any, receive: Any, send: Any) -> None:
    """An app that knows only HTTP, as many hand-written ASGI apps do."""
    assert scope["type"] == "http", "this app does not speak lifespan"
    handle = bgtasks.wait_until(asyncio.sleep(0, "slept"))
    body = handle.id.encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_an_app_without_lifespan_support_still_gets_a_drained_runtime() -> None:
    rt = bgtasks.Runtime(shutdown_grace=5.0)
    unloads: list[str] = []
    rt.on("beforeunload", lambda event: unloads.append(event.reason))
    with TestClient(BackgroundMiddleware(plain_asgi_app, runtime=rt)) as client:
        assert rt.started
        task_id = client.get("/").text
        assert finished(rt, task_id).result == "slept"
    assert not rt.started
    assert unloads == ["shutdown"]


@pytest.mark.anyio
async def test_without_lifespan_the_first_task_starts_the_runtime_on_its_own_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rt = bgtasks.Runtime(shutdown_grace=1.0)
    app, _ = make_app(rt)

    @app.post("/job")
    @bgtasks.background
    async def job(n: int) -> int:
        return n

    @app.get("/plain")
    async def plain() -> str:
        return "plain"

    transport = httpx.ASGITransport(app=app)  # no lifespan, like uvicorn --lifespan off
    try:
        with caplog.at_level(logging.DEBUG, logger="bgtasks"):
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/plain")).text == '"plain"'
                assert not rt.started  # a route that does not use bgtasks starts nothing
                assert caplog.records == []  # ... and logs nothing
                ids = [(await client.post(f"/job?n={n}")).json()["id"] for n in range(3)]
                records = [await h.wait(WAIT) for h in map(rt.handle, ids) if h is not None]
                assert [r.result for r in records] == [0, 1, 2]
                assert rt._loop is not asyncio.get_running_loop()  # its own thread
        # On the main thread, as under a real server with --lifespan off: said once.
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "no ASGI lifespan" in warned[0].getMessage()
    finally:
        assert host_for(rt).stop(WAIT)
    assert not rt.started


def test_testclient_without_with_serves_every_request() -> None:
    app, rt = make_app()

    @app.post("/job")
    @bgtasks.background
    async def job() -> int:
        return 1

    client = TestClient(app)  # every request on a new event loop
    try:
        ids = [client.post("/job").json()["id"] for _ in range(3)]
        assert [finished(rt, i).result for i in ids] == [1, 1, 1]
        assert client.get(f"{PREFIX}/{ids[0]}").json()["status"] == "succeeded"
    finally:
        assert host_for(rt).stop(WAIT)


# ---------------------------------------------------------------------- Starlette, websockets
def test_plain_starlette_app() -> None:
    rt = bgtasks.Runtime(shutdown_grace=5.0)

    @bgtasks.background
    async def resize(name: str) -> str:
        return f"resized {name}"

    async def upload(request: Any) -> Response:
        name = request.path_params["name"]
        return accepted_response(resize.submit(name))  # type: ignore[no-any-return]

    async def audit(request: Any) -> JSONResponse:
        handle = bgtasks.wait_until(asyncio.sleep(0, "audited"))
        return JSONResponse({"id": handle.id})

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        handle = bgtasks.wait_until(asyncio.sleep(0, "ws"))
        await websocket.send_text(handle.id)
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/upload/{name}", upload, methods=["POST"]),
            Route("/audit", audit),
            Mount("/ws", routes=[WebSocketRoute("/", ws)]),
        ]
    )
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    with TestClient(app) as client:
        r = client.post("/upload/cat.png")
        assert r.status_code == 202
        assert finished(rt, r.json()["id"]).result == "resized cat.png"
        assert finished(rt, client.get("/audit").json()["id"]).result == "audited"
        with client.websocket_connect("/ws/") as socket:
            task_id = socket.receive_text()
        assert finished(rt, task_id).result == "ws"


# ---------------------------------------------------------------------- yield dependencies
class Session:
    """Stands for a database session: unusable once closed."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def query(self, what: str) -> str:
        if self.closed:
            raise RuntimeError("session is closed")
        return f"rows of {what}"


def test_yield_dependency_pattern_open_a_new_session_inside_the_task() -> None:
    app, rt = make_app()
    request_session_closed = asyncio.Event()

    async def get_session() -> AsyncIterator[Session]:
        session = Session()
        try:
            yield session
        finally:  # runs after the response is sent: the task outlives it
            session.close()
            request_session_closed.set()

    # Wrong: the task keeps the request's session, closed once the response is out.
    @bgtasks.background
    async def report_with(session: Session) -> str:
        await request_session_closed.wait()
        return session.query("orders")

    # Right: pass plain values; the task opens (and closes) its own session.
    @bgtasks.background
    async def report(org_id: int) -> str:
        with contextlib.closing(Session()) as session:  # e.g. `with SessionLocal() as session:`
            return session.query(f"orders of {org_id}")

    @app.post("/wrong")
    async def wrong(session: Session = Depends(get_session)) -> dict[str, str]:  # noqa: B008
        return {"id": report_with(session).id}

    @app.post("/right/{org_id}")
    async def right(org_id: int, session: Session = Depends(get_session)) -> dict[str, str]:  # noqa: B008
        session.query("permissions")  # the request's session serves the request
        return {"id": report(org_id).id}

    with TestClient(app) as client:
        r = client.post("/wrong")
        assert r.status_code == 200, r.text
        bad = finished(rt, r.json()["id"])
        good = finished(rt, client.post("/right/7").json()["id"])
    assert bad.status == "failed"
    assert bad.error is not None and bad.error.message == "session is closed"
    assert good.status == "succeeded" and good.result == "rows of orders of 7"


# ---------------------------------------------------------------------- the example app
def test_the_fastapi_example_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The example's default store is a SQLite file in the working directory.
    monkeypatch.setenv("BGTASKS_STORE", f"sqlite:///{tmp_path}/example.db")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    monkeypatch.delitem(sys.modules, "examples.fastapi_app.app", raising=False)
    example = importlib.import_module("examples.fastapi_app.app")
    monkeypatch.setattr(example.random, "random", lambda: 0.5)  # no chance failures
    rt: bgtasks.Runtime = example.runtime
    with TestClient(example.app) as client:
        # First, so that its 2 CPU seconds run while the rest is checked.
        too_big = client.post("/primes", params={"below": 50_000_000})
        report = client.post("/reports", json={"org_id": 3, "year": 2024, "sections": 1})
        email = client.post("/emails", json={"to": "ada@flaky.example", "subject": "hi"})
        primes = client.post("/primes", params={"below": 1000})
        order = client.post("/orders", json={"item": "bolt", "quantity": 2})
        assert [r.status_code for r in (report, email, primes, order)] == [202, 202, 202, 201]
        assert client.post("/reports", json={"org_id": 0, "year": 2024}).status_code == 422
        built = finished(rt, report.json()["id"])
        assert built.status == "succeeded" and built.result == {
            "url": "/files/report-3-2024.pdf",
            "sections": 1,
        }
        assert built.progress is not None and built.progress.done == 1
        sent = finished(rt, email.json()["id"])
        assert sent.status == "succeeded" and sent.attempts >= 2
        assert finished(rt, primes.json()["id"]).result == 168
        assert finished(rt, order.json()["audit_task"]).status == "succeeded"
        audit = [row for row in example.db.rows if row["table"] == "audit"]
        assert len(audit) == 1
        assert audit[0]["action"] == "order.created"
        assert (audit[0]["order_id"], audit[0]["user"]) == (order.json()["id"], "ada")
        assert too_big.status_code == 202
        stopped = finished(rt, too_big.json()["id"])
        assert stopped.status == "failed"
        assert stopped.error is not None and stopped.error.type == "CPULimitExceeded"
        schema = client.get("/openapi.json").json()
        assert "202" in schema["paths"]["/reports"]["post"]["responses"]
        metrics = client.get("/metrics").text
        assert 'bgtasks_tasks_finished_total{name="build_report",status="succeeded"}' in metrics


def test_importing_the_adapter_imports_no_framework() -> None:
    code = (
        "import sys, bgtasks.asgi; "
        "bad = [m for m in ('fastapi', 'starlette') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
