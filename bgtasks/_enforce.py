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
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["Interrupt", "Slot", "Watchdog", "metered"]

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
        "_lock",
        "armed_thread",
        "cpu_base",
        "cpu_budget",
        "fired",
        "on_fire",
        "on_warn",
        "step_start",
        "warned",
    )

    def __init__(
        self,
        cpu_budget: float | None,
        on_warn: Callable[[], None] | None = None,
        on_fire: Callable[[], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.armed_thread: int | None = None
        self.cpu_base = 0.0  # CPU used by finished steps
        self.step_start = 0.0  # thread CPU clock when the current step began
        self.cpu_budget = cpu_budget
        self.fired = False
        self.warned = False
        self.on_warn = on_warn
        self.on_fire = on_fire

    # --- the task's side -------------------------------------------------
    def arm(self) -> None:
        """The task's code is about to run on this thread."""
        self.step_start = _thread_time()
        self.armed_thread = threading.get_ident()

    def disarm(self) -> None:
        """The task's code has stopped running on this thread (for now).

        Call through ``disarm_safely``: an interrupt fired just before can be
        raised inside this method.
        """
        with self._lock:
            tid = self.armed_thread
            if tid is None:
                return
            self.armed_thread = None
            self.cpu_base += _thread_time() - self.step_start
            if self.fired:
                # Fired but maybe not yet raised: make sure it never is.
                _set_async_exc(tid, ctypes.py_object())

    def disarm_safely(self) -> None:
        while True:
            try:
                self.disarm()
                return
            except Interrupt:
                continue

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
        with self._lock:
            tid = self.armed_thread
            if tid is None or self.fired:
                return False
            self.fired = True
            _set_async_exc(tid, Interrupt)
            return True


def metered(coro: Any, slot: Slot) -> Generator[Any, Any, Any]:
    """Drive ``coro`` step by step, counting the loop thread's CPU per step.

    Used as ``await _Awaitable(metered(coro, slot))``; see ``Metered``.
    Raises ``Interrupt`` when the watchdog stopped a step or the budget is
    spent at the end of one (the coroutine is closed first).
    """
    send = coro.send
    throw = coro.throw
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            slot.arm()
            try:
                yielded = send(value) if error is None else throw(error)
            finally:
                slot.disarm_safely()
        except StopIteration as stop:
            return stop.value
        except Interrupt:
            coro.close()
            raise
        if slot.over_budget:
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
    """A daemon thread that stops tasks over their CPU budget.

    It looks at the watched slots every ``interval`` seconds; each look costs
    one clock read per watched slot. It sleeps while nothing is watched.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self._slots: set[Slot] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self, slot: Slot) -> None:
        with self._lock:
            self._slots.add(slot)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="bgtasks-watchdog", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def unwatch(self, slot: Slot) -> None:
        with self._lock:
            self._slots.discard(slot)

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                slots = tuple(self._slots)
            if not slots:
                self._wake.wait()
                self._wake.clear()
                continue
            for slot in slots:
                budget = slot.cpu_budget
                if budget is None:
                    continue
                used = slot.cpu_used()
                if not slot.warned and used >= 0.9 * budget:
                    slot.warned = True
                    if slot.on_warn is not None:
                        slot.on_warn()
                if used >= budget and slot.interrupt() and slot.on_fire is not None:
                    slot.on_fire()
            time.sleep(self.interval)
