"""Durable task functions and a tiny FastAPI app for the durability tests.

The functions are module-level so that a runtime (in this process or another)
can import them by ``durable_apps:<name>`` when it replays the journal.

The app is configured by environment variables, read at import:

- ``BGTASKS_STORE``: the store URL (default ``memory``);
- ``BGTASKS_GATE``: a path; ``gated`` tasks wait until it exists;
- ``BGTASKS_GRACE``: the runtime's ``shutdown_grace`` (default 5 s).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

import bgtasks
from bgtasks import step
from bgtasks.asgi import BackgroundMiddleware

GATE = Path(os.environ.get("BGTASKS_GATE", "/nonexistent/bgtasks-gate"))


def gate_open() -> bool:
    return GATE.exists()


class Order(BaseModel):
    sku: str
    qty: int = 1


@bgtasks.background(durable=True)
async def gated(n: int) -> dict[str, Any]:
    """Wait for the gate file, then answer with who ran it."""
    while not gate_open():
        await asyncio.sleep(0.02)
    return {"n": n, "pid": os.getpid()}


@bgtasks.background(durable=True)
async def double(n: int) -> int:
    return n * 2


@bgtasks.background(durable=True)
def place(order: Order, note: str = "", *, urgent: bool = False) -> dict[str, Any]:
    return {"sku": order.sku, "qty": order.qty, "note": note, "urgent": urgent}


@bgtasks.background(durable=True, retries=2)
async def always_fails() -> None:
    raise RuntimeError("always fails")


@bgtasks.background(durable=True)
async def forever(n: int) -> None:
    await asyncio.Event().wait()


@bgtasks.background
async def not_durable(n: int) -> int:
    return n


# ---------------------------------------------------------------------- steps
def note(line: str) -> None:
    """Append a line to the file named by BGTASKS_STEPS_LOG (read at each call)."""
    with open(os.environ.get("BGTASKS_STEPS_LOG", os.devnull), "a", encoding="utf-8") as f:
        f.write(line + "\n")


async def first_step(n: int) -> int:
    note(f"first {n}")
    return n + 1


async def second_step(x: int) -> int:
    note(f"second {x}")
    while not gate_open():
        await asyncio.sleep(0.02)
    return x * 10


_fail_once: set[int] = set()


async def fails_once(x: int) -> int:
    if x not in _fail_once:
        _fail_once.add(x)
        raise ConnectionError("the first call fails")
    return x


@bgtasks.background(durable=True, retries=1)
async def stepped_retry(n: int) -> int:
    a = await step.run("first", first_step, n)
    return await step.run("flaky", fails_once, a)


@bgtasks.background(durable=True)
async def unstorable() -> None:
    await step.run("returns an object", object)


@bgtasks.background(durable=True)
async def napper(n: int, seconds: float) -> int:
    a = await step.run("before", first_step, n)
    await step.sleep("nap", seconds)
    note(f"after {n}")
    return a


# ---------------------------------------------------------------------- the app
runtime = bgtasks.Runtime(
    store=os.environ.get("BGTASKS_STORE", "memory"),
    shutdown_grace=float(os.environ.get("BGTASKS_GRACE", "5")),
)
app = FastAPI()
app.add_middleware(BackgroundMiddleware, runtime=runtime)


@app.get("/_ready")
async def ready() -> dict[str, Any]:
    return {"pid": os.getpid(), "started": runtime.started, "time": time.time()}


@app.post("/work")
@bgtasks.background(durable=True, name="durable_apps.work")
async def work(n: int) -> dict[str, Any]:
    """The endpoint itself is the durable task: 202 once it is journaled."""
    while not gate_open():
        await asyncio.sleep(0.02)
    return {"n": n, "pid": os.getpid()}


@app.post("/orders")
@bgtasks.background(durable=True, name="durable_apps.order")
async def order(order: Order) -> dict[str, Any]:
    """A durable endpoint whose JSON body is a pydantic model: stored, and rebuilt on replay."""
    while not gate_open():
        await asyncio.sleep(0.02)
    return {"sku": order.sku, "qty": order.qty, "pid": os.getpid()}


@app.post("/steps")
@bgtasks.background(durable=True, name="durable_apps.stepped")
async def stepped(n: int) -> int:
    """Two steps; the second waits for the gate file (kill -9 lands there)."""
    a = await step.run("first", first_step, n)
    return await step.run("second", second_step, a)
