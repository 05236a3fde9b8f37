"""The default store: records live only in the runtime's memory."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._handle import TaskHandle
    from .._runtime import Runtime
    from .._task import TaskRecord
    from ._journal import JournalEntry

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps nothing beyond the runtime's own registry: no I/O on any path.

    Idempotency keys live in a dict until their task expires from the runtime.
    """

    durable = False
    journal_timeout = 1.0

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], str] = {}  # (task name, key) -> task id
        self._keys_lock = threading.Lock()

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
        if self._keys:
            registry = runtime._registry
            with self._keys_lock:
                self._keys = {k: v for k, v in self._keys.items() if v in registry}

    async def before_cancel(self, runtime: Runtime, tasks: Sequence[TaskHandle]) -> None:
        pass

    def journal(
        self, runtime: Runtime, entry: JournalEntry
    ) -> concurrent.futures.Future[TaskRecord | None]:
        fut: concurrent.futures.Future[TaskRecord | None] = concurrent.futures.Future()
        key = entry.idempotency_key
        existing = None
        if key is not None:
            with self._keys_lock:
                task_id = self._keys.get((entry.name, key))
                existing = None if task_id is None else runtime._registry.get(task_id)
                if existing is None:
                    self._keys[(entry.name, key)] = entry.id
        fut.set_result(None if existing is None else existing.record)
        return fut

    def forget_journal(self, task_id: str) -> None:
        pass

    def request_cancel(self, task_id: str) -> bool:
        return False
