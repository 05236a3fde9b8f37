"""Sync tasks that run their whole life on a worker thread.

A sync function submitted from a thread other than the loop's (a Flask view, a
sync FastAPI endpoint), with no limits, retries or concurrency bound, runs on a
worker thread from start to finish: the loop hears of it only if someone waits
on it or it fails. That saves two cross-thread wake-ups per task. It ends
through the runner's one ``finish``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from . import _context
from ._attempt import ABANDON_AFTER
from ._enforce import Interrupt, Slot
from ._state import ctl_of, jsonable
from ._task import FINISHED

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from ._runtime import Runtime
    from ._spec import Spec

__all__ = ["abandon", "start_direct"]

logger = logging.getLogger("bgtasks")
_set_current_task = _context.current_task_var.set
_get_responder = _context.responder.get


def start_direct(rt: Runtime, t: TaskHandle, spec: Spec) -> None:
    slot = Slot(rt._watchdog, None)
    ctl_of(t).slot = slot
    ctx = contextvars.copy_context()
    rt._threads.submit(functools.partial(_direct, rt, t, spec, slot, ctx))


def _direct(rt: Runtime, t: TaskHandle, spec: Spec, slot: Slot, ctx: contextvars.Context) -> None:
    runner = rt._runner
    with rt._watchdog.lock:
        run = t._status == "pending"
        if run:
            t._begin_attempt()
            slot.arm()
    if run and rt._hub.active:
        rt._hub.notify(t._id)
    if not run:  # cancelled before it started
        if _claim(rt, t):
            runner.finish(t, "cancelled")
        return
    try:
        value = ctx.run(_call_in_task, t, spec)
        ok = True
    except BaseException as exc:
        value, ok = exc, False
    slot.disarm_safely()
    if not _claim(rt, t):  # abandoned meanwhile (see abandon)
        return
    if ok and not inspect.isawaitable(value):
        t._result = jsonable(t, value)
        runner.finish(t, "succeeded")
    elif ok:  # a sync callable that returned a coroutine: the loop awaits it
        _adopt(rt, t, _await_result(rt, t, value))
    elif isinstance(value, Interrupt):
        stop = t._x.stop_exc if t._x is not None else None
        if stop is None:
            runner.finish(t, "cancelled")
        else:
            _adopt(rt, t, runner.fail(t, stop))
    else:
        _adopt(rt, t, runner.fail(t, value))


def _call_in_task(t: TaskHandle, spec: Spec) -> Any:
    # Runs inside the task's own copy of the caller's context.
    _set_current_task(t)
    if _get_responder() is not None:
        _context.responder.set(None)
    return spec.fn(*spec.args, **spec.kwargs)


def _claim(rt: Runtime, t: TaskHandle) -> bool:
    """Whether the caller is the one to record how a direct task ended."""
    ctl = ctl_of(t)
    with rt._admission.lock:
        if ctl.claimed:
            return False
        ctl.claimed = True
        return True


def abandon(rt: Runtime, t: TaskHandle) -> None:
    """A stopped direct task whose thread did not stop: record it as stopped."""
    if t._status in FINISHED or not _claim(rt, t):
        return
    logger.warning(
        "bgtasks: task %s (%s) did not stop within %.0fs of being stopped (blocked in a "
        "system call?); its thread is abandoned and its outcome will be ignored",
        t._id,
        t._name,
        ABANDON_AFTER,
    )
    stop = t._x.stop_exc if t._x is not None else None
    if stop is None:
        rt._runner.finish(t, "cancelled", foreign=True)
    else:
        _adopt(rt, t, rt._runner.fail(t, stop))


def _adopt(rt: Runtime, t: TaskHandle, coro: Awaitable[None]) -> None:
    """Hand a direct task's ending to the loop (from its worker thread)."""

    def adopt() -> None:
        rt._admission.spawned()
        t._task = asyncio.ensure_future(coro)

    loop = rt._runner.loop
    assert loop is not None
    try:
        loop.call_soon_threadsafe(adopt)
    except RuntimeError:  # the loop has closed: nobody to tell
        if inspect.iscoroutine(coro):
            coro.close()


async def _await_result(rt: Runtime, t: TaskHandle, value: Awaitable[Any]) -> None:
    runner = rt._runner
    try:
        result = await value
    except asyncio.CancelledError:
        runner.finish(t, "cancelled")
    except Exception as exc:
        await runner.fail(t, exc)
    else:
        runner.succeed(t, result)
