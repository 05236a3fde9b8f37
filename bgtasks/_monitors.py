"""The runtime's background loops: expiring old records and watching process memory."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

import psutil

from ._errors import MemoryLimitExceeded
from ._hooks import BeforeUnloadEvent

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["LoopWatch", "memory_loop", "sweep_loop"]

logger = logging.getLogger("bgtasks")


async def sweep_loop(rt: Runtime) -> None:
    """Expire finished records every so often (a quarter of ``retention``)."""
    interval = min(max(rt.retention / 4, 0.05), 30.0) if rt.retention > 0 else 30.0
    while True:
        await asyncio.sleep(interval)
        try:
            rt.expire()
        except Exception:  # a bad record or store: log, and expire again next time
            logger.exception("bgtasks: expiring finished records failed; will retry")


async def memory_loop(rt: Runtime) -> None:
    """Hold the process under ``memory_limit``: at 90% warn (``beforeunload``,
    reason "memory") and refuse new work; at 100% stop the newest running task."""
    limit = rt.memory_limit
    assert limit is not None
    proc = psutil.Process()
    warned = False
    while True:
        try:
            warned = _check_memory(rt, proc, limit, warned)
        except Exception:
            logger.exception("bgtasks: the memory check failed; will retry")
        await asyncio.sleep(rt.memory_check_interval)


def _check_memory(rt: Runtime, proc: psutil.Process, limit: int, warned: bool) -> bool:
    """One look at the RSS; returns whether the 90% warning is out."""
    admission = rt._admission
    rss = proc.memory_info().rss
    high = rss >= 0.9 * limit
    admission.memory_high = high
    if high and not warned:
        warned = True
        logger.warning(
            "bgtasks: process RSS %d bytes is above 90%% of memory_limit=%d; "
            "refusing new work",
            rss,
            limit,
        )
        rt._fire_soon(BeforeUnloadEvent("memory"))
    elif rss < 0.8 * limit:
        warned = False
    victim = rt._registry.newest_running() if rss >= limit else None
    if victim is not None:
        rt._stop(
            victim,
            MemoryLimitExceeded(
                f"process RSS {rss} bytes reached memory_limit={limit}; the newest "
                f"running task {victim._name!r} was stopped"
            ),
        )
    return warned


class LoopWatch:
    """Notices a task that blocks the event loop, and names it in a warning.

    The loop beats every so often; a daemon thread checks the last beat. When
    the loop has not beaten for ``threshold`` seconds, the asyncio task running
    on it is looked up among the runtime's tasks, and a warning naming it is
    logged, once per task. A blocked loop delays every request and every other
    task: the fix is to make the work a sync function (it then runs in a
    worker thread) or to await inside the loop.
    """

    def __init__(self, rt: Runtime, threshold: float) -> None:
        self._rt = rt
        self._threshold = threshold
        self._interval = max(0.02, min(threshold / 4, 0.5))
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._beat: asyncio.TimerHandle | None = None
        # (the asyncio task running when the loop was first seen late, that beat):
        # one task blocking the loop is the same task at every look until it lets
        # go; a burst of many short tasks shows a different one each time.
        self._suspect: tuple[object, float] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tick()
        threading.Thread(target=self._watch, name="bgtasks-loop-watch", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.cancel()

    def _tick(self) -> None:
        self._last = time.monotonic()
        assert self._loop is not None
        self._beat = self._loop.call_later(self._interval, self._tick)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            last = self._last
            lag = time.monotonic() - last
            if lag < self._threshold / 2:
                self._suspect = None
                continue
            try:
                loop = self._loop
                running = None if loop is None else asyncio.current_task(loop)  # any thread
                suspect = self._suspect
                if running is None or suspect is None or suspect != (running, last):
                    self._suspect = None if running is None else (running, last)
                elif lag >= self._threshold:
                    self._name_the_culprit(running, lag)
            except Exception:  # never let the watch thread die
                logger.exception("bgtasks: the loop watch failed")

    def _name_the_culprit(self, running: object, lag: float) -> None:
        for t in self._rt._registry.values():
            if t._task is running:
                if t._id in self._warned:
                    return
                if len(self._warned) > 10_000:
                    self._warned.clear()
                self._warned.add(t._id)
                logger.warning(
                    "bgtasks: task %s (%s) has blocked the event loop for %.1fs; every request "
                    "and task of this process waits meanwhile. Make it a sync function (it "
                    "then runs in a worker thread) or await inside it "
                    "(Runtime(loop_block_warning=...) sets this threshold).",
                    t._id,
                    t._name,
                    lag,
                )
                return
