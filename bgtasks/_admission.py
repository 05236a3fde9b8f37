"""Admission: how many tasks are unfinished, whether one more may come in, and
waiting until none is left.

Counting is split by thread so the common case needs no lock: ``unfinished``
is changed only on the loop thread; tasks admitted on other threads (a Flask
view, a sync endpoint) count in ``foreign``, under ``lock``, until the loop
takes them over (``spawned``) or they finish on their worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Literal

from ._errors import RegistryFull

__all__ = ["Admission", "Refusal"]

Refusal = Literal["pending", "memory", ""]


class Admission:
    __slots__ = ("_idle_waiters", "foreign", "lock", "loop", "max_pending", "memory_high",
                 "memory_limit", "unfinished")

    def __init__(self, *, max_pending: int | None, memory_limit: int | None) -> None:
        self.max_pending = max_pending
        self.memory_limit = memory_limit
        self.unfinished = 0
        self.foreign = 0
        self.lock = threading.Lock()
        self.memory_high = False  # set by the memory monitor
        self.loop: asyncio.AbstractEventLoop | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []

    def refusal(self) -> Refusal:
        """Why new work is refused now ("" if it is not)."""
        max_pending = self.max_pending
        if max_pending is not None and self.unfinished + self.foreign >= max_pending:
            return "pending"
        return "memory" if self.memory_high else ""

    def admit(self, on_loop: bool) -> Refusal:
        """Count one more unfinished task, or say why not."""
        if on_loop:
            full = self.refusal()
            if not full:
                self.unfinished += 1
            return full
        with self.lock:
            full = self.refusal()
            if not full:
                self.foreign += 1
        return full

    def refused(self, why: Refusal) -> RegistryFull:
        if why == "pending":
            msg = (
                f"too many unfinished tasks (max_pending={self.max_pending}); "
                "retry later or raise Runtime(max_pending=...)."
            )
        else:
            msg = (
                f"process memory is above 90% of memory_limit={self.memory_limit} bytes; "
                "new work is refused until it falls."
            )
        return RegistryFull(msg, retry_after=1.0)

    def retract(self, on_loop: bool) -> None:
        """Undo ``admit`` for a task that will not run; on the thread that admitted it."""
        if on_loop:
            self.unfinished -= 1
            self.wake_if_idle()
            return
        with self.lock:
            self.foreign -= 1
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self.loop.call_soon_threadsafe(self.wake_if_idle)

    def spawned(self) -> None:
        """A task admitted on another thread now runs on the loop (loop thread)."""
        self.unfinished += 1
        with self.lock:
            self.foreign -= 1

    def done(self) -> None:
        """A task on the loop has finished (loop thread)."""
        self.unfinished -= 1
        if not self.unfinished and self._idle_waiters and not self.foreign:
            self.wake_if_idle()

    def done_foreign_locked(self) -> bool:
        """A task on a worker thread has finished; call under ``lock``. True if
        idle waiters must be woken (on the loop)."""
        self.foreign -= 1
        return bool(self._idle_waiters) and not self.foreign and not self.unfinished

    @property
    def idle(self) -> bool:
        return not self.unfinished and not self.foreign

    def wake_if_idle(self) -> None:
        if not self.unfinished and not self.foreign and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def until_idle(self, hooks: Callable[[], list[asyncio.Task[object]]]) -> None:
        """Return once no task is unfinished and no hook task (``hooks()``) runs."""
        loop = asyncio.get_running_loop()
        while True:
            if self.unfinished or self.foreign:
                fut: asyncio.Future[None] = loop.create_future()
                # Under the lock a worker-thread task finishes under: it either sees
                # this waiter or has already made the counts zero.
                with self.lock:
                    self._idle_waiters.append(fut)
                    idle = not self.unfinished and not self.foreign
                if idle:
                    self.wake_if_idle()
                await fut
                continue
            pending = hooks()
            if not pending:
                return
            await asyncio.wait(pending)
