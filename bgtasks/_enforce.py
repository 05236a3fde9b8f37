"""Limit enforcement: interrupting a thread, the CPU meter and the watchdog.

A coroutine that never yields, or a sync function in a worker thread, cannot
be stopped by cancellation. We stop it by raising an exception *into its
thread* with ``PyThreadState_SetAsyncExc``; the interpreter raises it at the
next bytecode boundary. That can land anywhere in the thread, so a ``Slot``
is "armed" only while the task's own code runs, and disarming takes the same
lock as firing: an interrupt is never left pending in code that is not the
task's. Code blocked in a system call (``time.sleep``, a socket read) sees
the interrupt only when the call returns.
"""

from __future__ import annotations

import ctypes
import heapq
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["Deadlines", "Interrupt", "Metered", "Slot", "Watchdog"]

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int
_clear_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_thread_time = time.thread_time


class Interrupt(BaseException):
    """Raised into a task's thread to stop it; never seen by users' handlers
    that catch ``Exception``."""


def _thread_cpu(thread_id: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread_id))


class Slot:
    """The interruptible state of one task: where it runs and what it used."""

    __slots__ = (
        "armed_thread",
        "cpu_base",
        "cpu_budget",
        "fired",
        "on_warn",
        "step_start",
        "warned",
        "watchdog",
    )

    def __init__(
        self,
        watchdog: Watchdog,
        cpu_budget: float | None,
        on_warn: Callable[[], None] | None = None,
    ) -> None:
        self.watchdog = watchdog
        self.armed_thread: int | None = None
        self.cpu_base = 0.0  # CPU used by finished steps
        self.step_start = 0.0  # thread CPU clock when the current step began
        self.cpu_budget = cpu_budget
        self.fired = False
        self.warned = False
        self.on_warn = on_warn

    # --- the task's side -------------------------------------------------
    def arm(self) -> None:
        """The task's code is about to run on this thread."""
        self.step_start = _thread_time()
        tid = threading.get_ident()
        self.armed_thread = tid
        if self.cpu_budget is not None:
            self.watchdog.armed[tid] = self

    def disarm(self) -> None:
        """The task's code has stopped running on this thread (for now).

        Call through ``disarm_safely``: an interrupt fired just before can be
        raised inside this method.
        """
        with self.watchdog.lock:
            tid = self.armed_thread
            if tid is None:
                return
            self.armed_thread = None
            armed = self.watchdog.armed
            if armed.get(tid) is self:
                del armed[tid]
            self.cpu_base += _thread_time() - self.step_start
            if self.fired:
                # Fired but maybe not yet raised: make sure it never is.
                _set_async_exc(tid, ctypes.py_object())
        budget = self.cpu_budget
        if budget is not None and not self.warned and self.cpu_base >= 0.9 * budget:
            self.warn()

    def disarm_safely(self) -> None:
        while True:
            try:
                self.disarm()
                return
            except Interrupt:
                continue

    def warn(self) -> None:
        self.warned = True
        if self.on_warn is not None:
            self.on_warn()

    def cpu_used(self) -> float:
        tid = self.armed_thread
        if tid is None:
            return self.cpu_base
        try:
            return self.cpu_base + max(0.0, _thread_cpu(tid) - self.step_start)
        except OSError:  # the thread is gone
            return self.cpu_base

    @property
    def over_budget(self) -> bool:
        return self.cpu_budget is not None and self.cpu_base >= self.cpu_budget

    # --- anyone else's side -----------------------------------------------
    def interrupt(self) -> bool:
        """Raise ``Interrupt`` in the task's thread if its code is running there."""
        with self.watchdog.lock:
            return self.interrupt_locked()

    def interrupt_locked(self) -> bool:
        """``interrupt`` for a caller that holds ``watchdog.lock``."""
        tid = self.armed_thread
        if tid is None or self.fired:
            return False
        self.fired = True
        _set_async_exc(tid, Interrupt)
        return True


def metered(coro: Any, slot: Slot) -> Generator[Any, Any, Any]:
    """Drive ``coro`` step by step, counting the loop thread's CPU per step.

    Raises ``Interrupt`` when the watchdog stopped a step or the budget is
    spent at the end of one (the coroutine is closed first). ``Slot.arm`` is
    inlined: this runs once per step of every CPU-limited coroutine.
    """
    send = coro.send
    throw = coro.throw
    armed = slot.watchdog.armed
    tid = threading.get_ident()
    budget = slot.cpu_budget
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            slot.step_start = _thread_time()
            slot.armed_thread = tid
            armed[tid] = slot
            try:
                yielded = send(value) if error is None else throw(error)
            finally:
                slot.disarm_safely()
        except StopIteration as stop:
            return stop.value
        except Interrupt:
            coro.close()
            raise
        if budget is not None and slot.cpu_base >= budget:
            coro.close()
            raise Interrupt
        try:
            value = yield yielded
            error = None
        except BaseException as exc:  # cancellation and friends go to the coroutine
            value = None
            error = exc


class Metered:
    """An awaitable running a coroutine under a CPU meter."""

    __slots__ = ("_gen",)

    def __init__(self, coro: Any, slot: Slot) -> None:
        self._gen = metered(coro, slot)

    def __await__(self) -> Generator[Any, Any, Any]:
        return self._gen


class Watchdog:
    """A daemon thread that stops task code running past its CPU budget.

    Only code that is running *now* can go over budget between two checks, so
    it looks only at the armed slots: at most one per thread (the loop thread
    and the workers running sync tasks). It polls every ``interval`` seconds
    while CPU-limited tasks exist, and sleeps otherwise.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.lock = threading.Lock()
        self.armed: dict[int, Slot] = {}  # thread id -> the slot running there
        self._watched = 0
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self) -> None:
        """A CPU-limited task started: poll while it lives."""
        with self.lock:
            self._watched += 1
            first = self._watched == 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="bgtasks-watchdog", daemon=True
                )
                self._thread.start()
        if first:
            self._wake.set()

    def unwatch(self) -> None:
        with self.lock:
            self._watched -= 1

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            if not self._watched:
                self._wake.wait()
                self._wake.clear()
                continue
            for slot in tuple(self.armed.values()):
                budget = slot.cpu_budget
                if budget is None:
                    continue
                used = slot.cpu_used()
                if not slot.warned and used >= 0.9 * budget:
                    slot.warn()
                if used >= budget:
                    slot.interrupt()
            time.sleep(self.interval)


class Deadlines:
    """Many deadlines on one event-loop timer.

    ``loop.call_later`` per task costs a Python-level heap of ``TimerHandle``
    objects and a re-heapify whenever half of them are cancelled, which is the
    common case here (tasks finish before their limits). This heap holds plain
    lists compared in C, cancels by marking, and keeps one loop timer armed
    for the earliest live deadline.
    """

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._heap: list[list[Any]] = []
        self._seq = 0
        self._dead = 0
        self._timer: Any = None
        self._timer_at = float("inf")

    def add(self, delay: float, callback: Callable[..., None], *args: Any) -> list[Any]:
        """Call ``callback(*args)`` in ``delay`` seconds; returns a cancellable entry."""
        when = self._loop.time() + delay
        self._seq += 1
        entry = [when, self._seq, callback, args]
        heapq.heappush(self._heap, entry)
        if when < self._timer_at:
            self._arm(when)
        return entry

    def cancel(self, entry: list[Any]) -> None:
        if entry[2] is not None:
            entry[2] = None
            entry[3] = ()
            self._dead += 1
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._dead = 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._heap.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0][0] <= now:
            _, _, callback, args = heapq.heappop(heap)
            if callback is None:
                self._dead -= 1
                continue
            callback(*args)
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._dead -= 1
        if heap:
            self._arm(heap[0][0])
