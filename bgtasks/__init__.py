"""bgtasks: background work for ASGI and WSGI apps, registered, bounded,
observable, retried, drained on shutdown and, with a durable store, never lost."""

from __future__ import annotations

from . import step as step
from ._api import BackgroundFunction as BackgroundFunction
from ._api import CurrentTask as CurrentTask
from ._api import background as background
from ._api import current_task as current_task
from ._api import wait_until as wait_until
from ._errors import BgTasksError as BgTasksError
from ._errors import CPULimitExceeded as CPULimitExceeded
from ._errors import LimitExceeded as LimitExceeded
from ._errors import MemoryLimitExceeded as MemoryLimitExceeded
from ._errors import RegistryFull as RegistryFull
from ._errors import RuntimeNotActive as RuntimeNotActive
from ._errors import StepOutsideTask as StepOutsideTask
from ._errors import StoreError as StoreError
from ._errors import WallClockLimitExceeded as WallClockLimitExceeded
from ._errors import WorkerCrashed as WorkerCrashed
from ._handle import TaskHandle as TaskHandle
from ._hooks import BeforeUnloadEvent as BeforeUnloadEvent
from ._hooks import UnhandledRejectionEvent as UnhandledRejectionEvent
from ._hooks import UnloadReason as UnloadReason
from ._limits import Limits as Limits
from ._runtime import Backoff as Backoff
from ._runtime import Runtime as Runtime
from ._task import ErrorInfo as ErrorInfo
from ._task import Progress as Progress
from ._task import StepRecord as StepRecord
from ._task import TaskRecord as TaskRecord
from ._task import TaskStatus as TaskStatus
from ._watch import WatchConfig as WatchConfig

__all__ = [
    "BackgroundFunction",
    "Backoff",
    "BeforeUnloadEvent",
    "BgTasksError",
    "CPULimitExceeded",
    "CurrentTask",
    "ErrorInfo",
    "LimitExceeded",
    "Limits",
    "MemoryLimitExceeded",
    "Progress",
    "RegistryFull",
    "Runtime",
    "RuntimeNotActive",
    "StepOutsideTask",
    "StepRecord",
    "StoreError",
    "TaskHandle",
    "TaskRecord",
    "TaskStatus",
    "UnhandledRejectionEvent",
    "UnloadReason",
    "WallClockLimitExceeded",
    "WatchConfig",
    "WorkerCrashed",
    "background",
    "current_task",
    "step",
    "wait_until",
]

__version__ = "0.1.0"
