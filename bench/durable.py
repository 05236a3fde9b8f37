"""Durable store benchmark: admission rate (calls journaled per second) and
end-to-end rate (calls journaled, run and recorded as finished, per second).

    .venv/bin/python bench/durable.py [--tasks 5000] [--threads 16] [--db PATH]

Callers are concurrent, as in a server: ``--threads`` worker threads calling a
sync-style ``fn.submit(...)`` (a Flask view, a sync FastAPI endpoint), and as
many coroutines on the event loop awaiting the journal write (an async FastAPI
endpoint). A call counts as admitted when it returns: its row is committed.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextvars
import logging
import os
import sys
import tempfile
import time

# BENCH_BGTASKS_SRC=DIR measures the bgtasks package in DIR (another checkout,
# e.g. an older commit) with this script, for a before/after of the same bench.
if os.environ.get("BENCH_BGTASKS_SRC"):
    sys.path.insert(0, os.environ["BENCH_BGTASKS_SRC"])

import bgtasks

gate: asyncio.Event | None = None


@bgtasks.background(durable=True)
async def job(n: int, label: str) -> int:
    if gate is not None:
        await gate.wait()
    return n


async def admit_from_threads(total: int, threads: int) -> float:
    """Seconds for ``threads`` threads to journal ``total`` calls."""
    per = total // threads
    loop = asyncio.get_running_loop()

    def caller(k: int) -> None:
        for i in range(per):
            job.submit(k * per + i, "thread")

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        # Each thread sees the active runtime, as a request's thread does.
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, contextvars.copy_context().run, caller, k)
                for k in range(threads)
            )
        )
        return time.perf_counter() - t0


async def admit_from_coroutines(total: int, concurrency: int) -> float:
    """Seconds for ``concurrency`` coroutines to journal ``total`` calls, awaiting each."""
    per = total // concurrency
    opts = job.__bgtasks__  # type: ignore[attr-defined]

    async def caller(k: int) -> None:
        for i in range(per):
            await opts.schedule_async((k * per + i, "async"), {}, limits=None, idempotency_key=None)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return time.perf_counter() - t0


async def run(store: str, tasks: int, threads: int) -> dict[str, float]:
    global gate
    out: dict[str, float] = {}
    gate = asyncio.Event()  # admission alone: nothing runs yet
    async with bgtasks.Runtime(store=store, max_pending=None, shutdown_grace=60) as rt:
        out["admit_threads"] = tasks / await admit_from_threads(tasks, threads)
        out["admit_async"] = tasks / await admit_from_coroutines(tasks, threads)
        gate.set()
        assert await rt.drain(120)
    gate = None  # end to end: admitted, run, recorded
    async with bgtasks.Runtime(store=store, max_pending=None, shutdown_grace=60) as rt:
        t0 = time.perf_counter()
        await admit_from_threads(tasks, threads)
        assert await rt.drain(120)
        store_obj = rt.store
        flush = getattr(store_obj, "flush", None)
        if flush is not None:
            await flush()
        out["end_to_end"] = tasks / (time.perf_counter() - t0)
        assert rt.stats()["succeeded"] == tasks, rt.stats()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--db", default=None, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    args.tasks -= args.tasks % args.threads  # the same share for every caller
    logging.getLogger("bgtasks").setLevel(logging.ERROR)  # durable on memory warns
    print(f"bgtasks from {os.path.dirname(bgtasks.__file__)}")
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or os.path.join(tmp, "bench.db")
        for label, store in (("memory", "memory"), ("sqlite", f"sqlite:///{db}")):
            rates = asyncio.run(run(store, args.tasks, args.threads))
            print(
                f"{label:7} admissions/s: {rates['admit_threads']:8.0f} from {args.threads} "
                f"threads, {rates['admit_async']:8.0f} from {args.threads} coroutines; "
                f"end-to-end/s: {rates['end_to_end']:8.0f}"
            )


if __name__ == "__main__":
    main()
