"""Every task a runtime knows, until it expires: live handles and finished records.

One rule for threads: adding a task is one dict store and reading is lock-free
(both atomic under the GIL), so any thread may admit and look up tasks; every
removal and every change to the queue of finished tasks happens under
``self.lock``, from whichever thread finishes or expires a task.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._handle import TaskHandle

__all__ = ["Registry"]

STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


class Registry:
    """Known tasks by id, plus finished ones in the order they finished."""

    __slots__ = ("_finished", "_tasks", "lock", "max_finished", "retention")

    def __init__(self, *, retention: float, max_finished: int) -> None:
        self.retention = retention
        self.max_finished = max_finished
        self.lock = threading.Lock()
        self._tasks: dict[str, TaskHandle] = {}
        # Ids of finished tasks, oldest first (their handles hold the times): ids,
        # not (time, id) tuples, so a finished task adds no object for the GC.
        self._finished: collections.deque[str] = collections.deque()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._tasks))

    def __reversed__(self) -> Iterator[str]:
        """Newest first; raises RuntimeError if another thread changes it meanwhile."""
        return reversed(self._tasks)

    def get(self, task_id: str) -> TaskHandle | None:
        return self._tasks.get(task_id)

    def values(self) -> list[TaskHandle]:
        """A copy: other threads admit tasks meanwhile."""
        return list(self._tasks.values())

    def add(self, t: TaskHandle) -> None:
        self._tasks[t._id] = t

    def discard(self, task_id: str) -> None:
        """Forget a task that never ran (its admission was retracted)."""
        with self.lock:
            self._tasks.pop(task_id, None)

    def finished(self, t: TaskHandle) -> None:
        """``t`` has finished: keep its record for ``retention`` seconds, or at most
        ``max_finished`` records (memory before history)."""
        with self.lock:
            if self.retention > 0:
                finished = self._finished
                finished.append(t._id)
                if len(finished) > self.max_finished:
                    self._tasks.pop(finished.popleft(), None)
            else:
                self._tasks.pop(t._id, None)

    def expire(self, cutoff: float) -> int:
        """Forget tasks that finished before ``cutoff``; returns how many."""
        n = 0
        with self.lock:
            finished = self._finished
            tasks = self._tasks
            while finished:
                t = tasks.get(finished[0])
                if t is not None:
                    ended = t._finished_at
                    if ended is not None and ended > cutoff:
                        break  # finished in order: the rest are newer
                    del tasks[t._id]
                    n += 1
                finished.popleft()
        return n

    def stats(self) -> dict[str, int]:
        """Counts of known tasks by status."""
        counts = dict.fromkeys(STATUSES, 0)
        for t in self.values():
            counts[t._status] += 1
        return counts

    def newest_running(self) -> TaskHandle | None:
        """The running task that started last (on a tie, the one admitted last)."""
        running = [t for t in reversed(self.values()) if t._status == "running"]
        if not running:
            return None
        return max(running, key=lambda t: t._started_at or 0.0)
