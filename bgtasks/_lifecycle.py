"""Starting and stopping a runtime: all or nothing at start, a bounded drain at shutdown."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ._enforce import Deadlines
from ._hooks import BeforeUnloadEvent, dispatch
from ._monitors import LoopWatch, memory_loop, sweep_loop
from ._task import FINISHED

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["shutdown", "start", "wait_idle"]

logger = logging.getLogger("bgtasks")


async def start(rt: Runtime) -> None:
    """Start ``rt`` on the running loop; if any part fails, nothing stays running."""
    if rt._state != "new":
        msg = (
            f"this Runtime was already {rt._state}; a Runtime runs once. "
            "Create a new bgtasks.Runtime for each app lifetime."
        )
        raise RuntimeError(msg)
    loop = asyncio.get_running_loop()
    rt._runner.bind(loop)
    rt._thread_sem = asyncio.Semaphore(rt.max_threads)
    rt._deadlines = Deadlines(loop)
    opened = False
    try:
        await rt.store.open()
        opened = True
        rt._state = "started"
        rt._side(sweep_loop(rt))
        if rt.memory_limit is not None:
            rt._side(memory_loop(rt))
        if rt.config.loop_block_warning is not None:
            rt._loop_watch = LoopWatch(rt, rt.config.loop_block_warning)
            rt._loop_watch.start(loop)
        if rt.store.durable:
            from ._durable.replay import Replay

            replay = Replay(rt, rt.store)
            await replay.start()  # runs what the journal holds; raises having started nothing
            rt._replay = replay
    except BaseException:
        rt._state = "closing"
        await _close(rt, store_open=opened)
        raise


async def shutdown(rt: Runtime) -> None:
    """``beforeunload("shutdown")``, wait up to ``shutdown_grace`` for unfinished
    tasks, then stop the rest (a durable store keeps them queued)."""
    if rt._state != "started":
        return
    rt._state = "closing"
    loop = asyncio.get_running_loop()
    grace = rt.shutdown_grace
    deadline = loop.time() + grace
    try:
        handlers = rt._handlers["beforeunload"]
        if handlers:
            try:
                await asyncio.wait_for(dispatch(handlers, BeforeUnloadEvent("shutdown")), grace)
            except asyncio.TimeoutError:
                logger.warning("bgtasks: beforeunload handlers outlasted shutdown_grace")
        remaining = max(0.0, deadline - loop.time())
        if not await wait_idle(rt, remaining):
            # A "failed" task whose rejection handlers still run has not ended.
            leftover = [
                t
                for t in rt._registry.values()
                if t._status not in FINISHED or t._task is not None
            ]
            logger.warning(
                "bgtasks: %d task(s) still unfinished after shutdown_grace=%.1fs; %s",
                len(leftover),
                grace,
                "cancelling them" if not rt.store.durable else "stopping them",
            )
            if rt.store.durable:
                from ._durable.replay import release

                await release(rt.store, [t._id for t in leftover if t._status not in FINISHED])
            for t in leftover:
                rt._stop(t, None)
            # Cancelled coroutines finish at once; a thread stuck in a system call is
            # abandoned after a short wait (see _attempt).
            await wait_idle(rt, 5.0)
    finally:
        await _close(rt)


async def _close(rt: Runtime, *, store_open: bool = True) -> None:
    try:
        for side in tuple(rt._side_tasks):
            side.cancel()
        if rt._side_tasks:
            await asyncio.wait(tuple(rt._side_tasks), timeout=5.0)
    finally:
        if rt._loop_watch is not None:
            rt._loop_watch.close()
        rt._watchdog.close()
        if rt._deadlines is not None:
            rt._deadlines.close()
        if rt._process_pool is not None:
            await rt._process_pool.aclose()
        if rt._replay is not None:
            await rt._replay.stop()
            rt._replay = None
        if store_open:
            await rt.store.close()
        rt._state = "closed"


def _hooks(rt: Runtime) -> list[asyncio.Task[Any]]:
    return [t for t in rt._side_tasks if getattr(t, "_bgtasks_hook", False)]


async def wait_idle(rt: Runtime, timeout: float | None) -> bool:
    """Wait until nothing is pending or running and no hook runs; False on timeout."""
    if rt._admission.idle and not _hooks(rt):
        return True
    try:
        await asyncio.wait_for(rt._admission.until_idle(lambda: _hooks(rt)), timeout)
    except asyncio.TimeoutError:
        return False
    return True
