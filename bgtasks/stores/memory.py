"""The default store: records live only in the runtime's memory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._runtime import Runtime
    from .._task import TaskHandle, TaskRecord

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps nothing beyond the runtime's own registry: no I/O on any path."""

    durable = False

    async def open(self, runtime: Runtime) -> None:
        pass

    async def started(self, runtime: Runtime) -> None:
        pass

    async def close(self, runtime: Runtime) -> None:
        pass

    def save(self, task: TaskHandle) -> None:
        pass

    def load(self, task_id: str) -> TaskRecord | None:
        return None

    def expire(self, runtime: Runtime, cutoff: float) -> None:
        pass

    async def before_cancel(self, runtime: Runtime, tasks: Sequence[TaskHandle]) -> None:
        pass
