"""The exceptions bgtasks raises.

::

    BgTasksError
    ├── LimitExceeded
    │   ├── WallClockLimitExceeded   a task ran longer than Limits.wall_clock
    │   ├── CPULimitExceeded         a task used more than Limits.cpu_time
    │   └── MemoryLimitExceeded      over Limits.memory, or the process over Runtime(memory_limit)
    ├── RegistryFull                 admission refused: max_pending reached, memory high
    ├── RuntimeNotActive             bgtasks.wait_until / @background with no runtime in context
    ├── WorkerCrashed                an isolated worker process died while running a task
    └── StoreError                   the store cannot be opened or written
"""

from __future__ import annotations

__all__ = [
    "BgTasksError",
    "CPULimitExceeded",
    "LimitExceeded",
    "MemoryLimitExceeded",
    "RegistryFull",
    "RuntimeNotActive",
    "StoreError",
    "WallClockLimitExceeded",
    "WorkerCrashed",
]


class BgTasksError(Exception):
    """Base class of every error bgtasks raises."""


class LimitExceeded(BgTasksError):
    """A task went over one of its limits and was stopped."""


class WallClockLimitExceeded(LimitExceeded):
    """A task ran for longer than its wall-clock budget."""


class CPULimitExceeded(LimitExceeded):
    """A task used more CPU time than its budget."""


class MemoryLimitExceeded(LimitExceeded):
    """A task (or the whole process) used more memory than allowed."""


class RegistryFull(BgTasksError):
    """The runtime refused new work; retry later.

    ``retry_after`` is a hint in seconds, used for the ``Retry-After`` header.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RuntimeNotActive(BgTasksError):
    """No bgtasks runtime is active in the current context."""


class WorkerCrashed(BgTasksError):
    """The worker process that ran an isolated task died."""


class StoreError(BgTasksError):
    """The task store cannot be opened, read or written."""


class StepOutsideTask(BgTasksError):
    """``bgtasks.step.run`` / ``step.sleep`` was called outside a task."""
