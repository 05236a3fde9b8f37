"""An app whose tasks raise SystemExit / KeyboardInterrupt: ``fault_apps:app``."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

import bgtasks
from bgtasks.asgi import BackgroundMiddleware

app = FastAPI()
app.add_middleware(BackgroundMiddleware)


@app.get("/_ready")
async def ready() -> dict[str, bool]:
    return {"ok": True}


@app.post("/exit")
@bgtasks.background
async def exits() -> None:
    await asyncio.sleep(0.05)
    raise SystemExit(1)


@app.post("/interrupt")
@bgtasks.background
def interrupts() -> None:
    raise KeyboardInterrupt


@app.post("/slow")
@bgtasks.background
async def slow() -> str:
    await asyncio.sleep(0.5)
    return "done"
