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

from bgtasks import Runtime, background
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
    path = Path(os.environ["BGTASKS_TEST_MARKS"]) / mark
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    runs = len(path.read_text().splitlines())
    if runs <= hang_runs:
        await asyncio.Event().wait()
    return runs


def worker_runtime() -> Runtime:
    return Runtime(store=store(), shutdown_grace=float(os.environ.get("BGTASKS_TEST_GRACE", "1")))


#: What ``bgtasks worker pg_apps:worker`` runs.
worker = worker_runtime
