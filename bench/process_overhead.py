"""Latency of one trivial task in a worker process against one in a thread.

    python bench/process_overhead.py            # 2000 calls x 5 rounds
    python bench/process_overhead.py --quick    # 200 calls x 3 rounds

Each call is awaited before the next starts, so the figure is the round trip
of one task: ``ProcessPool.run`` (pickle the call, send it to a warm worker,
run, pickle the result back) against ``asyncio.to_thread`` (hand the call to a
worker thread of this process). Also measured: the same ``ProcessPool.run``
with a CPU and a memory limit (a few extra system calls per task), and the cold
start of a worker (its first task), which a task pays after a worker was
replaced. Printed: medians and 90th percentiles in microseconds, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from bgtasks._process import ProcessPool


def trivial(x: int) -> int:
    return x + 1


async def timed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


async def main(n: int, rounds: int) -> None:
    cold: list[float] = []
    for _ in range(3):
        async with ProcessPool(size=1) as pool:
            start = time.perf_counter()
            await pool.run(trivial, (1,), {}, cpu_time=None, memory=None)
            cold.append((time.perf_counter() - start) * 1e3)

    async with ProcessPool(size=1, max_tasks_per_worker=None) as pool:

        def in_process() -> Awaitable[object]:
            return pool.run(trivial, (1,), {}, cpu_time=None, memory=None)

        def in_process_limited() -> Awaitable[object]:
            return pool.run(trivial, (1,), {}, cpu_time=10.0, memory=256 * 2**20)

        def in_thread() -> Awaitable[object]:
            return asyncio.to_thread(trivial, 1)

        await timed(in_process, 50)  # warm up: the worker, the thread pool, the caches
        await timed(in_thread, 50)
        results: dict[str, list[float]] = {"thread": [], "process": [], "process+limits": []}
        for _ in range(rounds):
            results["thread"] += await timed(in_thread, n)
            results["process"] += await timed(in_process, n)
            results["process+limits"] += await timed(in_process_limited, n)

    base = statistics.median(results["thread"])
    print(f"{n} sequential calls x {rounds} rounds of trivial(x) -> x + 1; microseconds per call")
    print(f"{'':>26} {'median':>9} {'p90':>9} {'x thread':>9}")
    for label, key in (
        ("asyncio.to_thread", "thread"),
        ("ProcessPool.run", "process"),
        ("ProcessPool.run + limits", "process+limits"),
    ):
        values = results[key]
        med = statistics.median(values)
        print(f"{label:>26} {med:9.1f} {pct(values, 90):9.1f} {med / base:9.1f}")
    print(
        f"worker cold start (first task on a new worker): median {statistics.median(cold):.0f} ms "
        f"of {len(cold)}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    ns = parser.parse_args()
    asyncio.run(main(200, 3) if ns.quick else main(2000, 5))
