"""Apps the real-server tests launch (uvicorn, hypercorn): ``asgi_apps:app``.

Configured by environment variables: ``BGTASKS_EVIDENCE`` (a file each task
and hook appends a line to), ``BGTASKS_GRACE`` (shutdown grace, seconds) and
``BGTASKS_MAX_PENDING``.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI

import bgtasks
from bgtasks.asgi import BackgroundMiddleware

EVIDENCE = os.environ.get("BGTASKS_EVIDENCE", os.devnull)

rt = bgtasks.Runtime(
    shutdown_grace=float(os.environ.get("BGTASKS_GRACE", "5")),
    max_pending=int(os.environ.get("BGTASKS_MAX_PENDING", "100")),
)
app = FastAPI()
app.add_middleware(BackgroundMiddleware, runtime=rt)


def note(line: str) -> None:
    with open(EVIDENCE, "a", encoding="utf-8") as f:
        f.write(line + "\n")


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
