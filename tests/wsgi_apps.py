"""Apps the real-server tests launch (gunicorn, ``flask run``).

Configured by environment variables:

- ``BGTASKS_EVIDENCE``: a file the app appends one line per event to
  (``started <id> <pid> <time>``, ``done ...``, ``cancelled ...``,
  ``beforeunload <reason> <pid> <time>``), so a test can see what happened in a
  worker after it has exited.
- ``BGTASKS_TEST_GRACE``: the runtime's ``shutdown_grace`` (default 10).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from flask import Flask, g, request, stream_with_context

import bgtasks
from bgtasks.flask import BgTasks

IMPORT_PID = os.getpid()
EVIDENCE = os.environ.get("BGTASKS_EVIDENCE", os.devnull)


def note(*words: object) -> None:
    with open(EVIDENCE, "a") as f:
        f.write(" ".join(str(w) for w in (*words, os.getpid(), time.time())) + "\n")


def this_task_id() -> str:
    task = bgtasks.current_task()
    assert task is not None
    return task.id


runtime = bgtasks.Runtime(shutdown_grace=float(os.environ.get("BGTASKS_TEST_GRACE", "10")))


@runtime.on("beforeunload")
def on_unload(event: bgtasks.BeforeUnloadEvent) -> None:
    if event.task is None:
        note("beforeunload", event.reason)


app = Flask(__name__)
BgTasks(app, runtime=runtime)


@app.get("/_ready")
def ready() -> str:
    return "ok"


@app.get("/pid")
def pid() -> dict[str, Any]:
    return {"pid": os.getpid(), "import_pid": IMPORT_PID, "grace": runtime.shutdown_grace}


@app.post("/work")
@bgtasks.background
def work() -> dict[str, Any]:
    """Sleep ``seconds`` in a worker thread."""
    task_id = this_task_id()
    note("started", task_id)
    time.sleep(float(request.args.get("seconds", "0")))
    note("done", task_id)
    return {"pid": os.getpid(), "echo": request.get_json(silent=True)}


@app.post("/async_work")
@bgtasks.background
async def async_work() -> None:
    """Sleep ``seconds`` on the runtime's event loop; note a cancellation."""
    task_id = this_task_id()
    note("started", task_id)
    try:
        await asyncio.sleep(float(request.args.get("seconds", "0")))
    except asyncio.CancelledError:
        note("cancelled", task_id)
        raise
    note("done", task_id)


@app.get("/run_and_wait")
def run_and_wait() -> dict[str, Any]:
    """Schedule a task with wait_until and wait for its result in the request."""

    def which_pid() -> int:
        return os.getpid()

    record = bgtasks.wait_until(which_pid).wait_sync(5.0)
    return {"pid": os.getpid(), "task_pid": record.result, "status": record.status}


# Streamed responses: bgtasks must leave them exactly as Flask sends them.
@app.get("/stream")
def stream() -> Any:
    def body() -> Any:
        for _ in range(50):
            yield from "0123456789"

    return app.response_class(body())


@app.get("/stream-with-context")
def stream_with_ctx() -> Any:
    g.times = 200

    def body() -> Any:
        for _ in range(g.times):
            yield request.args["x"]

    return app.response_class(stream_with_context(body()))


@app.get("/async-stream-with-context")
async def async_stream_with_ctx() -> Any:
    g.times = 200

    def body() -> Any:
        for _ in range(g.times):
            yield request.args["x"]

    return app.response_class(stream_with_context(body()))
