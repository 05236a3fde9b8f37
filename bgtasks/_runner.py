"""The one path every task runs and finishes through.

``Runner.run`` is the body of a task's asyncio task: it takes a slot under
``max_concurrency``, runs the attempts (``_attempt``: limits, threads,
processes) under the retry policy, and ends in ``succeed`` / ``fail`` /
``finish``. A sync task that runs whole on a worker thread (``_direct``) ends
through the same ``finish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import stamina

from . import _context
from ._attempt import ABANDON_AFTER, attempt, stop_error
from ._direct import abandon
from ._enforce import Interrupt
from ._errors import LimitExceeded
from ._hooks import UnhandledRejectionEvent, dispatch
from ._observe import ObservedTask, safely
from ._spec import Spec
from ._state import TaskState, ctl_of, jsonable
from ._steps import Parked
from ._task import FINISHED, TaskStatus

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from ._runtime import Runtime

__all__ = ["Runner", "Ticket", "retryable"]

logger = logging.getLogger("bgtasks")

_CoroutineType = types.CoroutineType
_get_ident = threading.get_ident
_now = time.time
_set_current_task = _context.current_task_var.set
_get_responder = _context.responder.get

HOOK_MIN_TIMEOUT = 1.0  # unhandledrejection handlers get max(shutdown_grace, this)


def retryable(exc: BaseException) -> bool:
    # Cancellation is not a failure, and a task that went over a limit would
    # only go over it again.
    return isinstance(exc, Exception) and not isinstance(exc, LimitExceeded)


class Ticket:
    """A place reserved for one task (``Runtime.reserve``): ``launch()`` it, or
    ``retract()`` it if the task will not run (a failed journal write, a taken
    idempotency key). Use it on the thread that reserved it."""

    __slots__ = ("_on_loop", "_rt", "handle")

    def __init__(self, rt: Runtime, handle: TaskHandle, on_loop: bool) -> None:
        self._rt = rt
        self._on_loop = on_loop
        self.handle = handle

    @property
    def on_loop(self) -> bool:
        return self._on_loop

    def launch(self) -> TaskHandle:
        rt = self._rt
        if rt._observers:
            rt._announce(self.handle)
        rt._runner.launch(self.handle)
        return self.handle

    def retract(self) -> None:
        self._rt._registry.discard(self.handle._id)
        self._rt._admission.retract(self._on_loop)


class Runner:
    """Runs tasks on the runtime's loop and records how they end."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.admission = rt._admission
        self.registry = rt._registry
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread_id: int | None = None
        self.sem: asyncio.Semaphore | None = None
        self.persist = False  # records go to the store at every transition

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The runtime starts on ``loop`` (its thread is the loop thread)."""
        self.loop = loop
        self.loop_thread_id = _get_ident()
        self.admission.loop = loop
        if self.rt.max_concurrency is not None:
            self.sem = asyncio.Semaphore(self.rt.max_concurrency)
        self.persist = self.rt.store.durable

    def on_loop_thread(self) -> bool:
        return _get_ident() == self.loop_thread_id

    def saved(self, t: TaskState) -> None:
        """Record a transition of ``t`` in a shared store (a snapshot, never the handle)."""
        if self.persist:
            self.rt.store.save(t._snapshot())
        hub = self.rt._hub
        if hub.active:  # someone watches a task (?wait=, /events, the dashboard)
            hub.notify(t._id)

    # ---------------------------------------------------------------- starting
    def launch(self, t: TaskHandle) -> None:
        """Start an admitted task from any thread."""
        loop = self.loop
        assert loop is not None
        if _get_ident() == self.loop_thread_id:
            t._task = loop.create_task(self.run(t))
        else:
            # Run spawn in a copy of the caller's context: the task gets that copy.
            loop.call_soon_threadsafe(self.spawn, t, context=contextvars.copy_context())

    def spawn(self, t: TaskHandle) -> None:
        self.admission.spawned()
        t._task = asyncio.get_running_loop().create_task(self.run(t))
        if t._status == "cancelled":  # cancelled before it was spawned
            self.cancel_task(t, t._task)

    # ---------------------------------------------------------------- running
    async def run(self, t: TaskHandle) -> None:
        _set_current_task(t)
        if _get_responder() is not None:
            _context.responder.set(None)
        work = t._work
        persist = self.persist
        if persist:  # a shared store: other processes read this record
            self.rt.store.save(t._snapshot())
        try:
            if type(work) is not _CoroutineType and work.wake_at is not None:
                await self.delayed(t, work.wake_at)
            if self.sem is not None:
                async with self.sem:
                    await self.attempts(t, work)
            elif type(work) is _CoroutineType and not persist and not self.rt._observers:
                # The hot path: one coroutine, no limits, no retries, nobody watching.
                t._status = "running"
                t._attempts = 1
                t._started_at = _now()
                if self.rt._hub.active:
                    self.rt._hub.notify(t._id)
                result = await work
                self.succeed(t, result)
            else:
                await self.attempts(t, work)
        except asyncio.CancelledError:
            stop = t._x.stop_exc if t._x is not None else None
            if stop is not None:
                await self.fail(t, stop)
            else:
                self.finish(t, "cancelled")
        except Interrupt:
            await self.fail(t, stop_error(t, None))
        except Parked:
            self.parked(t)
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt raised by task code ends that task,
            # not the server: re-raised here it would stop the event loop.
            await self.fail(t, exc)

    async def delayed(self, t: TaskHandle, wake_at: float) -> None:
        """A delayed task waits, pending with ``wake_at`` shown, holding no slot."""
        ctl = ctl_of(t)
        ctl.wake_at = wake_at
        self.saved(t)
        delay = wake_at - _now()
        if delay > 0:
            await asyncio.sleep(delay)
        ctl.wake_at = None

    async def attempts(self, t: TaskHandle, work: Any) -> None:
        spec = Spec("coro", work) if type(work) is _CoroutineType else work
        if spec.kind == "coro" or spec.retries == 0:
            if self.rt._observers:
                result = await self.one(t, spec, last=True)
            else:  # one attempt, nobody watching: no extra coroutine per task
                t._begin_attempt()
                self.saved(t)
                result = await attempt(self.rt, t, spec)
            self.succeed(t, result)
            return
        b = self.rt.backoff
        total = max(1, spec.retries + 1 - t._attempts)
        n = 0
        async for retry in stamina.retry_context(
            on=retryable,
            attempts=total,
            timeout=None,
            wait_initial=b.initial,
            wait_max=b.max,
            wait_jitter=b.jitter,
        ):
            with retry:
                n += 1
                result = await self.one(t, spec, last=n >= total)
        self.succeed(t, result)

    async def one(self, t: TaskHandle, spec: Spec, *, last: bool) -> Any:
        """One attempt, reported to the store and the observers."""
        t._begin_attempt()
        self.saved(t)
        observers = self.rt._observers
        if not observers:
            return await attempt(self.rt, t, spec)
        task = self.observed(t)
        queued = 0.0
        if task.started_at is None:  # the first attempt in this process
            task.started_at = now = _now()
            if t._attempts <= 1:
                queued = max(0.0, now - task.created_at)
        for o in observers:
            safely(o, "attempt_started", task, t._attempts, queued)
        began = time.perf_counter()
        error: BaseException | None = None
        try:
            return await attempt(self.rt, t, spec)
        except Parked:
            raise  # not an outcome: the attempt goes on in a later run
        except BaseException as exc:
            error = exc
            raise
        finally:
            retry = error is not None and not last and retryable(error)
            for o in observers:
                safely(
                    o,
                    "attempt_ended",
                    task,
                    t._attempts,
                    error,
                    will_retry=retry,
                    duration=time.perf_counter() - began,
                )

    def observed(self, t: TaskHandle) -> ObservedTask:
        ctl = ctl_of(t)
        if ctl.observed is None:
            ctl.observed = ObservedTask(t._id, t._name, created_at=t._created_at)
        task: ObservedTask = ctl.observed
        return task

    # ---------------------------------------------------------------- outcomes
    def succeed(self, t: TaskHandle, result: Any) -> None:
        t._result = None if result is None else jsonable(t, result)
        self.finish(t, "succeeded")

    async def fail(self, t: TaskHandle, exc: BaseException) -> None:
        t._failed(exc)
        self.saved(t)
        handlers = self.rt._handlers["unhandledrejection"]
        event = UnhandledRejectionEvent(t.record, exc)
        try:
            if handlers:
                # Bounded: a hung handler must not keep the task (and drain) open.
                bound = max(self.rt.shutdown_grace, HOOK_MIN_TIMEOUT)
                try:
                    await asyncio.wait_for(dispatch(handlers, event), bound)
                except asyncio.TimeoutError:
                    logger.warning(
                        "bgtasks: unhandledrejection handlers for task %s outlasted %.1fs; "
                        "they were cancelled",
                        t._id,
                        bound,
                    )
            if not event.default_prevented:
                logger.error(
                    "bgtasks: task %s (%s) failed after %d attempt(s)",
                    t._id,
                    t._name,
                    t._attempts,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
        finally:  # cancelled in a handler (shutdown) or not: the task has ended
            self.finish(t, "failed")

    def finish(self, t: TaskHandle, status: TaskStatus, *, foreign: bool | None = None) -> None:
        """The last transition of every task, on the loop thread or, for a task
        that ran whole on a worker thread, on that thread. ``foreign``: the task
        is counted as admitted off the loop (by default: if called off the loop)."""
        now = _now()
        ctl = t._x
        callbacks: list[Callable[[], None]] = []
        admission = self.admission
        if foreign is None:
            foreign = _get_ident() != self.loop_thread_id
        if not foreign:
            t._ended(status, now)
            if ctl is not None:
                callbacks, ctl.callbacks = ctl.callbacks, []
            admission.done()
            wake = False
        else:
            with admission.lock:  # the lock add_done_callback and until_idle take
                t._ended(status, now)
                if ctl is not None:
                    callbacks, ctl.callbacks = ctl.callbacks, []
                wake = admission.done_foreign_locked()
        if status != "failed" and self.persist:
            self.rt.store.save(t._snapshot())
        self.registry.finished(t)
        hub = self.rt._hub
        if hub.active:
            hub.notify(t._id)
        observers = self.rt._observers
        if observers:
            task = self.observed(t)
            took = max(0.0, now - task.started_at) if task.started_at is not None else 0.0
            for o in observers:
                safely(o, "finished", task, status, took)
        if foreign and (wake or callbacks):
            if self.loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    self.loop.call_soon_threadsafe(self._after_foreign, t, callbacks)
        elif callbacks:
            self._callbacks(t, callbacks)

    def parked(self, t: TaskHandle) -> None:
        """A durable task parked (``step.sleep``): it leaves this process, holding
        no slot and no memory; the store wakes it (loop thread)."""
        ctl = t._x
        wake_at = ctl.wake_at if ctl is not None else None
        t._task = None
        t._work = None
        if ctl is not None:
            ctl.parked = True
            if ctl.callbacks:  # waiters follow it if it wakes up here
                self.rt._parked_waiters.setdefault(t._id, []).extend(ctl.callbacks)
                ctl.callbacks = []
        self.registry.discard(t._id)
        self.admission.done()
        replay = self.rt._replay
        if replay is not None and wake_at is not None:
            replay.nudge_at(wake_at)

    def _after_foreign(self, t: TaskHandle, callbacks: list[Callable[[], None]]) -> None:
        self._callbacks(t, callbacks)
        self.admission.wake_if_idle()

    @staticmethod
    def _callbacks(t: TaskHandle, callbacks: list[Callable[[], None]]) -> None:
        for cb in callbacks:
            try:
                cb()
            except Exception:
                logger.exception("bgtasks: a done-callback of task %s raised", t._id)

    def add_done_callback(self, t: TaskHandle, cb: Callable[[], None]) -> None:
        """Call ``cb`` (from the loop thread) when ``t`` has finished."""
        loop = self.loop
        if loop is not None and _get_ident() != self.loop_thread_id:
            loop.call_soon_threadsafe(self.add_done_callback, t, cb)
            return
        ctl = ctl_of(t)
        if ctl.parked:  # it left this process: wait for it to wake up here
            self.rt._parked_waiters.setdefault(t._id, []).append(cb)
            return
        with self.admission.lock:  # a direct task finishes on its worker thread, under it
            if t._status not in FINISHED:
                ctl.callbacks.append(cb)
                return
        cb()

    def remove_done_callback(self, t: TaskHandle, cb: Callable[[], None]) -> None:
        """Forget ``cb`` (a waiter that gave up); a no-op if it already ran."""
        loop = self.loop
        if loop is not None and _get_ident() != self.loop_thread_id:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self.remove_done_callback, t, cb)
            return
        ctl = t._x
        if ctl is None:
            return
        if ctl.parked:
            waiters = self.rt._parked_waiters.get(t._id)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(cb)
                if not waiters:
                    del self.rt._parked_waiters[t._id]
            return
        with self.admission.lock, contextlib.suppress(ValueError):
            ctl.callbacks.remove(cb)

    # ---------------------------------------------------------------- stopping
    def stop(self, t: TaskHandle, error: BaseException | None) -> None:
        """Stop ``t`` from any thread: it fails with ``error``, or is cancelled (None)."""
        loop = self.loop
        if loop is not None and _get_ident() != self.loop_thread_id:
            loop.call_soon_threadsafe(self.stop, t, error)
            return
        ctl = ctl_of(t)
        ctl.stop_exc = error
        with self.rt._watchdog.lock:  # the lock a direct task starts under (see _direct)
            slot = ctl.slot
            if slot is not None and slot.interrupt_locked():
                if t._task is None and loop is not None:
                    # A direct task blocked in a system call sees the interrupt only
                    # when the call returns: give it a moment, then let it go.
                    loop.call_later(ABANDON_AFTER, abandon, self.rt, t)
            elif t._task is None and t._status == "pending":
                # Not started (admitted from another thread): it will not start.
                t._status = "cancelled"
        if t._task is not None:
            self.cancel_task(t, t._task)

    def cancel_task(self, t: TaskHandle, task: asyncio.Task[None]) -> None:
        task.cancel()
        # A task cancelled before its first step never runs ``run`` at all: account
        # for it when the asyncio task is done. (Only on this rare path, so the
        # hot path has no done-callback.)
        task.add_done_callback(lambda _: self._finish_unstarted(t))

    def _finish_unstarted(self, t: TaskHandle) -> None:
        if t._finished_at is not None:
            return
        work = t._work
        if isinstance(work, Spec) and work.kind == "coro":
            work = work.fn
        if type(work) is _CoroutineType:
            work.close()  # it never ran: no "never awaited" warning
        self.finish(t, "cancelled")
