"""Apps the real-server tests launch (uvicorn, hypercorn): ``asgi_apps:app``.

Configured by environment variables: ``BGTASKS_EVIDENCE`` (a file each task
and hook appends a line to), ``BGTASKS_GRACE`` (shutdown grace, seconds),
``BGTASKS_MAX_PENDING`` and ``BGTASKS_BASE_HTTP=1``, which puts a
``BaseHTTPMiddleware`` on each side of ``BackgroundMiddleware`` (the
combination behind starlette #919 and #1438).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

import bgtasks
from bgtasks.asgi import BackgroundMiddleware

EVIDENCE = os.environ.get("BGTASKS_EVIDENCE", os.devnull)

rt = bgtasks.Runtime(
    shutdown_grace=float(os.environ.get("BGTASKS_GRACE", "5")),
    max_pending=int(os.environ.get("BGTASKS_MAX_PENDING", "100")),
)


def note(line: str) -> None:
    with open(EVIDENCE, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class Noting(BaseHTTPMiddleware):
    """A ``BaseHTTPMiddleware`` that notes each request's tag before passing it on."""

    def __init__(self, app: Any, *, where: str) -> None:
        super().__init__(app)
        self.where = where

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        tag = request.query_params.get("tag")
        if tag is not None:
            note(f"{self.where} middleware {tag}")
        response = await call_next(request)
        response.headers[f"x-{self.where}"] = "1"
        return response


app = FastAPI()
base_http = os.environ.get("BGTASKS_BASE_HTTP") == "1"
if base_http:
    app.add_middleware(Noting, where="inner")  # added first: nearer the routes
app.add_middleware(BackgroundMiddleware, runtime=rt)
if base_http:
    app.add_middleware(Noting, where="outer")


@rt.on("beforeunload")
def unloading(event: bgtasks.BeforeUnloadEvent) -> None:
    if event.task is None:
        note(f"beforeunload {event.reason}")


@app.get("/_ready")
async def ready() -> dict[str, bool]:
    return {"ready": rt.started}


@app.post("/sleep")
@bgtasks.background
async def sleep(seconds: float, tag: str) -> str:
    note(f"start {tag}")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        note(f"cancelled {tag}")
        raise
    note(f"done {tag}")
    return tag
