"""Cost of the CPU meter per coroutine step, and of its per-task parts.

    python bench/cpu_meter.py               # clock reads, steps, per-task parts
    python bench/cpu_meter.py --old PATH    # also time another _enforce.py (A/B)

Per step: a coroutine awaiting ``asyncio.sleep(0)`` driven by hand (no event
loop), bare and under the meter (``metered``); then the same inside an event loop with
10 000 concurrent tasks, where the working set is large. Figures are the
minimum (isolated) or median (in a loop) of several rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.util
import resource
import statistics
import sys
import time
import timeit
from types import ModuleType
from typing import Any

from overhead import small_work  # the same task as overhead.py's tiny steps

from bgtasks import _enforce


def _ns(stmt: str, env: dict[str, Any], number: int = 200_000) -> float:
    best = min(timeit.repeat(stmt, number=number, repeat=5, globals=env))
    return best / number * 1e9


def clocks() -> None:
    env = {"time": time, "resource": resource}
    for stmt in (
        "time.thread_time()",
        "time.thread_time_ns()",
        "time.clock_gettime_ns(time.CLOCK_THREAD_CPUTIME_ID)",
        "resource.getrusage(resource.RUSAGE_THREAD)",
        "time.perf_counter()",
    ):
        print(f"  {stmt:55s} {_ns(stmt, env):7.0f} ns")


async def _steps(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _meter(mod: ModuleType) -> Any:
    # ``metered`` now; ``Metered`` in older copies of _enforce.py (for --old).
    return getattr(mod, "metered", None) or mod.Metered


def _drive(aw: Any) -> None:
    it = aw.__await__() if hasattr(aw, "__await__") else aw  # an old-style Metered
    try:
        while True:
            it.send(None)
    except StopIteration:
        pass


def isolated(mod: ModuleType, label: str, steps: int = 20_000) -> float:
    wd = mod.Watchdog()
    wd.watch()
    try:

        def bare() -> None:
            _drive(_steps(steps))

        def meter() -> None:
            _drive(_meter(mod)(_steps(steps), mod.Slot(wd, 1e9)))

        b = min(timeit.repeat(bare, number=1, repeat=7)) / steps
        m = min(timeit.repeat(meter, number=1, repeat=7)) / steps
    finally:
        wd.unwatch()
        wd.close()
    print(
        f"  {label:10s} bare {b * 1e9:5.0f} ns/step   "
        f"metered {m * 1e9:5.0f}   +{(m - b) * 1e9:5.0f}"
    )
    return m - b


async def in_loop(mods: list[tuple[str, ModuleType]], n: int = 10_000, rounds: int = 7) -> None:
    async def bare() -> None:
        await small_work()

    async def run(mod: ModuleType | None, wd: Any) -> float:
        if mod is None:
            make = bare
        else:
            metered, slot = _meter(mod), mod.Slot

            async def make() -> None:
                await metered(small_work(), slot(wd, 1e9))

        t0 = time.perf_counter()
        await asyncio.gather(*(make() for _ in range(n)))
        return (time.perf_counter() - t0) / n

    wds = {label: mod.Watchdog() for label, mod in mods}
    for wd in wds.values():
        wd.watch()
    times: dict[str, list[float]] = {"bare": []}
    for _ in range(rounds):
        gc.collect()
        times["bare"].append(await run(None, None))
        for label, mod in mods:
            gc.collect()
            times.setdefault(label, []).append(await run(mod, wds[label]))
    for wd in wds.values():
        wd.unwatch()
        wd.close()
    base = statistics.median(times["bare"])
    print(f"  bare         {base * 1e6:6.2f} us/task")
    for label, _ in mods:
        t = statistics.median(times[label])
        print(
            f"  {label:12s} {t * 1e6:6.2f} us/task   +{(t - base) * 1e6 / 4:5.2f} us/step (4 steps)"
        )


def per_task(mod: ModuleType) -> None:
    wd = mod.Watchdog()
    loop = asyncio.new_event_loop()
    deadlines = mod.Deadlines(loop)

    def warn(t: object, reason: str) -> None:
        pass

    async def coro() -> None:
        pass

    env = {"mod": mod, "wd": wd, "functools": functools, "warn": warn, "d": deadlines}
    env["meter"] = _meter(mod)
    env["coro"] = coro
    env["slot"] = mod.Slot(wd, 60.0)
    wd.watch()  # the usual state: other limited tasks are running
    for stmt in (
        "mod.Slot(wd, 60.0, on_warn=functools.partial(warn, 1, 'cpu'))",
        "functools.partial(warn, 1, 'cpu')",
        "wd.watch(); wd.unwatch()",
        "c = coro(); m = meter(c, slot); getattr(m, '__await__', lambda: m)().close(); c.close()",
        "c = coro(); c.close()",
        "d.cancel(d.add(60.0, warn, 1, 2))",
    ):
        print(f"  {stmt:66s} {_ns(stmt, env, 50_000):7.0f} ns")
    wd.unwatch()
    wd.close()
    deadlines.close()
    loop.close()


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_enforce_old", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", help="another _enforce.py to compare with")
    args = parser.parse_args()
    mods = [("current", _enforce)]
    if args.old:
        mods.insert(0, ("old", _load(args.old)))
    print(f"python {sys.version.split()[0]}")
    print("clock reads:")
    clocks()
    print("per step, isolated (driven by hand):")
    for label, mod in mods:
        isolated(mod, label)
    print("per step, in an event loop, 10 000 concurrent tasks:")
    asyncio.run(in_loop(mods))
    for label, mod in mods:
        print(f"per task ({label}):")
        per_task(mod)


if __name__ == "__main__":
    main()
