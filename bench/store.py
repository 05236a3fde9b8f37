"""Store benchmark: listing pages from many records, and kept-step commits.

    .venv/bin/python bench/store.py [--records 100000] [--steps 20000] [--concurrency 16]

- Listing: ``--records`` finished records (5 statuses, 20 names) written
  straight into a SQLite file, then the median time of ``Store.list`` for a
  page of 50: the first page, a page deep in the list (by its cursor), one
  status, one rare status, two statuses, one name; and ``Store.stats()``.
- Claims: the time of one ``Store.claim`` (a look for work to run again, made
  every ``poll`` seconds under the write lock) with ``--parked`` parked tasks
  waiting for their ``wake_at``, among the records above.
- Kept steps: ``--concurrency`` coroutines each awaiting ``Store.keep_step``
  in turn (as 16 durable tasks running steps would), until ``--steps``
  commits; committed steps per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable

from bgtasks.stores import ListQuery
from bgtasks.stores.sqlite import SQLiteStore

STATUSES = ("succeeded",) * 90 + ("failed",) * 8 + ("cancelled",) + ("running",)


def fill(path: str, records: int) -> None:
    store = SQLiteStore(path)
    asyncio.run(_open_close(store))  # creates the schema
    now = time.time() - records
    rows = [
        (
            f"task-{i:07d}",
            f"job-{i % 20}",
            STATUSES[i % len(STATUSES)],
            now + i * 0.5,
            now + i * 0.5 + 0.1,
            now + i * 0.5 + 0.2,
            1,
            '{"ok":true}',
            now,
        )
        for i in range(records)
    ]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executemany(
            "INSERT INTO tasks (id, name, status, created_at, started_at, finished_at, "
            "attempts, result, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.commit()


async def _open_close(store: SQLiteStore) -> None:
    await store.open()
    await store.close()


def median_ms(fn: Callable[[], object], repeat: int = 30) -> float:
    fn()  # warm the page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def listing(path: str, records: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        deep = store.list(ListQuery(limit=500))
        for _ in range(records // 1000):  # about half-way down
            if deep.next_cursor is None:
                break
            deep = store.list(ListQuery(limit=500, cursor=deep.next_cursor))
        cases: dict[str, ListQuery] = {
            "first page": ListQuery(limit=50),
            "deep page (cursor half-way)": ListQuery(limit=50, cursor=deep.next_cursor),
            "status=succeeded": ListQuery(limit=50, statuses=("succeeded",)),
            "status=running (1%)": ListQuery(limit=50, statuses=("running",)),
            "status=failed&status=cancelled": ListQuery(limit=50, statuses=("failed", "cancelled")),
            "name=job-7": ListQuery(limit=50, names=("job-7",)),
            "status=failed&name=job-3": ListQuery(limit=50, statuses=("failed",), names=("job-3",)),
        }
        print(f"list, page of 50 from {records:,} records (median of 30):")
        for label, query in cases.items():
            ms = median_ms(lambda q=query: store.list(q))  # type: ignore[misc]
            print(f"  {label:34s} {ms:7.2f} ms")
        print(f"  {'stats()':34s} {median_ms(store.stats, 5):7.2f} ms")
    finally:
        await store.close()


async def claims(path: str, parked: int) -> None:
    now = time.time()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executemany(
            "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
            "target, payload, options, wake_at) VALUES (?, 'job', 'pending', ?, NULL, ?, 1, "
            "'m:f', '{}', '{}', ?)",
            [(f"parked-{i}", now - i, now, now + 3600) for i in range(parked)],
        )
        conn.commit()
    store = SQLiteStore(path)
    await store.open()
    try:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert await asyncio.wrap_future(store.claim(100)) == []
            times.append(time.perf_counter() - t0)
        print(f"claim with {parked:,} parked tasks: {statistics.median(times) * 1000:.2f} ms")
    finally:
        await store.close()


async def steps(path: str, total: int, concurrency: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    try:
        per = total // concurrency

        async def task(k: int) -> None:
            for i in range(per):
                await asyncio.wrap_future(store.keep_step(f"t{k}", f"step#{i}", '{"v":1}'))

        t0 = time.perf_counter()
        await asyncio.gather(*(task(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
        print(
            f"kept steps: {per * concurrency:,} commits by {concurrency} concurrent tasks in "
            f"{elapsed:.2f}s = {per * concurrency / elapsed:,.0f} steps/s"
        )
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--parked", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "list.db")
        t0 = time.perf_counter()
        fill(path, args.records)
        print(f"wrote {args.records:,} records in {time.perf_counter() - t0:.1f}s")
        asyncio.run(listing(path, args.records))
        asyncio.run(claims(path, args.parked))
        asyncio.run(steps(os.path.join(tmp, "steps.db"), args.steps, args.concurrency))


if __name__ == "__main__":
    main()
