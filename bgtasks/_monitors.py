"""The runtime's background loops: expiring old records and watching process memory."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import psutil

from ._errors import MemoryLimitExceeded
from ._hooks import BeforeUnloadEvent

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["memory_loop", "sweep_loop"]

logger = logging.getLogger("bgtasks")


async def sweep_loop(rt: Runtime) -> None:
    """Expire finished records every so often (a quarter of ``retention``)."""
    interval = min(max(rt.retention / 4, 0.05), 30.0) if rt.retention > 0 else 30.0
    while True:
        await asyncio.sleep(interval)
        rt.expire()


async def memory_loop(rt: Runtime) -> None:
    """Hold the process under ``memory_limit``: at 90% warn (``beforeunload``,
    reason "memory") and refuse new work; at 100% stop the newest running task."""
    limit = rt.memory_limit
    assert limit is not None
    admission = rt._admission
    proc = psutil.Process()
    warned = False
    while True:
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
        await asyncio.sleep(rt.memory_check_interval)
