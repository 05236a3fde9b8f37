"""TaskRecord, TaskStatus, ErrorInfo and StepRecord (the wire shape), the
immutable TaskSnapshot a store receives, and TaskHandle."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import threading
import time
from typing import TYPE_CHECKING, Any, Literal

import pydantic

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = [
    "ErrorInfo",
    "Progress",
    "StepRecord",
    "StepStatus",
    "TaskHandle",
    "TaskRecord",
    "TaskSnapshot",
    "TaskStatus",
]

TaskStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
StepStatus = Literal["running", "succeeded", "failed", "sleeping"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
_now = time.time


class ErrorInfo(pydantic.BaseModel):
    """Why a task failed: the exception's type name and message."""

    model_config = pydantic.ConfigDict(frozen=True)

    type: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        return cls(type=type(exc).__name__, message=str(exc))


class Progress(pydantic.BaseModel):
    """What a task last said about its progress."""

    model_config = pydantic.ConfigDict(frozen=True)

    done: float
    total: float | None = None
    message: str | None = None


class StepRecord(pydantic.BaseModel):
    """One step of a task, as the status route shows it (see ``bgtasks.step``)."""

    model_config = pydantic.ConfigDict(frozen=True)

    name: str
    status: StepStatus
    attempts: int = 0
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None
    error: ErrorInfo | None = None


class TaskRecord(pydantic.BaseModel):
    """A snapshot of one task: the JSON the status route returns."""

    model_config = pydantic.ConfigDict(frozen=True)

    id: str
    name: str
    status: TaskStatus
    created_at: _dt.datetime
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None
    attempts: int = 0
    error: ErrorInfo | None = None
    result: pydantic.JsonValue = None
    progress: Progress | None = None
    steps: list[StepRecord] = []
    wake_at: _dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _utc(ts: float | None) -> _dt.datetime | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskSnapshot:
    """One task's state at one transition, as a store receives it.

    Immutable, so a store may keep it and write it later from another thread.
    Times are Unix timestamps (``time.time()``); ``result`` is a JSON value.
    It is re-exported by ``bgtasks.stores.base``, where the Store protocol is.
    """

    id: str
    name: str
    status: TaskStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    error: ErrorInfo | None = None
    result: Any = None
    progress: Progress | None = None
    wake_at: float | None = None
    steps: tuple[StepRecord, ...] = ()

    def record(self, *, include_result: bool = True) -> TaskRecord:
        """The TaskRecord of this snapshot: the one place a record is built from one."""
        return TaskRecord.model_construct(
            id=self.id,
            name=self.name,
            status=self.status,
            created_at=_utc(self.created_at),
            started_at=_utc(self.started_at),
            finished_at=_utc(self.finished_at),
            attempts=self.attempts,
            error=self.error,
            result=self.result if include_result else None,
            progress=self.progress,
            steps=list(self.steps),
            wake_at=_utc(self.wake_at),
        )


class TaskHandle:
    """A reference to one scheduled task.

    Returned by ``wait_until`` and by ``@background`` functions called outside a
    request. ``.record`` is a fresh snapshot each time it is read.
    """

    # The handle is also the runtime's live state of the task: one object per
    # task keeps wait_until cheap. Everything but the public properties is private.
    __slots__ = (
        "__weakref__",
        "_attempts",
        "_created_at",
        "_error",
        "_finished_at",
        "_id",
        "_name",
        "_progress",
        "_result",
        "_rt",
        "_started_at",
        "_status",
        "_task",
        "_work",
        "_x",
    )

    def __init__(self, rt: Runtime, task_id: str, name: str) -> None:
        self._rt = rt
        self._id = task_id
        self._name = name
        self._status: TaskStatus = "pending"
        self._created_at = _now()
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self._attempts = 0
        self._error: ErrorInfo | None = None
        self._result: Any = None
        self._progress: Progress | None = None
        self._task: asyncio.Task[None] | None = None
        self._work: Any = None
        # Rarely used state (limits, thread, waiters...) lives in a side object
        # created on demand, so the common task stays small.
        self._x: Any = None

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
        return self._status

    @property
    def record(self) -> TaskRecord:
        """A fresh snapshot of the task."""
        return TaskRecord.model_construct(
            id=self._id,
            name=self._name,
            status=self._status,
            created_at=_utc(self._created_at),
            started_at=_utc(self._started_at),
            finished_at=_utc(self._finished_at),
            attempts=self._attempts,
            error=self._error,
            result=self._result,
            progress=self._progress,
            steps=[],
            wake_at=None,
        )

    def _snapshot(self) -> TaskSnapshot:
        """The immutable state a store receives (never the live handle)."""
        return TaskSnapshot(
            id=self._id,
            name=self._name,
            status=self._status,
            created_at=self._created_at,
            started_at=self._started_at,
            finished_at=self._finished_at,
            attempts=self._attempts,
            error=self._error,
            result=self._result,
            progress=self._progress,
        )

    def _report_progress(self, done: float, total: float | None, message: str | None) -> None:
        self._progress = Progress(done=done, total=total, message=message)
        rt = self._rt
        if rt._persist:
            rt.store.save(self._snapshot())

    def cancel(self) -> bool:
        """Cancel the task; False if it had already finished."""
        return self._rt.cancel(self._id)

    async def wait(self, timeout: float | None = None) -> TaskRecord:
        """Wait until the task has finished and return its record.

        Raises ``TimeoutError`` if ``timeout`` seconds pass first. Works from any
        event loop, not only the runtime's.
        """
        if self._status not in FINISHED:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                if not fut.done():
                    fut.set_result(None)

            def on_done() -> None:
                if threading.get_ident() == self._rt._loop_thread_id and loop is self._rt._loop:
                    wake()
                else:
                    loop.call_soon_threadsafe(wake)

            self._rt._add_done_callback(self, on_done)
            try:
                if timeout is None:
                    await fut
                else:
                    await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                self._rt._remove_done_callback(self, on_done)  # polling must not pile them up
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg) from None
        return self.record

    def wait_sync(self, timeout: float | None = None) -> TaskRecord:
        """Block this (non-event-loop) thread until the task has finished."""
        if self._status not in FINISHED:
            ev = threading.Event()
            self._rt._add_done_callback(self, ev.set)
            if not ev.wait(timeout):
                self._rt._remove_done_callback(self, ev.set)
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg)
        return self.record
