"""Steps inside a task: ``step.run`` retried on its own and kept, ``step.sleep``.

A step's result is kept for the task's life (in the task's side state; in the
store too for a durable task, see ``keeper``), so running the task again (a
task-level retry, a replay, a resume after a sleep) returns it without calling
the step's function. Names count per run of the task: the k-th call of
``name`` is the step ``name`` for k = 1 and ``name#k`` after, so loops work.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic
import stamina
from pydantic_core import to_json

from . import _context
from ._attempt import pause_wall, resume_wall
from ._errors import StepOutsideTask
from ._observe import safely
from ._spec import is_async_callable
from ._state import Ctl, StepState, book_of, ctl_of
from ._task import ErrorInfo, StepRecord

if TYPE_CHECKING:
    from ._handle import TaskHandle

__all__ = ["Parked", "restore", "run", "sleep", "sleep_until"]

T = TypeVar("T")
_now = time.time


def _task(what: str) -> TaskHandle:
    t = _context.current_task_var.get()
    if t is None:
        import sys

        process = sys.modules.get("bgtasks._process")
        if process is not None and process.in_worker():
            msg = (
                f'bgtasks.step.{what}() is not supported inside an isolation="process" task: '
                "its steps could not be kept by the parent. Split the work into steps in an "
                "inline task that calls the isolated function from a step, or drop the steps."
            )
        else:
            msg = (
                f"bgtasks.step.{what}() works only inside a task (a function run by "
                "@background or wait_until); call the function directly here."
            )
        raise StepOutsideTask(msg)
    return t


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        msg = f"step.{what}() needs a non-empty str name first, got {name!r}."
        raise TypeError(msg)
    return name


def _step_name(ctl: Ctl, name: str) -> str:
    counts = book_of(ctl).counts
    k = counts[name] = counts.get(name, 0) + 1
    return name if k == 1 else f"{name}#{k}"


async def run(
    name: str,
    fn: Callable[..., Awaitable[T]] | Callable[..., T],
    /,
    *args: Any,
    retries: int | None = None,
    **kwargs: Any,
) -> T:
    """Run ``fn(*args, **kwargs)`` as the step ``name`` of the current task.

    A step that already succeeded in an earlier run of this task returns its
    kept result without calling ``fn``. ``fn`` may be sync (it runs in a worker
    thread) or async. ``retries=N``: up to N+1 attempts of this step, with the
    task's backoff, before its error reaches the task function.
    """
    _check_name(name, "run")
    if not callable(fn):
        msg = f"step.run({name!r}, fn, ...) needs a callable fn, got {type(fn).__name__}."
        raise TypeError(msg)
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)
                                or retries < 0):
        msg = f"step.run({name!r}): retries must be an int >= 0, got {retries!r}."
        raise ValueError(msg)
    t = _task("run")
    ctl = ctl_of(t)
    step = _step_name(ctl, name)
    book = book_of(ctl)
    if step in book.kept:
        value: T = book.kept[step]
        return value
    rt = t._rt
    st = book.steps.get(step)
    if st is None:
        st = book.steps[step] = StepState(step, "running")
    else:  # it failed in an earlier run of the task
        st.status, st.error, st.finished_at = "running", None, None
    rt._runner.saved(t)
    b = rt.backoff
    observers = rt._observers
    observed = rt._runner.observed(t) if observers else None
    for o in observers:
        safely(o, "step_started", observed, step)
    try:
        if not retries:  # one attempt: no retry machinery to build
            st.attempts += 1
            result = await _call(fn, args, kwargs)
        else:
            async for attempt in stamina.retry_context(
                on=Exception,
                attempts=retries + 1,
                timeout=None,
                wait_initial=b.initial,
                wait_max=b.max,
                wait_jitter=b.jitter,
            ):
                with attempt:
                    st.attempts += 1
                    if st.attempts > 1:
                        rt._runner.saved(t)
                    result = await _call(fn, args, kwargs)
        kept = await keep(t, ctl, step, result)
    except BaseException as exc:
        st.status = "failed"
        st.error = ErrorInfo.from_exception(exc)
        st.finished_at = _now()
        rt._runner.saved(t)
        for o in observers:
            safely(o, "step_ended", observed, step, exc, st.attempts)
        raise
    for o in observers:
        safely(o, "step_ended", observed, step, None, st.attempts)
    st.status = "succeeded"
    st.finished_at = _now()
    rt._runner.saved(t)
    return kept  # type: ignore[no-any-return]


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if is_async_callable(fn):
        return await fn(*args, **kwargs)
    value = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(value):
        return await value
    return value


async def keep(t: TaskHandle, ctl: Ctl, step: str, value: Any) -> Any:
    """Keep a step's result for the task's life and return what later runs get.

    In a durable task the value must be JSON (later runs may be in another
    process): it is written to the store, and the step returns it as decoded
    from JSON, so every run sees the same value.
    """
    if ctl.durable:
        value = await _keep_durably(t, step, value)
    book_of(ctl).kept[step] = value
    return value


def _seconds(duration: object, name: str) -> float:
    if isinstance(duration, _dt.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, (int, float)) and not isinstance(duration, bool):
        seconds = float(duration)
    else:
        msg = (
            f"step.sleep({name!r}, duration): duration must be seconds (a number) or a "
            f"datetime.timedelta, got {type(duration).__name__}."
        )
        raise TypeError(msg)
    if not seconds >= 0:
        msg = f"step.sleep({name!r}, duration): duration must be >= 0, got {duration!r}."
        raise ValueError(msg)
    return seconds


def aware_timestamp(when: object, what: str) -> float:
    """``when`` (an aware datetime) as a Unix time; a clear error for naive ones."""
    if not isinstance(when, _dt.datetime):
        msg = f"{what} needs an aware datetime.datetime, got {type(when).__name__}."
        raise TypeError(msg)
    if when.tzinfo is None or when.tzinfo.utcoffset(when) is None:
        msg = (
            f"{what} got a naive datetime ({when.isoformat()}), which names no moment; "
            "give it a time zone, e.g. datetime.now(timezone.utc) + timedelta(hours=1)."
        )
        raise ValueError(msg)
    return when.timestamp()


async def sleep(name: str, duration: float | _dt.timedelta) -> None:
    """Sleep as the step ``name``: a durable task is parked (no slot, no memory)
    until then; another task sleeps in the process. Time asleep never counts
    toward ``wall_clock``; a run that reaches a finished sleep goes straight on."""
    _check_name(name, "sleep")
    seconds = _seconds(duration, name)
    t = _task("sleep")
    await _sleep(t, name, lambda: _now() + seconds)


async def sleep_until(name: str, when: _dt.datetime) -> None:
    """``step.sleep`` until the aware datetime ``when``."""
    _check_name(name, "sleep_until")
    at = aware_timestamp(when, f"step.sleep_until({name!r}, when)")
    t = _task("sleep_until")
    await _sleep(t, name, lambda: at)


async def _sleep(t: TaskHandle, name: str, wake_at: Callable[[], float]) -> None:
    ctl = ctl_of(t)
    step = _step_name(ctl, name)
    book = book_of(ctl)
    rt = t._rt
    st = book.steps.get(step)
    if step in book.kept:
        if st is not None and st.status == "sleeping":  # parked, and now woken up
            st.status = "succeeded"
            st.finished_at = _now()
            rt._runner.saved(t)
        return
    if st is None:
        st = book.steps[step] = StepState(step, "sleeping")
    if st.wake_at is None:
        st.wake_at = wake_at()  # fixed when first reached: a rerun does not sleep again
    st.status = "sleeping"
    st.attempts = 1
    ctl.wake_at = st.wake_at
    rt._runner.saved(t)
    if ctl.durable and st.wake_at > _now():
        await _park(t, step, st.wake_at)  # ends this run; a later one goes on from here
    pause_wall(rt, t)
    try:
        delay = st.wake_at - _now()
        if delay > 0:
            await asyncio.sleep(delay)
    finally:
        resume_wall(rt, t)
        ctl.wake_at = None
    await keep(t, ctl, step, None)
    st.status = "succeeded"
    st.finished_at = _now()
    rt._runner.saved(t)


async def _keep_durably(t: TaskHandle, step: str, value: Any) -> Any:
    """Write a durable task's step result to the store, as JSON; return it decoded,
    so this run goes on with the value later runs will get."""
    try:
        text = to_json(value).decode()
    except Exception as exc:
        msg = (
            f"the result of step {step!r} of durable task {t._name!r} is a "
            f"{type(value).__name__}, which is not JSON-serialisable; a durable task keeps "
            "its step results in the store as JSON: return a JSON value (dict, list, str, "
            "number, bool, None) or a pydantic model's .model_dump()."
        )
        raise TypeError(msg) from exc
    await asyncio.wrap_future(t._rt.store.keep_step(t._id, step, text))
    return json.loads(text)


class Parked(BaseException):
    """Raised through a durable task that parked: this run ends without an outcome.

    A BaseException so that ``except Exception`` in task code lets it through.
    """


async def _park(t: TaskHandle, step: str, wake_at: float) -> None:
    """Park a durable task until ``wake_at``: the sleep is kept (a later run goes
    straight on), the record is pending with ``wake_at``, the store owns the
    wake-up; this run ends, giving back its slot and its memory."""
    rt = t._rt
    await asyncio.wrap_future(rt.store.keep_step(t._id, step, "null"))
    t._status = "pending"
    rt._runner.saved(t)
    await asyncio.wrap_future(rt.store.park(t._id, wake_at))
    raise Parked


def restore(t: TaskHandle, kept: dict[str, str], raw_steps: str | None) -> None:
    """A durable task claimed again: its kept results and its steps' records."""
    ctl = ctl_of(t)
    ctl.durable = True
    book = book_of(ctl)
    for name, text in kept.items():
        try:
            book.kept[name] = json.loads(text)
        except ValueError:  # unreadable: the step runs again
            continue
    if raw_steps:
        try:
            records = _step_records.validate_json(raw_steps)
        except ValueError:
            records = []
        for rec in records:
            st = StepState(rec.name, rec.status)
            st.attempts = rec.attempts
            st.started_at = rec.started_at.timestamp() if rec.started_at else None
            st.finished_at = rec.finished_at.timestamp() if rec.finished_at else None
            st.error = rec.error
            book.steps[rec.name] = st


_step_records = pydantic.TypeAdapter(list[StepRecord])
