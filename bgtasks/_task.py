"""TaskRecord, TaskStatus, ErrorInfo and Progress: the wire shape of a task."""

from __future__ import annotations

import datetime as _dt
import time
from typing import TYPE_CHECKING, Literal

import pydantic

if TYPE_CHECKING:
    pass

__all__ = ["ErrorInfo", "Progress", "StepRecord", "StepStatus", "TaskRecord", "TaskStatus"]

TaskStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]
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


StepStatus = Literal["running", "succeeded", "failed", "sleeping"]


class StepRecord(pydantic.BaseModel):
    """One step of a task (``bgtasks.step.run`` / ``step.sleep``), as its record shows it."""

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
    steps: list[StepRecord] = pydantic.Field(default_factory=list)
    wake_at: _dt.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED
