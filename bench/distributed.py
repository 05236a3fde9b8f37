"""Many hosts (issue 13): durable tasks run by 1 and then 2 ``bgtasks worker``
processes on a throwaway PostgreSQL, and durable admissions per second.

    .venv/bin/python bench/distributed.py [--tasks 2000] [--rounds 1] [--concurrency 10]

Starts a PostgreSQL server (tests/pgserver.py: initdb in a temporary
directory, 127.0.0.1, a free port, fsync off), and per measurement a fresh
database prepared with ``bgtasks migrate``. Then, for each kind of task:

- CPU-bound: a 2 ms busy loop on the worker's event loop;
- I/O-bound: ``await asyncio.sleep(0.05)``;

this process (a web host: ``Runtime(consume=False)``) commits ``--tasks``
durable calls, from 16 coroutines for one measurement and from 16 threads for
the next (the admission rate: calls committed per second), with no worker
running; then 1 or 2 ``bgtasks worker`` processes start and run them all.
Tasks/s = tasks / (last ``finished_at`` - first ``started_at``), read from the
records, so worker start-up is not counted. Prints the median over rounds of
each figure and the ratios 2 workers / 1.

Targets (issue 13, on a 2-core machine where the database shares the cores):
CPU-bound >= 1.4x, I/O-bound >= 1.8x, admissions >= 2,000/s.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextvars
import importlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import bgtasks
from bgtasks.stores.postgres import PostgresStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
URL_ENV = "BENCH_PG_URL"
CALLERS = 16


@bgtasks.background(durable=True)
async def cpu_task(n: int) -> int:
    """A 2 ms busy loop that never yields."""
    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        pass
    return n


@bgtasks.background(durable=True)
async def io_task(n: int) -> int:
    """50 ms of waiting, as on a slow service."""
    await asyncio.sleep(0.05)
    return n


def worker_runtime() -> bgtasks.Runtime:
    """What ``bgtasks worker distributed:worker_runtime`` runs (the store's
    ``concurrency`` comes from ``--concurrency``)."""
    return bgtasks.Runtime(store=PostgresStore(os.environ[URL_ENV]), shutdown_grace=2)


def _tasks_module() -> ModuleType:
    """This file under the name workers import it by (``distributed``): a durable
    call records its function's module, and ``__main__`` is not importable there."""
    if __name__ != "__main__":
        return sys.modules[__name__]
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module("distributed")


# ---------------------------------------------------------------------- admissions
async def admit_coroutines(fn: Any, total: int) -> float:
    """Seconds for CALLERS coroutines to commit ``total`` durable calls."""
    per = total // CALLERS

    async def caller(k: int) -> None:
        for i in range(per):
            await fn.submit_async(k * per + i)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    return time.perf_counter() - t0


async def admit_threads(fn: Any, total: int) -> float:
    """Seconds for CALLERS threads (as in a WSGI server) to commit ``total`` calls."""
    per = total // CALLERS
    loop = asyncio.get_running_loop()

    def caller(k: int) -> None:
        for i in range(per):
            fn.submit(k * per + i)

    with concurrent.futures.ThreadPoolExecutor(CALLERS) as pool:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, contextvars.copy_context().run, caller, k)
                for k in range(CALLERS)
            )
        )
        return time.perf_counter() - t0


async def enqueue(url: str, fn: Any, total: int, how: str) -> float:
    """Commit ``total`` calls from a host that does not consume; admissions/s."""
    store = PostgresStore(url, pool_size=CALLERS)
    async with bgtasks.Runtime(store=store, consume=False, max_pending=None):
        admit = admit_coroutines if how == "coroutines" else admit_threads
        seconds = await admit(fn, total)
    return (total // CALLERS * CALLERS) / seconds


# ---------------------------------------------------------------------- workers
def _env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env[URL_ENV] = url
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def migrate(url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "bgtasks", "migrate", "distributed:worker_runtime"],
        cwd=HERE,
        env=_env(url),
        check=True,
        capture_output=True,
        timeout=120,
    )


def counts(url: str) -> tuple[int, int, float | None, float | None]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
            "count(*) FILTER (WHERE status IN ('failed', 'cancelled')), "
            "min(started_at), max(finished_at) FROM bgtasks_tasks"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), row[2], row[3]


def run_workers(url: str, workers: int, total: int, concurrency: int) -> float:
    """Start ``workers`` processes, wait until every task is done; tasks/s."""
    argv = [
        sys.executable,
        "-m",
        "bgtasks",
        "worker",
        "distributed:worker_runtime",
        "--concurrency",
        str(concurrency),
        "--log-level",
        "WARNING",
    ]
    procs = [
        subprocess.Popen(argv, cwd=HERE, env=_env(url), stdout=subprocess.DEVNULL)
        for _ in range(workers)
    ]
    deadline = time.monotonic() + max(120.0, total / 10)
    try:
        while True:
            done, bad, first, last = counts(url)
            if done + bad >= total:
                break
            dead = [p.returncode for p in procs if p.poll() is not None]
            if dead:
                msg = f"a worker exited ({dead}) with {done}/{total} tasks done"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                msg = f"only {done}/{total} tasks done before the deadline"
                raise RuntimeError(msg)
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    if bad:
        msg = f"{bad} of {total} tasks failed or were cancelled"
        raise RuntimeError(msg)
    assert first is not None and last is not None
    return total / (last - first)


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (medians printed)")
    parser.add_argument("--concurrency", type=int, default=10, help="jobs per worker")
    args = parser.parse_args()
    if args.tasks < CALLERS:
        parser.error(f"--tasks must be >= {CALLERS}")

    sys.path.insert(0, str(ROOT / "tests"))
    from pgserver import PgServer

    mod = _tasks_module()
    kinds = {"cpu": mod.cpu_task, "io": mod.io_task}
    rates: dict[tuple[str, int], list[float]] = {}
    admissions: dict[str, list[float]] = {"coroutines": [], "threads": []}
    print(
        f"{args.tasks} durable tasks per measurement, {args.rounds} round(s), "
        f"--concurrency {args.concurrency}, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with PgServer() as pg:
        n = 0
        for r in range(args.rounds):
            for kind, fn in kinds.items():
                for workers in (1, 2):
                    n += 1
                    url = pg.create_database(f"bench{n}")
                    migrate(url)
                    how = "coroutines" if workers == 1 else "threads"
                    admitted = asyncio.run(enqueue(url, fn, args.tasks, how))
                    admissions[how].append(admitted)
                    rate = run_workers(
                        url, workers, args.tasks // CALLERS * CALLERS, args.concurrency
                    )
                    rates.setdefault((kind, workers), []).append(rate)
                    print(
                        f"  round {r + 1} {kind:3} {workers} worker(s): {rate:7.1f} tasks/s; "
                        f"admitted {admitted:6.0f}/s from {CALLERS} {how}",
                        flush=True,
                    )

    med = {key: statistics.median(v) for key, v in rates.items()}
    print("\nmedians:")
    targets = {"cpu": 1.4, "io": 1.8}
    for kind, label in (("cpu", "CPU-bound (2 ms busy loop)"), ("io", "I/O-bound (50 ms sleep)")):
        one, two = med[(kind, 1)], med[(kind, 2)]
        ratio = two / one
        verdict = "met" if ratio >= targets[kind] else "NOT met"
        print(
            f"  {label:28} 1 worker {one:7.1f}/s, 2 workers {two:7.1f}/s: "
            f"{ratio:.2f}x (target >= {targets[kind]}x: {verdict})"
        )
    for how, values in admissions.items():
        value = statistics.median(values)
        verdict = "met" if value >= 2000 else "NOT met"
        print(
            f"  admissions from {CALLERS} {how:10} {value:7.0f}/s "
            f"(range {min(values):.0f}-{max(values):.0f}; target >= 2,000/s: {verdict})"
        )


if __name__ == "__main__":
    main()
