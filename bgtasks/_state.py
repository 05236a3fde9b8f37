"""A task's state and its transitions, and the one place its record is built.

``TaskState`` holds what the runtime knows of one task. Its fields change only
through the transition methods below, called by the runner on the loop thread
(or, for a sync task that runs whole on a worker thread, on that thread under
the admission lock: see ``_direct``). Other threads read a consistent-enough
view: each field is one attribute store, and a record is built from them at once.
``TaskHandle`` (``_handle``) is the public view over this state.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic_core import to_json, to_jsonable_python

from ._task import (
    ErrorInfo,
    Progress,
    StepRecord,
    StepStatus,
    TaskRecord,
    TaskSnapshot,
    TaskStatus,
)

if TYPE_CHECKING:
    from ._enforce import Slot
    from ._runtime import Runtime

__all__ = ["Ctl", "StepBook", "StepState", "TaskState", "book_of", "ctl_of", "jsonable", "utc"]

_now = time.time
logger = logging.getLogger("bgtasks")


def utc(ts: float | None) -> _dt.datetime | None:
    """A Unix time as an aware UTC datetime (None stays None)."""
    return None if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)


class StepState:
    """One step's state (see ``_steps``); its record is built by ``to_record``."""

    __slots__ = (
        "_cached",
        "attempts",
        "error",
        "finished_at",
        "name",
        "started_at",
        "status",
        "wake_at",
    )

    def __init__(self, name: str, status: StepStatus) -> None:
        self.name = name
        self.status: StepStatus = status
        self.attempts = 0
        self.started_at: float | None = _now()
        self.finished_at: float | None = None
        self.error: ErrorInfo | None = None
        self.wake_at: float | None = None  # a sleep's wake-up time, fixed when first reached
        self._cached: tuple[tuple[Any, ...], StepRecord] | None = None

    def to_record(self) -> StepRecord:
        """The step's record, rebuilt only when the step changed (a task's every
        snapshot holds all its steps)."""
        key = (self.status, self.attempts, self.started_at, self.finished_at, self.error)
        cached = self._cached
        if cached is not None and cached[0] == key:
            return cached[1]
        record = StepRecord.model_construct(
            name=self.name,
            status=self.status,
            attempts=self.attempts,
            started_at=utc(self.started_at),
            finished_at=utc(self.finished_at),
            error=self.error,
        )
        self._cached = (key, record)
        return record


class StepBook:
    """A task's steps: in the order they first ran; kept results by step name
    (the task's life); calls of each name in this run (reset per attempt)."""

    __slots__ = ("counts", "kept", "steps")

    def __init__(self) -> None:
        self.steps: dict[str, StepState] = {}
        self.kept: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def records(self) -> tuple[StepState, ...]:
        """The steps, copied (parallel steps add to them meanwhile)."""
        return tuple(self.steps.values())


def book_of(ctl: Ctl) -> StepBook:
    book = ctl.book
    if book is None:
        book = ctl.book = StepBook()
    return book


class Ctl:
    """Per-task control state, created only for tasks that need it (limits,
    waiters, stops, steps), so the common task stays small."""

    __slots__ = (
        "book",
        "callbacks",
        "claimed",
        "durable",
        "observed",
        "parked",
        "paused",
        "sleepers",
        "slot",
        "stop_exc",
        "wake_at",
        "wall",
    )

    def __init__(self) -> None:
        self.slot: Slot | None = None
        self.stop_exc: BaseException | None = None  # the error a stop fails the task with
        self.callbacks: list[Callable[[], None]] = []  # run once the task has finished
        self.claimed = False  # a direct task's ending is being recorded
        self.observed: Any = None  # the ObservedTask, when observers are registered
        self.durable = False  # journaled: kept steps live in the store
        self.book: StepBook | None = None  # steps, only for tasks that use them
        self.wake_at: float | None = None  # pending until then (a delay or a sleep)
        self.wall: list[Any] | None = None  # the attempt's wall-clock deadline (see _attempt)
        # while asleep: (since, seconds left on the armed deadline, its callback, args)
        self.paused: tuple[float, float, Any, tuple[Any, ...]] | None = None
        self.sleepers = 0  # steps sleeping now (parallel sleeps pause the clock once)
        self.parked = False  # a durable task that parked: its state is the store's now


def ctl_of(t: TaskState) -> Ctl:
    ctl: Ctl | None = t._x
    if ctl is None:
        ctl = t._x = Ctl()
    return ctl


class TaskState:
    """One task's state. Everything here is private to the runtime."""

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
        self._task: asyncio.Task[None] | None = None  # the asyncio task running it
        self._work: Any = None  # a coroutine or a Spec, until it finishes
        self._x: Ctl | None = None

    # ---------------------------------------------------------------- transitions
    def _begin_attempt(self) -> None:
        """pending -> running (or running again, for a retry)."""
        self._status = "running"
        self._attempts += 1
        self._started_at = _now()
        x = self._x
        if x is not None:
            x.stop_exc = None
            if x.book is not None:
                x.book.counts = {}

    def _failed(self, exc: BaseException) -> None:
        """running -> failed; the hooks still run before ``_ended``."""
        self._error = ErrorInfo(type=type(exc).__name__, message=str(exc))
        if self._started_at is None:
            self._started_at = _now()
        self._status = "failed"
        self._finished_at = _now()

    def _ended(self, status: TaskStatus, now: float) -> None:
        """The last transition: the task holds no work any more."""
        if status != "failed" or self._finished_at is None:
            self._finished_at = now
        self._status = status
        self._task = None
        self._work = None

    def _report_progress(self, done: float, total: float | None, message: str | None) -> None:
        self._progress = Progress(done=done, total=total, message=message)
        self._rt._runner.saved(self)

    def _snapshot(self) -> TaskSnapshot:
        """The immutable state a store receives (never the live state)."""
        x = self._x
        steps: tuple[StepRecord, ...] = ()
        wake_at = None
        if x is not None:
            if x.book is not None and x.book.steps:
                steps = tuple(st.to_record() for st in x.book.records())
            wake_at = x.wake_at
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
            wake_at=wake_at,
            steps=steps,
        )

    # ---------------------------------------------------------------- the record
    def _to_record(self) -> TaskRecord:
        """The task's record now: built here and nowhere else."""
        x = self._x
        book = None if x is None else x.book
        return TaskRecord.model_construct(
            id=self._id,
            name=self._name,
            status=self._status,
            created_at=utc(self._created_at),
            started_at=utc(self._started_at),
            finished_at=utc(self._finished_at),
            attempts=self._attempts,
            error=self._error,
            result=self._result,
            progress=self._progress,
            steps=[] if book is None else [st.to_record() for st in book.records()],
            wake_at=None if x is None else utc(x.wake_at),
        )


def jsonable(t: TaskState, result: Any) -> Any:
    """``result`` as a JSON value for the record (None, logged, if it cannot be)."""
    if result is None:
        return None
    try:
        value = to_jsonable_python(result)
        limit = t._rt.max_result_bytes
        if limit is not None:
            size = len(to_json(value))
            if size > limit:
                logger.warning(
                    "bgtasks: the result of task %s (%s) is %d bytes of JSON, over "
                    "max_result_bytes=%d; its record keeps result=null",
                    t._id,
                    t._name,
                    size,
                    limit,
                )
                return None
        return value
    except Exception:
        logger.warning(
            "bgtasks: the result of task %s (%s) is not JSON-serialisable "
            "(%s); its record keeps result=null",
            t._id,
            t._name,
            type(result).__name__,
        )
        return None
