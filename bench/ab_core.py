"""The core of two bgtasks checkouts in one process, rounds alternating.

    .venv/bin/python bench/ab_core.py /tmp/old            # /tmp/old: a checkout (git worktree)
    .venv/bin/python bench/ab_core.py /tmp/old --rounds 7

The other checkout's ``bgtasks`` package is copied to a temporary folder as
``bgtasks_old`` (it must use relative imports inside the package, as bgtasks
does) and imported beside this checkout's. Each round runs both, in
alternating order, next to ``bench/overhead.py``'s plain-asyncio floor, so
both see the same neighbours; printed are medians of the per-round ratios:
after / before, each against the floor, and the cost of limits
(``wall_clock`` + ``cpu_time``) on tasks of tiny and of typical steps.
``--gc-off`` disables the garbage collector during each measured round.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)  # this folder's http.py would hide the stdlib's
sys.path.insert(1, _HERE)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Coroutine  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import overhead  # noqa: E402

import bgtasks  # noqa: E402

Make = Callable[[], Coroutine[Any, Any, Any]]


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


async def _timed(pkg: ModuleType, n: int, work: Make, limited: bool, gc_off: bool) -> float:
    overhead.Runtime = pkg.Runtime  # with_bgtasks builds its runtime from this name
    limits = pkg.Limits(wall_clock=60, cpu_time=60) if limited else None
    gc.collect()
    if gc_off:
        gc.disable()
    try:
        return await overhead.with_bgtasks(n, work, limits)
    finally:
        gc.enable()


async def main(old: ModuleType, rounds: int, gc_off: bool) -> None:
    pkgs = {"before": old, "after": bgtasks}
    for n in (10_000, 100_000):
        t: dict[str, list[float]] = {"before": [], "after": [], "floor": []}
        for r in range(rounds):
            gc.collect()
            t["floor"].append(await overhead.floor(n, overhead.noop))
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                t[side].append(await _timed(pkgs[side], n, overhead.noop, False, gc_off))
        print(
            f"n={n:>7}: before {statistics.median(t['before']) * 1e6:6.2f} us  "
            f"after {statistics.median(t['after']) * 1e6:6.2f} us  "
            f"floor {statistics.median(t['floor']) * 1e6:6.2f} us | "
            f"after / before {_ratio(t['after'], t['before']):.3f}x   "
            f"before / floor {_ratio(t['before'], t['floor']):.2f}x   "
            f"after / floor {_ratio(t['after'], t['floor']):.2f}x",
            flush=True,
        )
    n = 10_000
    for label, work in (
        ("tiny steps", overhead.small_work),
        ("typical steps", overhead.typical_work),
    ):
        times: dict[tuple[str, bool], list[float]] = {}
        for r in range(rounds):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                for limited in (False, True):
                    got = await _timed(pkgs[side], n, work, limited, gc_off)
                    times.setdefault((side, limited), []).append(got)
        figures = "   ".join(
            f"{side} {100 * (_ratio(times[(side, True)], times[(side, False)]) - 1):+.1f}%"
            for side in ("before", "after")
        )
        print(f"limits, {label}, n={n}, paired by round: {figures}", flush=True)


def load_old(checkout: str, into: str) -> ModuleType:
    src = os.path.join(checkout, "bgtasks")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        raise SystemExit(f"{checkout!r} has no bgtasks package (bgtasks/__init__.py)")
    shutil.copytree(src, os.path.join(into, "bgtasks_old"))
    sys.path.insert(0, into)
    return importlib.import_module("bgtasks_old")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkout", help="the other checkout (the 'before')")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gc-off", action="store_true", help="no garbage collector in rounds")
    args = parser.parse_args()
    logging.getLogger("bgtasks").setLevel(logging.ERROR)  # the loop-block warning, in bursts
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old(args.checkout, tmp)
        print(
            f"before: {os.path.abspath(args.checkout)}   after: {os.path.dirname(bgtasks.__file__)}"
        )
        asyncio.run(main(old, args.rounds, args.gc_off))
