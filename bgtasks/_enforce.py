"""Limit enforcement: interrupting a thread, the CPU meter and the watchdog.

A coroutine that never yields, or a sync function in a worker thread, cannot
be stopped by cancellation. We stop it by raising an exception *into its
thread* with ``PyThreadState_SetAsyncExc``; the interpreter raises it at the
next bytecode boundary. That can land anywhere in the thread, so a ``Slot``
is "armed" only while the task's own code runs, and an interrupt fired at it
is never left pending once it is disarmed (the protocol is explained at
``Slot.interrupt_locked``). Code blocked in a system call (``time.sleep``, a
socket read) sees the interrupt only when the call returns.

Reading a thread's CPU clock is a system call (no vDSO on Linux for CPU-time
clocks), about 0.6 µs, and the dominant cost of metering short coroutine
steps. On the loop thread the meter therefore reads it only when its last
reading is more than ``EXTRAPOLATE`` old, and otherwise extrapolates it with
the monotonic clock (a vDSO read, ~0.05 µs): a thread's CPU clock cannot run
faster than the wall clock, so the estimate is exact unless the thread was
off the CPU during that short window, and errs by at most that much.
"""

from __future__ import annotations

import ctypes
import heapq
import threading
import time
import types
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["EXTRAPOLATE", "Deadlines", "Interrupt", "Slot", "Watchdog", "metered"]

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int
_NO_EXC = ctypes.py_object()  # NULL: clears a thread's pending asynchronous exception
_thread_time = time.thread_time
_wall = time.perf_counter
_get_ident = threading.get_ident

EXTRAPOLATE = 50e-6
"""Longest wall-clock time (seconds) over which the loop thread's CPU clock is
extrapolated instead of read. Each step's charge is exact except for time the
thread spent off the CPU (blocked, preempted, waiting for the GIL) in windows
shorter than this; longer absences are always seen, because they force a
reading. 0 reads the clock at every step boundary."""


class Interrupt(BaseException):
    """Raised into a task's thread to stop it; never seen by users' handlers
    that catch ``Exception``."""


def _thread_cpu(thread_id: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread_id))


class _Anchor:
    """The last real reading of one thread's CPU clock, and when it was taken."""

    __slots__ = ("cpu", "wall")

    def __init__(self) -> None:
        self.wall = float("-inf")  # forces a reading first
        self.cpu = 0.0


_anchors = threading.local()  # per thread: a thread's CPU clock is its own


def _anchor() -> _Anchor:
    anchor: _Anchor | None = getattr(_anchors, "anchor", None)
    if anchor is None:
        anchor = _anchors.anchor = _Anchor()
    return anchor


class Slot:
    """The interruptible state of one task: where it runs and what it used."""

    __slots__ = (
        "armed_thread",
        "cpu_base",
        "cpu_budget",
        "fired",
        "firing",
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
        self.firing = False  # an interrupt is being or was fired: disarm must lock
        self.fired = False  # the interrupt was raised into armed_thread
        self.warned = False
        self.on_warn = on_warn

    # --- the task's side -------------------------------------------------
    def arm(self) -> None:
        """The task's code is about to run on this thread."""
        tid = _get_ident()
        if self.cpu_budget is not None:  # without a budget nobody reads the CPU clock
            self.step_start = _thread_time()
            self.armed_thread = tid
            self.watchdog.armed[tid] = self
        else:
            self.armed_thread = tid

    def disarm_safely(self) -> None:
        """The task's code has stopped running on this thread (for now).

        An interrupt fired just before can still be raised in here: it is
        caught (the task is being stopped anyway, and its stopper says why)
        and the disarm finished.
        """
        tid = self.armed_thread
        if tid is None:
            return
        while True:
            try:
                self.armed_thread = None  # (a) in Slot.interrupt_locked
                if self.firing:  # (b)
                    self.settle(tid)  # (c)
                break
            except Interrupt:
                continue
        # Disarmed and settled: no interrupt is pending or can be fired now.
        budget = self.cpu_budget
        if budget is None:  # never in the watchdog's table, and not metered
            return
        armed = self.watchdog.armed
        if armed.get(tid) is self:
            del armed[tid]
        self.cpu_base += max(0.0, _thread_time() - self.step_start)
        if not self.warned and self.cpu_base >= 0.9 * budget:
            self.warn()

    def settle(self, tid: int) -> None:
        """After ``armed_thread = None`` when ``firing`` is set: wait until the
        firer is done, then make sure an interrupt it fired is never raised."""
        while True:
            try:
                with self.watchdog.lock:
                    if self.fired:
                        _set_async_exc(tid, _NO_EXC)  # raised already: a no-op
                return
            except Interrupt:  # raised before it was cleared: nothing is pending now
                continue

    def warn(self) -> None:
        """Call ``on_warn`` once (the task and the watchdog may both get here)."""
        with self.watchdog.lock:
            if self.warned:
                return
            self.warned = True
        if self.on_warn is not None:
            self.on_warn()

    def cpu_used(self) -> float:
        """CPU used so far, from any thread (the watchdog's view)."""
        start = self.step_start
        base = self.cpu_base
        tid = self.armed_thread
        if tid is None:
            return self.cpu_base
        try:
            now = _thread_cpu(tid)
        except OSError:  # the thread is gone
            return self.cpu_base
        if self.step_start is not start or self.armed_thread is None:
            # The step ended while we looked: ``base`` may already count it.
            return self.cpu_base
        # The same step ran throughout, so ``base`` did not include it yet.
        return base + max(0.0, now - start)

    @property
    def over_budget(self) -> bool:
        return self.cpu_budget is not None and self.cpu_base >= self.cpu_budget

    # --- anyone else's side -----------------------------------------------
    def interrupt(self) -> bool:
        """Raise ``Interrupt`` in the task's thread if its code is running there."""
        with self.watchdog.lock:
            return self.interrupt_locked()

    def interrupt_locked(self) -> bool:
        """``interrupt`` for a caller that holds ``watchdog.lock``.

        The safety argument. Every thread runs Python bytecode only while it
        holds the GIL (CPython with a GIL; ``_set_async_exc`` goes through
        ``ctypes.pythonapi``, which keeps it), so the steps below and the
        task's disarm happen in one total order. Firing is (1) ``firing = True``, (2) read
        ``armed_thread``, (3) ``PyThreadState_SetAsyncExc`` if it was set, all
        under ``watchdog.lock`` (which also keeps two firers apart). Disarming
        is (a) ``armed_thread = None``, (b) read ``firing``, (c) if it was
        set, take the lock and clear the thread's pending exception if (3)
        happened. If (b) saw False, (1) came after (b), so (2) came after (a)
        and saw None: nothing is fired at this step. If (b) saw True, (c)
        waits for the firer's lock, after which (3) has happened or never
        will for this step, and clears what (3) left pending. Either way no
        ``Interrupt`` is pending once disarm returns; until then it can land
        only in the task's own step or in disarm itself (whose callers retry
        or treat it as the stop it is). ``fired`` makes (3) happen at most
        once per slot, so after it has been raised nothing more can come.
        The common disarm (nobody fired) takes no lock: one store, one load.
        """
        if self.fired:
            return False
        self.firing = True  # (1): before (2), see above
        tid = self.armed_thread  # (2)
        if tid is None:
            return False
        self.fired = True
        _set_async_exc(tid, Interrupt)  # (3)
        return True


@types.coroutine
def metered(coro: Any, slot: Slot) -> Generator[Any, Any, Any]:
    """Await ``coro`` step by step, charging each step's CPU to ``slot``.

    ``metered(coro, slot)`` is awaitable itself (a generator-based coroutine):
    no wrapper object and no ``__await__`` call per task.

    Raises ``Interrupt`` when the watchdog stopped a step or the budget is
    spent at the end of one (the coroutine is closed first). This runs once
    per step of every CPU-limited coroutine, so ``Slot.arm`` and
    ``Slot.disarm_safely`` are inlined, and the thread's CPU clock is extrapolated
    from a recent reading when there is one (see ``EXTRAPOLATE``).
    """
    # No locals bound to ``coro.send``/``coro.throw``: each would be one more
    # long-lived object for the garbage collector to track, per task.
    armed = slot.watchdog.armed
    tid = _get_ident()
    anchor = _anchor()
    wall = _wall
    cpu = _thread_time
    window = EXTRAPOLATE
    budget = slot.cpu_budget
    if budget is None:
        check = budget = float("inf")
    else:
        check = 0.9 * budget  # then ``budget`` once warned
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                try:
                    # arm: the thread's CPU clock now, read or extrapolated
                    now = wall()
                    if now - anchor.wall > window:
                        anchor.wall = now
                        anchor.cpu = start = cpu()
                    else:
                        start = anchor.cpu + (now - anchor.wall)
                    slot.step_start = start
                    slot.armed_thread = tid
                    armed[tid] = slot
                    yielded = coro.send(value) if error is None else coro.throw(error)
                finally:
                    # disarm without a lock unless someone fired: (a), (b), (c)
                    # of the protocol in Slot.interrupt_locked
                    slot.armed_thread = None  # (a)
                    if slot.firing:  # (b)
                        slot.settle(tid)  # (c)
                    now = wall()
                    if now - anchor.wall > window:
                        anchor.wall = now
                        anchor.cpu = end = cpu()
                    else:
                        end = anchor.cpu + (now - anchor.wall)
                    if end > start:
                        slot.cpu_base += end - start
            except StopIteration as stop:
                return stop.value
            except Interrupt:
                # Fired at this step (raised in it, or in the disarm above).
                coro.close()
                raise
            if slot.cpu_base >= check:
                if slot.cpu_base >= budget:
                    coro.close()
                    raise Interrupt
                slot.warn()
                check = budget
            try:
                value = yield yielded
                error = None
            except BaseException as exc:  # cancellation and friends go to the coroutine
                value = None
                error = exc
    finally:
        if armed.get(tid) is slot:
            del armed[tid]



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
        self.armed: dict[int, Slot] = {}  # thread id -> the slot last armed there
        # One item per watched task: list.append and list.pop are atomic under
        # the GIL, so watch/unwatch need no lock from any thread.
        self._watched: list[None] = []
        self._sleeping = False
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def watch(self) -> None:
        """A CPU-limited task started: poll while it lives."""
        self._watched.append(None)
        # (1) append, (2) read _sleeping; the thread does (3) _sleeping = True,
        # (4) read _watched: if (2) saw False, (4) sees the item and it polls on.
        if self._sleeping:
            self._wake.set()
        if self._thread is None:
            self._start()

    def unwatch(self) -> None:
        self._watched.pop()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _start(self) -> None:
        with self.lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="bgtasks-watchdog", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            if not self._watched:
                self._wake.clear()
                self._sleeping = True  # (3)
                if not self._watched and not self._closed:  # (4)
                    self._wake.wait()
                self._sleeping = False
                continue
            for slot in tuple(self.armed.values()):
                budget = slot.cpu_budget
                if budget is None or slot.armed_thread is None:
                    continue  # between steps: the task checks at the end of each
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
