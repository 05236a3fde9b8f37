"""One attempt of a task under its limits: on the loop, in a worker thread, or in
a worker process; and the warnings and stops the limits cause."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
from typing import TYPE_CHECKING, Any

from ._enforce import Interrupt, Slot, metered
from ._errors import CPULimitExceeded, WallClockLimitExceeded
from ._hooks import BeforeUnloadEvent, UnloadReason
from ._state import ctl_of

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from ._limits import Limits
    from ._runtime import Runtime
    from ._spec import Spec

__all__ = [
    "ABANDON_AFTER",
    "attempt",
    "pause_wall",
    "resume_wall",
    "stop_error",
    "warn_threadsafe",
]

ABANDON_AFTER = 1.0  # seconds a stopped thread gets before it is abandoned


async def attempt(rt: Runtime, t: TaskHandle, spec: Spec) -> Any:
    """Run ``spec`` once for ``t`` and return its result; raise what stopped it."""
    limits = spec.limits
    # One deadline at a time: the 90% warning, which then sets the limit.
    # timer[0]: the deadline entry now armed; timer[1]: the absolute deadline
    # (loop time), which a sleeping step moves on by the time it slept.
    timer: list[Any] = []
    slot: Slot | None = None
    deadlines = rt._deadlines
    if limits.wall_clock is not None:
        assert deadlines is not None
        wall = limits.wall_clock
        timer.append(deadlines.add(0.9 * wall, _wall_warn, rt, t, limits, timer))
        timer.append(rt._runner.loop.time() + wall)  # type: ignore[union-attr]
        ctl_of(t).wall = timer  # a sleeping step pauses it (see pause_wall)
    if limits.cpu_time is not None and spec.kind != "process":
        slot = Slot(
            rt._watchdog,
            limits.cpu_time,
            on_warn=functools.partial(warn_threadsafe, rt, t, "cpu"),
        )
        ctl_of(t).slot = slot
        rt._watchdog.watch()
    try:
        if spec.kind == "coro":
            work = spec.fn
            return await (metered(work, slot) if slot is not None else work)
        if spec.kind == "async":
            coro = spec.fn(*spec.args, **spec.kwargs)
            return await (metered(coro, slot) if slot is not None else coro)
        if spec.kind == "sync":
            return await _in_thread(rt, t, spec, slot or Slot(rt._watchdog, None))
        return await _in_process(rt, t, spec)
    except Interrupt:
        raise stop_error(t, spec) from None
    except asyncio.CancelledError:
        stop = t._x.stop_exc if t._x is not None else None
        if stop is None:
            raise
        task = asyncio.current_task()
        if task is not None and hasattr(task, "uncancel"):
            task.uncancel()
        raise stop from None
    finally:
        if timer:
            deadlines.cancel(timer[0])  # type: ignore[union-attr]
            x = t._x
            if x is not None:
                x.wall = None
                x.paused = None
                x.sleepers = 0
        if slot is not None:
            rt._watchdog.unwatch()
            if t._x is not None:
                t._x.slot = None


def stop_error(t: TaskHandle, spec: Spec | None) -> BaseException:
    """The error a stopped task fails with: the one its stop gave, else the CPU limit."""
    stop: BaseException | None = t._x.stop_exc if t._x is not None else None
    if stop is not None:
        return stop
    budget = spec.limits.cpu_time if spec is not None else None
    return CPULimitExceeded(f"task {t._name!r} used more than its CPU limit of {budget:g}s")


async def _in_thread(rt: Runtime, t: TaskHandle, spec: Spec, slot: Slot) -> Any:
    loop = asyncio.get_running_loop()
    assert rt._thread_sem is not None
    fut: asyncio.Future[tuple[bool, Any]] = loop.create_future()
    ctx = contextvars.copy_context()
    fn, args, kwargs = spec.fn, spec.args, spec.kwargs
    ctl = ctl_of(t)
    ctl.slot = slot

    def deliver(outcome: tuple[bool, Any]) -> None:
        if not fut.done():
            fut.set_result(outcome)

    def body() -> None:
        try:
            slot.arm()
            outcome: tuple[bool, Any] = (True, ctx.run(fn, *args, **kwargs))
        except BaseException as exc:
            outcome = (False, exc)
        slot.disarm_safely()
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(deliver, outcome)

    async with rt._thread_sem:
        rt._threads.submit(body)
        try:
            ok, value = await asyncio.shield(fut)
        except asyncio.CancelledError:
            slot.interrupt()
            # Give the thread a moment to unwind; one blocked in a system call
            # cannot be interrupted and is abandoned (it is a daemon thread).
            await asyncio.wait((fut,), timeout=ABANDON_AFTER)
            raise
        finally:
            ctl.slot = None
    if not ok:
        raise value
    if inspect.isawaitable(value):  # a sync callable that returned a coroutine
        return await value
    return value


async def _in_process(rt: Runtime, t: TaskHandle, spec: Spec) -> Any:
    pool = rt._process_pool
    if pool is None:
        from ._process import ProcessPool

        pool = rt._process_pool = ProcessPool(
            size=rt.process_pool_size,
            max_tasks_per_worker=rt.process_max_tasks,
            idle_timeout=rt.process_idle_timeout,
        )

    def progress(done: float, total: float | None, message: str | None) -> None:
        t._report_progress(done, total, message)

    return await pool.run(
        spec.fn,
        spec.args,
        spec.kwargs,
        cpu_time=spec.limits.cpu_time,
        memory=spec.limits.memory_bytes,
        on_progress=progress,
        on_cpu_warning=functools.partial(warn_threadsafe, rt, t, "cpu"),
        task_id=t._id,
        name=t._name,
        attempt=t._attempts,
    )


def _wall_warn(rt: Runtime, t: TaskHandle, limits: Limits, timer: list[Any]) -> None:
    warn(rt, t, "wall_clock")
    assert rt._deadlines is not None and limits.wall_clock is not None
    wall = limits.wall_clock
    error = WallClockLimitExceeded(f"task {t._name!r} ran past its wall-clock limit of {wall:g}s")
    # The stop is due at start + budget, however late this warning ran (a blocked loop).
    left = max(0.0, timer[1] - rt._runner.loop.time())  # type: ignore[union-attr]
    timer[0] = rt._deadlines.add(left, rt._stop, t, error)


def warn(rt: Runtime, t: TaskHandle, reason: UnloadReason) -> None:
    """``beforeunload`` for a task near its limit (loop thread)."""
    if t._status == "running":
        rt._fire_soon(BeforeUnloadEvent(reason, t.record))


def warn_threadsafe(rt: Runtime, t: TaskHandle, reason: UnloadReason) -> None:
    loop = rt._runner.loop
    if loop is not None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(warn, rt, t, reason)


def pause_wall(rt: Runtime, t: TaskHandle) -> None:
    """A step of ``t`` starts sleeping: time asleep does not count toward ``wall_clock``."""
    x = t._x
    if x is None or x.wall is None:
        return
    x.sleepers += 1
    if x.sleepers > 1 or rt._deadlines is None or rt._runner.loop is None:
        return
    entry = x.wall[0]
    if entry[2] is None:
        return
    now = rt._runner.loop.time()
    x.paused = (now, entry[0] - now, entry[2], entry[3])
    rt._deadlines.cancel(entry)


def resume_wall(rt: Runtime, t: TaskHandle) -> None:
    """The last sleeping step of ``t`` woke: its wall clock runs on from where it stopped."""
    x = t._x
    if x is None or x.wall is None or x.sleepers == 0:
        return
    x.sleepers -= 1
    if x.sleepers or x.paused is None or rt._deadlines is None:
        return
    since, left, callback, args = x.paused
    x.paused = None
    assert rt._runner.loop is not None
    x.wall[1] += rt._runner.loop.time() - since  # the deadline moves on by the time slept
    x.wall[0] = rt._deadlines.add(max(0.0, left), callback, *args)
