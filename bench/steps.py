"""Steps: what ``step.run`` costs, durable steps per second, parked tasks' memory.

    .venv/bin/python bench/steps.py                 # all three parts (under a minute)
    .venv/bin/python bench/steps.py --rounds 7 --only cost
    .venv/bin/python bench/steps.py --only durable --durable-rounds 5
    .venv/bin/python bench/steps.py --only parked --parked 10000 --parked-rounds 3

Every part measures its baseline in the same run, interleaved round by round,
and prints medians and ratios (the median of the per-round ratios):

- ``cost``: tasks of ``K`` steps ``await step.run("x", noop)`` around an async
  no-op, against tasks of ``K`` plain ``await noop()``, and against a task
  ``wait_until(noop())`` on its own. The cost of a step is the difference per
  step; the target is a step <= 2x a ``wait_until`` task.
- ``durable``: 16 concurrent ``@background(durable=True)`` tasks on SQLite,
  each running steps one after another (every step's result is committed
  before the step returns); steps committed per second (from the first
  step's start to the last step's end), with 20 and with 100 steps per
  task (the cost of a step grows with the steps before it), against durable
  journal writes (admissions) per second from 16 coroutines in the same
  round. Target: >= 2,000 steps/s.
- ``parked``: ``--parked`` durable tasks that each reached
  ``await step.sleep("nap", 3600)``: they are parked (only their rows remain;
  ``rt.handle(id)`` is None). The process's RSS and Python heap (tracemalloc)
  before and after, per task, against as many non-durable tasks asleep in the
  same step in memory. Each figure comes from a fresh child process (RSS
  without tracemalloc running, the heap with it).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)  # this folder's http.py would hide the stdlib's

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable, Coroutine  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

import bgtasks  # noqa: E402
from bgtasks import Runtime, step  # noqa: E402


async def noop() -> None:
    pass


# ------------------------------------------------------------------ cost


def plain_task(k: int) -> Callable[[], Coroutine[Any, Any, None]]:
    async def plain() -> None:
        for _ in range(k):
            await noop()

    return plain


def step_task(k: int) -> Callable[[], Coroutine[Any, Any, None]]:
    async def steps() -> None:
        for _ in range(k):
            await step.run("x", noop)  # the k-th is the step "x#k"

    return steps


async def per_task(n: int, make: Callable[[], Coroutine[Any, Any, Any]]) -> float:
    """Seconds per task for ``n`` tasks of ``make`` through ``wait_until``, to the last."""
    async with Runtime(max_pending=None) as rt:
        wait_until = rt.wait_until
        t0 = time.perf_counter()
        for _ in range(n):
            wait_until(make())
        await rt.drain()
        return (time.perf_counter() - t0) / n


async def cost(n: int, k: int, rounds: int) -> dict[str, float]:
    bare, plain, steps = [], [], []
    for _ in range(rounds):
        gc.collect()
        bare.append(await per_task(n, noop))
        gc.collect()
        plain.append(await per_task(n, plain_task(k)))
        gc.collect()
        steps.append(await per_task(n, step_task(k)))
    per_step = [(s - p) / k for s, p in zip(steps, plain, strict=True)]
    out = {
        "wait_until_us": statistics.median(bare) * 1e6,
        "plain_us": statistics.median(plain) * 1e6,
        "steps_us": statistics.median(steps) * 1e6,
        "step_us": statistics.median(per_step) * 1e6,
        "step_over_task": statistics.median(s / b for s, b in zip(per_step, bare, strict=True)),
        "steps_over_plain": statistics.median(s / p for s, p in zip(steps, plain, strict=True)),
    }
    print(
        f"cost, n={n} tasks, {k} steps each, {rounds} rounds (medians):\n"
        f"  wait_until(noop()) task          {out['wait_until_us']:8.2f} us/task\n"
        f"  task of {k:2} x await noop()        {out['plain_us']:8.2f} us/task\n"
        f"  task of {k:2} x step.run('x', noop) {out['steps_us']:8.2f} us/task "
        f"({out['steps_over_plain']:.2f}x the plain task)\n"
        f"  one step, over a plain await     {out['step_us']:8.2f} us = "
        f"{out['step_over_task']:.2f}x a wait_until task  (target <= 2.00x)"
    )
    return out


# ------------------------------------------------------------------ durable

gate: asyncio.Event | None = None


span: list[float] = []  # when steps began and ended (perf_counter), of all stepper tasks


@bgtasks.background(durable=True)
async def stepper(k: int) -> int:
    span.append(time.perf_counter())
    for _ in range(k):
        await step.run("s", noop)
    span.append(time.perf_counter())
    return k


@bgtasks.background(durable=True)
async def journaled(i: int) -> int:
    if gate is not None:
        await gate.wait()
    return i


async def durable_round(db: str, callers: int, k: int, admissions: int) -> tuple[float, float]:
    """(steps/s, admissions/s) on a fresh SQLite file."""
    global gate
    gate = asyncio.Event()  # admissions alone: nothing runs until they are counted
    async with Runtime(store=f"sqlite:///{db}", max_pending=None, shutdown_grace=60) as rt:
        per = admissions // callers

        async def admit() -> None:
            for i in range(per):
                await journaled.submit_async(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(admit() for _ in range(callers)))
        admit_rate = per * callers / (time.perf_counter() - t0)
        gate.set()
        assert await rt.drain(120)
        gate = None

        span.clear()
        handles = await asyncio.gather(*(stepper.submit_async(k) for _ in range(callers)))
        assert await rt.drain(120)
        # From the first step's start to the last step's commit: the tasks'
        # admission and their final records are not counted.
        step_rate = callers * k / (max(span) - min(span))
        bad = [h.id for h in handles if (r := rt.get(h.id)) is None or r.status != "succeeded"]
        assert not bad, f"tasks did not succeed: {bad[:3]}"
    return step_rate, admit_rate


async def durable(callers: int, ks: list[int], admissions: int, rounds: int) -> dict[int, float]:
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            steps, admits = [], []
            for r in range(rounds):
                db = os.path.join(tmp, f"steps{k}-{r}.db")
                s, a = await durable_round(db, callers, k, admissions)
                steps.append(s)
                admits.append(a)
            out[k] = statistics.median(steps)
            ratio = statistics.median(s / a for s, a in zip(steps, admits, strict=True))
            print(
                f"durable steps on SQLite, {callers} concurrent tasks x {k} steps, "
                f"{rounds} rounds:\n"
                f"  steps committed/s     {out[k]:8.0f}  (target >= 2,000/s)   "
                f"all: {', '.join(f'{s:.0f}' for s in steps)}\n"
                f"  journal admissions/s  {statistics.median(admits):8.0f}  ({callers} coroutines, "
                f"{admissions} calls)   all: {', '.join(f'{a:.0f}' for a in admits)}\n"
                f"  steps/s / admissions/s  {ratio:.2f}x"
            )
    return out


# ------------------------------------------------------------------ parked


@bgtasks.background(durable=True)
async def napper(i: int) -> None:
    await step.sleep("nap", 3600)


dozing = 0


@bgtasks.background
async def dozer(i: int) -> None:
    global dozing
    dozing += 1
    await step.sleep("nap", 3600)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


async def _parked_child(kind: str, n: int, db: str, heap: bool) -> None:
    """In a fresh process: ``n`` tasks asleep in ``step.sleep``; prints the memory
    before and after as JSON, and exits."""
    callers = 16
    async with Runtime(store=f"sqlite:///{db}", max_pending=None) as rt:

        async def submit(i: int) -> str:
            if kind == "parked":
                return (await napper.submit_async(i)).id
            return dozer.submit(i).id

        async def asleep(ids: list[str], dozers: int) -> None:
            """Until the tasks ``ids`` are parked (durable) or ``dozers`` are asleep."""
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if kind == "parked":
                    if all(rt.handle(i) is None for i in ids):
                        return
                elif dozing >= dozers:
                    await asyncio.sleep(0.05)  # every dozer is in its asyncio.sleep
                    return
                await asyncio.sleep(0.05)
            raise SystemExit(f"{kind}: the tasks were not all asleep within 300 s")

        await asleep([await submit(-1)], 1)  # warm-up: every code path has run once
        gc.collect()
        if heap:
            tracemalloc.start()
        rss0, heap0 = _rss(), tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        ids: list[str] = []

        async def caller(k: int) -> None:
            for i in range(k, n, callers):
                ids.append(await submit(i))

        await asyncio.gather(*(caller(k) for k in range(callers)))
        await asleep(ids, n + 1)
        took = time.perf_counter() - t0
        gc.collect()
        rss1, heap1 = _rss(), tracemalloc.get_traced_memory()[0]
        live = sum(rt.handle(i) is not None for i in ids)
        result = {
            "rss": (rss1 - rss0) / n,
            "heap": (heap1 - heap0) / n,
            "rss_before": rss0,
            "rss_after": rss1,
            "heap_before": heap0,
            "heap_after": heap1,
            "live_handles": live,
            "seconds": took,
        }
        print(json.dumps(result), flush=True)
        os._exit(0)  # now, inside the runtime: no shutdown of 10,000 sleeping tasks


def _child(kind: str, n: int, heap: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, os.path.abspath(__file__), "--child", kind, "--parked", str(n)]
        argv += ["--db", os.path.join(tmp, "parked.db")] + (["--heap"] if heap else [])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"child {kind} failed:\n{out.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def parked(n: int, rounds: int) -> dict[str, float]:
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for kind in ("parked", "asleep"):
            for heap in (False, True):
                runs.setdefault((kind, heap), []).append(_child(kind, n, heap))

    def med(kind: str, heap: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[(kind, heap)])

    out = {
        "parked_rss": med("parked", False, "rss"),
        "parked_heap": med("parked", True, "heap"),
        "asleep_rss": med("asleep", False, "rss"),
        "asleep_heap": med("asleep", True, "heap"),
        "parked_live": max(r["live_handles"] for r in runs[("parked", False)]),
    }
    p0, p1 = med("parked", False, "rss_before"), med("parked", False, "rss_after")
    h0, h1 = med("parked", True, "heap_before"), med("parked", True, "heap_after")
    print(
        f"parked, {n} durable tasks in step.sleep('nap', 3600) on SQLite, {rounds} rounds "
        f"(a fresh process each; medians):\n"
        f"  process RSS   {p0 / 2**20:7.1f} MiB before, {p1 / 2**20:7.1f} MiB after: "
        f"{out['parked_rss']:7.0f} B/task   (asleep in memory: {out['asleep_rss']:7.0f} B/task)\n"
        f"  Python heap   +{(h1 - h0) / 2**20:6.1f} MiB (tracemalloc, from before): "
        f"{out['parked_heap']:7.0f} B/task   (asleep in memory: {out['asleep_heap']:7.0f} B/task)\n"
        f"  parked / asleep in memory: RSS {out['parked_rss'] / out['asleep_rss']:.2f}x, "
        f"heap {out['parked_heap'] / out['asleep_heap']:.2f}x\n"
        f"  live handles of parked tasks (rt.handle(id) is not None): {out['parked_live']:.0f}"
        f" of {n}   seconds to park them all: "
        f"{statistics.median(r['seconds'] for r in runs[('parked', False)]):.1f}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("cost", "durable", "parked"), default=None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the cost part")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per round (cost)")
    parser.add_argument("--steps", type=int, default=10, help="steps per task (cost)")
    parser.add_argument("--durable-rounds", type=int, default=3)
    parser.add_argument(
        "--durable-steps",
        type=int,
        nargs="+",
        default=[20, 100],
        help="steps per durable task (one measurement for each)",
    )
    parser.add_argument("--parked", type=int, default=10_000, help="parked tasks")
    parser.add_argument("--parked-rounds", type=int, default=1)
    parser.add_argument("--child", choices=("parked", "asleep"), help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--heap", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("bgtasks").setLevel(logging.ERROR)
    if args.child:
        asyncio.run(_parked_child(args.child, args.parked, args.db, args.heap))
        return print(
            f"python {sys.version.split()[0]}, bgtasks from {os.path.dirname(bgtasks.__file__)}"
        )
    if args.only in (None, "cost"):
        asyncio.run(cost(args.tasks, args.steps, args.rounds))
    if args.only in (None, "durable"):
        asyncio.run(durable(16, args.durable_steps, 1600, args.durable_rounds))
    if args.only in (None, "parked"):
        parked(args.parked, args.parked_rounds)


if __name__ == "__main__":
    main()
