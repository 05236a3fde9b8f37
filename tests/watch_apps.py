"""Apps for the push, dashboard and browser tests: ASGI (Starlette) and Flask.

Each app can start tasks the test steers:

- ``POST /spawn?kind=ok|fail|hold&name=N`` starts one and answers its id and
  status URL. ``ok`` returns ``{"answer": 42}``, ``fail`` raises
  ``RuntimeError("it broke")``, ``hold`` runs until told.
- ``POST /steer/<id>?do=progress&done=N&total=M`` makes a held task report
  progress; ``do=finish`` makes it return; ``do=fail`` makes it raise.

The dashboard is open to requests with the cookie ``admin=yes``.
``BGTASKS_READ_ONLY=1`` makes it read-only; ``BGTASKS_MAX_WATCHERS``,
``BGTASKS_HEARTBEAT``, ``BGTASKS_MAX_STREAM`` tune push; ``BGTASKS_STORE`` picks the store.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from typing import Any

import bgtasks

READ_ONLY = os.environ.get("BGTASKS_READ_ONLY") == "1"
WATCH = bgtasks.WatchConfig(
    max_watchers=int(os.environ.get("BGTASKS_MAX_WATCHERS", "100")),
    heartbeat=float(os.environ.get("BGTASKS_HEARTBEAT", "15")),
    coalesce=float(os.environ.get("BGTASKS_COALESCE", "0.2")),
    max_stream=float(os.environ.get("BGTASKS_MAX_STREAM", "30")),
)
STORE = os.environ.get("BGTASKS_STORE", "memory")


def is_admin(request: Any) -> bool:
    return bool(request.cookies.get("admin") == "yes")


def is_admin_slow_list(request: Any) -> bool:
    """``is_admin``; with the cookie ``delay=<s>``, list requests answer that much later."""
    delay = request.cookies.get("delay")
    if delay and "/api/tasks" in request.path:
        time.sleep(float(delay))
    return is_admin(request)


# --------------------------------------------------------------------------- ASGI
def make_asgi() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from bgtasks.asgi import BackgroundMiddleware

    runtime = bgtasks.Runtime(store=STORE, shutdown_grace=2.0)
    inboxes: dict[str, asyncio.Queue[tuple[str, float, float | None]]] = {}

    async def ok() -> dict[str, int]:
        return {"answer": 42}

    async def fail() -> None:
        raise RuntimeError("it broke")

    async def hold(inbox: asyncio.Queue[tuple[str, float, float | None]]) -> str:
        task = bgtasks.current_task()
        assert task is not None
        while True:
            what, done, total = await inbox.get()
            if what == "finish":
                return "finished"
            if what == "fail":
                raise RuntimeError("told to fail")
            task.report_progress(done, total, f"step {done:g}")

    async def spawn(request: Request) -> JSONResponse:
        kind = request.query_params.get("kind", "ok")
        name = request.query_params.get("name", kind)
        if kind == "hold":
            inbox: asyncio.Queue[tuple[str, float, float | None]] = asyncio.Queue()
            handle = runtime.wait_until(hold(inbox), name=name)
            inboxes[handle.id] = inbox
        else:
            handle = runtime.wait_until(ok() if kind == "ok" else fail(), name=name)
        url = f"/_bgtasks/tasks/{handle.id}"
        return JSONResponse({"id": handle.id, "status_url": url})

    async def steer(request: Request) -> PlainTextResponse:
        inbox = inboxes[request.path_params["task_id"]]
        q = request.query_params
        total = q.get("total")
        inbox.put_nowait(
            (
                q.get("do", "progress"),
                float(q.get("done", "0")),
                None if total is None else float(total),
            )
        )
        return PlainTextResponse("ok")

    async def ready(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ready")

    async def watchers(request: Request) -> JSONResponse:
        return JSONResponse({"waiters": runtime._hub.count(), "taken": mw.watch.slots.taken})

    app = Starlette(
        routes=[
            Route("/spawn", spawn, methods=["POST"]),
            Route("/steer/{task_id}", steer, methods=["POST"]),
            Route("/_ready", ready),
            Route("/_watchers", watchers),
        ]
    )
    mw = BackgroundMiddleware(
        app,
        runtime=runtime,
        dashboard=is_admin,
        dashboard_read_only=READ_ONLY,
        watch=WATCH,
    )
    return mw


# --------------------------------------------------------------------------- Flask
def make_flask() -> Any:
    from flask import Flask, jsonify, request

    from bgtasks.flask import BgTasks

    runtime = bgtasks.Runtime(store=STORE, shutdown_grace=2.0)
    app = Flask(__name__)
    BgTasks(
        app,
        runtime=runtime,
        dashboard=is_admin_slow_list,
        dashboard_read_only=READ_ONLY,
        watch=WATCH,
    )
    inboxes: dict[str, queue.Queue[tuple[str, float, float | None]]] = {}
    lock = threading.Lock()

    def ok() -> dict[str, int]:
        return {"answer": 42}

    def fail() -> None:
        raise RuntimeError("it broke")

    def hold(inbox: queue.Queue[tuple[str, float, float | None]]) -> str:
        task = bgtasks.current_task()
        assert task is not None
        while True:
            try:  # short waits: a cancel (an exception raised in this thread) lands at once
                what, done, total = inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if what == "finish":
                return "finished"
            if what == "fail":
                raise RuntimeError("told to fail")
            task.report_progress(done, total, f"step {done:g}")

    @app.post("/spawn")
    def spawn() -> Any:
        kind = request.args.get("kind", "ok")
        name = request.args.get("name", kind)
        if kind == "hold":
            inbox: queue.Queue[tuple[str, float, float | None]] = queue.Queue()
            handle = runtime.wait_until(hold, inbox, name=name)
            with lock:
                inboxes[handle.id] = inbox
        else:
            handle = runtime.wait_until(ok if kind == "ok" else fail, name=name)
        return jsonify({"id": handle.id, "status_url": f"/_bgtasks/tasks/{handle.id}"})

    @app.post("/steer/<task_id>")
    def steer(task_id: str) -> str:
        with lock:
            inbox = inboxes[task_id]
        total = request.args.get("total")
        inbox.put(
            (
                request.args.get("do", "progress"),
                float(request.args.get("done", "0")),
                None if total is None else float(total),
            )
        )
        return "ok"

    @app.get("/_ready")
    def ready() -> str:
        return "ready"

    @app.get("/_watchers")
    def watchers() -> Any:
        watch = app.extensions["bgtasks"].watch
        return jsonify({"waiters": runtime._hub.count(), "taken": watch.slots.taken})

    return app


def _app_for_server() -> Any:
    return make_flask() if os.environ.get("BGTASKS_WATCH_APP") == "flask" else make_asgi()


if os.environ.get("BGTASKS_WATCH_APP"):
    app = _app_for_server()
