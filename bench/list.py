"""Task list benchmark: a page of 50 from 100,000 records, memory registry and SQLite.

    .venv/bin/python bench/list.py [--tasks 100000] [--repeat 50] [--db PATH]

Fills a runtime with ``--tasks`` finished tasks (five names, every fifth one
failed) by running them, then times what the dashboard's API does for one
request, in-process (no HTTP): the first page, a page from a cursor half way
down, a page filtered by status, by name and by a status no task has, and the
counts (``/api/stats``). Each figure is the median of ``--repeat`` calls.

The memory runtime lists its own registry; the SQLite runtime asks the store
(``store.list``, ``store.stats``), which has every process's records.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import bgtasks
from bgtasks._dashboard import DashboardRoutes
from bgtasks._listing import list_tasks, parse_list_query, stats_payload

NAMES = ("send-email", "resize-image", "build-report", "sync-crm", "charge-card")


async def ok() -> None:
    pass


async def fail() -> None:
    raise RuntimeError("no")


async def fill(rt: bgtasks.Runtime, total: int) -> float:
    started = time.perf_counter()
    batch = 5_000
    for first in range(0, total, batch):
        handles = [
            rt.wait_until(fail() if i % 5 == 4 else ok(), name=NAMES[i % 5])
            for i in range(first, min(total, first + batch))
        ]
        await asyncio.gather(*(h.wait() for h in handles))
    return time.perf_counter() - started


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(rt: bgtasks.Runtime, repeat: int) -> dict[str, float]:
    def page(**params: list[str]) -> Callable[[], object]:
        query = parse_list_query(params)
        return lambda: list_tasks(rt, query)

    first, _ = list_tasks(rt, parse_list_query({}))
    cursor = first.next_cursor
    assert cursor is not None and len(first.items) == 50
    # Walk to the middle once, to time a page from a deep cursor.
    walked = 50
    while walked < len(rt._registry) // 2 and cursor is not None:
        found, _ = list_tasks(rt, parse_list_query({"cursor": [cursor]}))
        cursor = found.next_cursor
        walked += len(found.items)
    assert cursor is not None
    board = DashboardRoutes(lambda r: True)
    return {
        "first page": median_ms(page(), repeat),
        "page from a cursor half way": median_ms(page(cursor=[cursor]), repeat),
        "status=failed": median_ms(page(status=["failed"]), repeat),
        "name=sync-crm": median_ms(page(name=["sync-crm"]), repeat),
        "status=pending (none)": median_ms(page(status=["pending"]), repeat),
        "stats": median_ms(lambda: stats_payload(rt), repeat),
        "GET /api/tasks (handler + JSON)": median_ms(
            lambda: board.handle(rt, "GET", "/api/tasks", {}, {}), repeat
        ),
    }


async def run(store: str, total: int, repeat: int) -> tuple[float, dict[str, float]]:
    rt = bgtasks.Runtime(store=store, max_pending=None, max_finished=total, retention=86_400)
    rt.on("unhandledrejection", lambda e: e.prevent_default())
    async with rt:
        filled = await fill(rt, total)
        if hasattr(rt.store, "flush"):
            await rt.store.flush()
        return filled, await asyncio.to_thread(measure, rt, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--db", default=None, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or os.path.join(tmp, "tasks.db")
        for label, store in (("memory", "memory"), ("sqlite", f"sqlite:///{db}")):
            filled, figures = asyncio.run(run(store, args.tasks, args.repeat))
            print(f"{label}: {args.tasks} tasks run and recorded in {filled:.1f} s")
            for what, ms in figures.items():
                print(f"  {what:<34} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
