"""Durable tasks and runtimes for the PostgreSQL store's tests.

Importable by ``bgtasks worker pg_apps:worker`` processes, configured by
environment variables: ``BGTASKS_TEST_PG`` (the database URL),
``BGTASKS_TEST_MARKS`` (a directory where tasks note each run) and
``BGTASKS_TEST_GRACE`` (the worker's ``shutdown_grace``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from bgtasks import Limits, Runtime, background, step
from bgtasks.stores.postgres import PostgresStore


def store(dsn: str | None = None, **options: float) -> PostgresStore:
    """Short timings, so that tests see recovery in seconds rather than minutes."""
    settings: dict[str, float] = {
        "poll": 0.2,
        "heartbeat": 0.5,
        "stalled_after": 2.0,
        "journal_timeout": 2.0,
        "connect_timeout": 2.0,
    }
    settings.update(options)
    url = dsn or os.environ.get("BGTASKS_TEST_PG", "postgresql://postgres@127.0.0.1:1/unset")
    return PostgresStore(url, max_crashes=1, **settings)


@background(durable=True)
async def add(a: int, b: int) -> int:
    return a + b


@background(durable=True)
async def hold(mark: str, hang_runs: int) -> int:
    """Notes this run in BGTASKS_TEST_MARKS/<mark>; the first ``hang_runs`` runs
    never end (until cancelled or killed), later ones return the run number."""
    return await _hold(mark, hang_runs)


async def _hold(mark: str, hang_runs: int) -> int:
    path = Path(os.environ["BGTASKS_TEST_MARKS"]) / mark
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    runs = len(path.read_text().splitlines())
    if runs <= hang_runs:
        await asyncio.Event().wait()
    return runs


def _note(mark: str, what: str) -> int:
    """Append ``what <pid>`` to the marks file; return how many ``what`` lines it has."""
    path = Path(os.environ["BGTASKS_TEST_MARKS"]) / mark
    with path.open("a") as f:
        f.write(f"{what} {os.getpid()}\n")
    return sum(1 for line in path.read_text().splitlines() if line.split()[0] == what)


async def _work_hangs_first(mark: str) -> int:
    runs = _note(mark, "work")
    if runs == 1:
        await asyncio.Event().wait()
    return runs


@background(durable=True)
async def stepped(mark: str) -> int:
    """Two steps; the first run of the second never ends."""
    await step.run("prepare", _note, mark, "prepare")
    return await step.run("work", _work_hangs_first, mark)


@background(durable=True)
async def nap(seconds: float) -> str:
    await step.sleep("nap", seconds)
    return "woke"


@background(durable=True, limits=Limits(wall_clock=0.3))
async def too_slow() -> None:
    await asyncio.Event().wait()


@background
async def idle() -> None:
    """Not durable: runs where it was called, until cancelled."""
    await asyncio.Event().wait()


def worker_runtime() -> Runtime:
    return Runtime(store=store(), shutdown_grace=float(os.environ.get("BGTASKS_TEST_GRACE", "1")))


#: What ``bgtasks worker pg_apps:worker`` runs.
worker = worker_runtime


# ---------------------------------------------------------------------- a web host
@background(durable=True, name="pg_apps.hold_endpoint")
async def hold_endpoint(mark: str, hang_runs: int) -> int:
    return await _hold(mark, hang_runs)


def web_app() -> Any:
    """A FastAPI app that only enqueues (``consume=False``), as a web host would:
    ``uvicorn pg_apps:app``."""
    from fastapi import FastAPI

    from bgtasks.asgi import BackgroundMiddleware

    runtime = Runtime(store=store(), consume=False, shutdown_grace=1)
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=runtime)

    @app.get("/_ready")
    async def ready() -> dict[str, bool]:
        return {"started": runtime.started}

    app.add_api_route("/hold", hold_endpoint, methods=["POST"])
    return app


app = web_app()
