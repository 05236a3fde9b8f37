"""The default store: records live only in the runtime's memory.

The memory store keeps nothing the runtime does not already hold, and does
no I/O on any path. What it answers:

- idempotency keys: per process, in a dict (``journal`` / ``forget``);
- ``load``, ``list`` and ``stats``: nothing (None, an empty page, empty
  counts). The runtime answers those from its own registry, which holds every
  task of this process (``bgtasks.stores.base.page_of`` and ``stats_of``
  give the same order and cursors as a store's listing); there is nothing
  else to read;
- ``claim``, ``release``, ``park``, ``cancel_requests``: nothing to do, since
  nothing outlives the process and no other process shares it;
- kept steps: none. Steps of a task on a non-durable runtime are kept by the
  runtime with the task, not here.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import TypeVar

from .._task import TaskRecord, TaskSnapshot
from .base import ClaimedTask, JournalEntry, ListQuery, Page

__all__ = ["MemoryStore"]

T = TypeVar("T")

#: Most idempotency keys kept; the oldest goes first past it.
MAX_KEYS = 100_000


def _done(value: T) -> concurrent.futures.Future[T]:
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    fut.set_result(value)
    return fut


class MemoryStore:
    """Keeps nothing beyond the runtime's own registry: no I/O on any path.

    Idempotency keys map ``(task name, key)`` to the task that holds it, until
    that task is forgotten (``forget``) or ``MAX_KEYS`` newer keys push it out.
    The record ``journal`` answers for a taken key is a pending record of the
    holder's entry: the runtime looks the task up by that id in its registry,
    and treats a key whose holder it no longer has as free (it calls
    ``forget`` with the holder's id and journals again).
    """

    durable = False
    journal_timeout = 1.0
    poll = 5.0

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], JournalEntry] = {}  # (name, key) -> holder's entry
        self._held: dict[str, tuple[str, str]] = {}  # holder's id -> its (name, key)
        self._lock = threading.Lock()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def save(self, snapshot: TaskSnapshot) -> None:
        pass

    def load(self, task_id: str) -> TaskRecord | None:
        return None

    def list(self, query: ListQuery) -> Page:
        """Always an empty page: the runtime lists its own registry."""
        return Page(items=[])

    def stats(self) -> dict[str, dict[str, int]]:
        """Always empty counts: the runtime counts its own registry."""
        return {"by_status": {}, "by_name": {}}

    def expire(self, cutoff: float) -> None:
        pass

    def journal(self, entry: JournalEntry) -> concurrent.futures.Future[TaskRecord | None]:
        key = entry.idempotency_key
        if key is None:
            return _done(None)
        slot = (entry.name, key)
        with self._lock:
            holder = self._keys.get(slot)
            if holder is None:
                self._keys[slot] = entry
                self._held[entry.id] = slot
                if len(self._keys) > MAX_KEYS:
                    oldest = next(iter(self._keys))
                    self._held.pop(self._keys.pop(oldest).id, None)
                return _done(None)
        # The runtime reads the holder's state from its own registry by this id.
        return _done(TaskSnapshot(holder.id, holder.name, "pending", holder.created_at).record())

    def forget(self, task_id: str) -> None:
        """``task_id`` no longer holds its key (its journal failed, or the
        runtime no longer has it)."""
        with self._lock:
            slot = self._held.pop(task_id, None)
            holder = None if slot is None else self._keys.get(slot)
            if holder is not None and holder.id == task_id:
                del self._keys[slot]  # type: ignore[arg-type]

    def claim(self, limit: int) -> concurrent.futures.Future[builtins.list[ClaimedTask]]:
        return _done([])

    def release(self, ids: Sequence[str]) -> concurrent.futures.Future[None]:
        return _done(None)

    def park(self, task_id: str, wake_at: float) -> concurrent.futures.Future[None]:
        return _done(None)

    def request_cancel(self, task_id: str) -> bool:
        return False

    def cancel_requests(self) -> concurrent.futures.Future[builtins.list[str]]:
        return _done([])

    def keep_step(
        self, task_id: str, name: str, value_json: str
    ) -> concurrent.futures.Future[None]:
        return _done(None)

    def kept_steps(self, task_id: str) -> concurrent.futures.Future[dict[str, str]]:
        return _done({})
