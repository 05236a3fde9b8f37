"""TaskRecord, TaskStatus, ErrorInfo and StepRecord (the wire shape), and the
immutable TaskSnapshot a store receives."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from typing import TYPE_CHECKING, Any, Literal

import pydantic

if TYPE_CHECKING:
    pass

__all__ = [
    "ErrorInfo",
    "Progress",
    "StepRecord",
    "StepStatus",
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
