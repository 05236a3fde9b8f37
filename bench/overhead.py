"""Cost of ``wait_until`` against ``asyncio.create_task`` + a done-callback.

    python bench/overhead.py            # 10k and 100k tasks, 3 rounds, medians
    python bench/overhead.py --rounds 5 # the figures in docs/benchmarks.md
    python bench/overhead.py --quick    # smaller, for a smoke run
    python bench/overhead.py --instrumented --rounds 9   # the instrumentation figures

Each round measures the baseline and bgtasks back to back in the same
process, so the ratios hold on a noisy machine even when the absolute
figures do not. Printed: µs per task (submit + run + finish), the ratio,
memory per pending task, and the cost of limit enforcement on tasks that
stay within their budget. "floor" is the ratio of ``floor()`` below: the
least any design with a handle, a wrapper coroutine and a current-task
context variable per task costs, written in plain asyncio. Then the cost of
instrumentation (``bgtasks.prometheus``, ``bgtasks.otel`` with the
OpenTelemetry SDK recording every span, and both) against the same runtime
uninstrumented, in the same rounds, with ``--instrumented`` (skipped when the
extras are missing).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where http.py
# would hide the standard library's ``http`` package (prometheus-client needs it).
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

# BENCH_BGTASKS_SRC=DIR measures the bgtasks package in DIR (another checkout,
# e.g. an older commit) with this script, for a before/after of the same bench.
if os.environ.get("BENCH_BGTASKS_SRC"):
    sys.path.insert(0, os.environ["BENCH_BGTASKS_SRC"])

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextvars  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable, Coroutine  # noqa: E402
from typing import Any  # noqa: E402

import bgtasks  # noqa: E402
from bgtasks import Limits, Runtime  # noqa: E402
from bgtasks._ids import new_id  # noqa: E402


async def noop() -> None:
    pass


async def small_work() -> int:
    # A task that does a little: a few awaits and some arithmetic.
    total = 0
    for i in range(3):
        await asyncio.sleep(0)
        total += sum(range(50)) + i
    return total


PAYLOAD = {f"key{i}": {"n": i, "tags": ["a", "b", "c"], "ok": True} for i in range(60)}


async def typical_work() -> int:
    # Closer to real background work: each step does ~100 us of Python
    # (building and encoding a small JSON document) between awaits.
    size = 0
    for _ in range(3):
        await asyncio.sleep(0)
        size += len(json.dumps(PAYLOAD))
    return size


async def baseline(n: int, make: Callable[[], Coroutine[Any, Any, Any]]) -> float:
    loop = asyncio.get_running_loop()
    done = 0
    finished = loop.create_future()
    keep: set[asyncio.Task[Any]] = set()

    def on_done(task: asyncio.Task[Any]) -> None:
        nonlocal done
        keep.discard(task)
        done += 1
        if done == n:
            finished.set_result(None)

    t0 = time.perf_counter()
    for _ in range(n):
        task = loop.create_task(make())
        keep.add(task)
        task.add_done_callback(on_done)
    await finished
    return (time.perf_counter() - t0) / n


class _Handle:
    # What any design that returns a handle per task keeps for it, at least.
    __slots__ = ("id", "result", "status", "task")

    def __init__(self, task_id: str) -> None:
        self.id = task_id
        self.status = "pending"
        self.result: Any = None
        self.task: asyncio.Task[None] | None = None  # the strong reference


_current: contextvars.ContextVar[_Handle | None] = contextvars.ContextVar("current", default=None)


async def floor(n: int, make: Callable[[], Coroutine[Any, Any, Any]]) -> float:
    """The structural floor of a wait_until: a handle per task with an id of
    144 random bits (from bgtasks' own batched generator), a wrapper coroutine
    that sets a current-task context variable (so code in the task, and
    subtasks it starts, can find the task) and records the outcome, and a
    registry entry. No timestamps, admission, retention or drain bookkeeping.
    bgtasks cannot cost less than this without dropping one of those."""
    loop = asyncio.get_running_loop()
    registry: dict[str, _Handle] = {}
    left = n
    finished = loop.create_future()

    async def run(h: _Handle, coro: Coroutine[Any, Any, Any]) -> None:
        nonlocal left
        _current.set(h)
        h.status = "running"
        h.result = await coro
        h.status = "succeeded"
        h.task = None
        del registry[h.id]
        left -= 1
        if not left:
            finished.set_result(None)

    t0 = time.perf_counter()
    for _ in range(n):
        h = _Handle(new_id())
        registry[h.id] = h
        h.task = loop.create_task(run(h, make()))
    await finished
    return (time.perf_counter() - t0) / n


async def with_bgtasks(
    n: int,
    make: Callable[[], Coroutine[Any, Any, Any]],
    limits: Limits | None,
    instrument: Callable[[Runtime], Any] | None = None,
) -> float:
    # A fresh runtime per round (default settings but max_pending), so rounds do
    # not pay for the finished records of earlier ones.
    async with Runtime(max_pending=None) as rt:
        if instrument is not None:
            instrument(rt)
        t0 = time.perf_counter()
        wait_until = rt.wait_until
        if limits is None:
            for _ in range(n):
                wait_until(make())
        else:
            for _ in range(n):
                wait_until(make(), limits=limits)
        await rt.drain()
        return (time.perf_counter() - t0) / n


async def pending_memory(n: int, use_bgtasks: bool) -> float:
    """Bytes allocated per task while ``n`` tasks wait on one event."""
    gate = asyncio.Event()

    async def waiter() -> None:
        await gate.wait()

    rt = Runtime(max_pending=None, retention=0)
    async with rt:
        loop = asyncio.get_running_loop()
        keep: set[asyncio.Task[None]] = set()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        if use_bgtasks:
            for _ in range(n):
                rt.wait_until(waiter())
        else:
            for _ in range(n):
                task = loop.create_task(waiter())
                keep.add(task)
                task.add_done_callback(keep.discard)
        await asyncio.sleep(0)  # let every task start and park on the event
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        gate.set()
        await rt.drain()
        await asyncio.sleep(0)
    return (after - before) / n


def instrumentations() -> dict[str, Callable[[Runtime], Any]]:
    """The ways to instrument a runtime, by label (those whose extra is installed)."""
    found: dict[str, Callable[[Runtime], Any]] = {}
    try:
        from prometheus_client import CollectorRegistry

        import bgtasks.prometheus
    except ImportError:
        print("(prometheus-client is not installed: no prometheus figures)")
    else:
        # A fresh registry per round: each round's runtime has metrics of its own.
        found["prometheus"] = lambda rt: bgtasks.prometheus.instrument(rt, CollectorRegistry())
    try:
        from opentelemetry.sdk.trace import TracerProvider

        import bgtasks.otel
    except ImportError:
        print("(opentelemetry-sdk is not installed: no otel figures)")
    else:
        # Every span sampled, built and ended; no exporter, so no I/O is measured.
        provider = TracerProvider()
        found["otel (SDK)"] = lambda rt: bgtasks.otel.instrument(rt, tracer_provider=provider)
    if len(found) == 2:
        prom, otel = found["prometheus"], found["otel (SDK)"]
        found["both"] = lambda rt: (prom(rt), otel(rt))
    return found


async def instrumented(n: int, rounds: int) -> None:
    ways = instrumentations()
    if not ways:
        return
    for label, work in (("no-op", noop), ("typical steps", typical_work)):
        off: list[float] = []
        on: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            gc.collect()
            off.append(await with_bgtasks(n, work, None))
            for way, instrument in ways.items():
                gc.collect()
                on[way].append(await with_bgtasks(n, work, None, instrument))
        o = statistics.median(off)
        figures = "   ".join(
            f"{way} {statistics.median(v) * 1e6:6.2f} us ({statistics.median(v) / o:.2f}x)"
            for way, v in on.items()
        )
        print(f"instrumented, {label} tasks, n={n}: off {o * 1e6:6.2f} us/task   {figures}")


async def main(sizes: list[int], rounds: int) -> None:
    print(f"python {sys.version.split()[0]}, bgtasks {bgtasks.__version__}, rounds={rounds}")
    print(f"bgtasks from {os.path.dirname(bgtasks.__file__)}")
    for n in sizes:
        base, least, ours = [], [], []
        for _ in range(rounds):
            gc.collect()
            base.append(await baseline(n, noop))
            gc.collect()
            least.append(await floor(n, noop))
            gc.collect()
            ours.append(await with_bgtasks(n, noop, None))
        b, f, o = statistics.median(base), statistics.median(least), statistics.median(ours)
        # wait_until against the floor, round by round (the two ran back to back).
        over_floor = statistics.median(x / y for x, y in zip(ours, least, strict=True))
        print(
            f"n={n:>7}: create_task+callback {b * 1e6:6.2f} us/task   "
            f"wait_until {o * 1e6:6.2f} us/task   ratio {o / b:.2f}x   "
            f"(floor {f / b:.2f}x; wait_until / floor {over_floor:.2f}x)"
        )

    n = sizes[0]
    budget = Limits(wall_clock=60, cpu_time=60)
    for label, work in (("tiny steps (~5 us)", small_work), ("typical steps", typical_work)):
        plain, limited = [], []
        for _ in range(rounds):
            gc.collect()
            plain.append(await with_bgtasks(n, work, None))
            gc.collect()
            limited.append(await with_bgtasks(n, work, budget))
        p, lim = statistics.median(plain), statistics.median(limited)
        paired = statistics.median(x / y for x, y in zip(limited, plain, strict=True))
        print(
            f"limits, {label}, n={n}: none {p * 1e6:6.2f} us/task   "
            f"wall_clock+cpu_time {lim * 1e6:6.2f} us/task   "
            f"overhead {100 * (lim / p - 1):+.1f}% (paired by round {100 * (paired - 1):+.1f}%; "
            f"{(lim - p) * 1e6 / 4:.2f} us per step)"
        )

    big = sizes[-1]
    base_mem = await pending_memory(big, use_bgtasks=False)
    our_mem = await pending_memory(big, use_bgtasks=True)
    print(
        f"memory, {big} pending tasks: create_task {base_mem:.0f} B/task   "
        f"wait_until {our_mem:.0f} B/task   (+{our_mem - base_mem:.0f} B for bgtasks)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k tasks, 3 rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--instrumented", action="store_true", help="instrumentation against none, 10k tasks"
    )
    args = parser.parse_args()
    if args.instrumented:
        asyncio.run(instrumented(10_000, args.rounds))
    elif args.quick:
        asyncio.run(main([1_000, 10_000], 3))
    else:
        asyncio.run(main([10_000, 100_000], args.rounds))
