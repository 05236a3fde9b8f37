"""TaskHandle: the public view of one task's state."""

from __future__ import annotations

import asyncio
import threading

from ._state import TaskState
from ._task import FINISHED, TaskRecord, TaskStatus

__all__ = ["TaskHandle"]


class TaskHandle(TaskState):
    """A reference to one scheduled task.

    Returned by ``wait_until`` and by ``@background`` functions called outside a
    request. ``.record`` is a fresh snapshot each time it is read.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<TaskHandle id={self._id!r} name={self._name!r} status={self._status!r}>"

    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str:
        return self._name

    @property
    def status(self) -> TaskStatus:
        if self._x is not None and self._x.parked:
            return self.record.status
        return self._status

    @property
    def record(self) -> TaskRecord:
        """A fresh snapshot of the task."""
        x = self._x
        if x is not None and x.parked:  # it parked: the store (or its next run) knows
            rt = self._rt
            live = rt._registry.get(self._id)
            found = live.record if live is not None else rt.get(self._id)
            if found is not None:
                return found
        return self._to_record()

    def cancel(self) -> bool:
        """Cancel the task; False if it had already finished."""
        return self._rt.cancel(self._id)

    async def wait(self, timeout: float | None = None) -> TaskRecord:
        """Wait until the task has finished and return its record.

        Raises ``TimeoutError`` if ``timeout`` seconds pass first. Works from any
        event loop, not only the runtime's.
        """
        if self.status not in FINISHED:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            runner = self._rt._runner

            def wake() -> None:
                if not fut.done():
                    fut.set_result(None)

            def on_done() -> None:
                if runner.on_loop_thread() and loop is runner.loop:
                    wake()
                else:
                    loop.call_soon_threadsafe(wake)

            runner.add_done_callback(self, on_done)
            try:
                if timeout is None:
                    await fut
                else:
                    await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                runner.remove_done_callback(self, on_done)  # polling must not pile them up
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg) from None
        return self.record

    def wait_sync(self, timeout: float | None = None) -> TaskRecord:
        """Block this (non-event-loop) thread until the task has finished."""
        if self.status not in FINISHED:
            ev = threading.Event()
            runner = self._rt._runner
            runner.add_done_callback(self, ev.set)
            if not ev.wait(timeout):
                runner.remove_done_callback(self, ev.set)
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg)
        return self.record
