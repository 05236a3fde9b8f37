"""What a task sees inside a worker process: ``in_worker``, ``worker_task``, progress.

The worker's loop (``child``) sets these module globals while it serves; in the
parent they keep their defaults. This module imports only the standard library.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = [
    "ProgressCallback",
    "WorkerTask",
    "child_progress_sink",
    "in_worker",
    "report_progress_in_worker",
    "worker_task",
]

ProgressCallback = Callable[[float, float | None, str | None], None]

child_progress_sink: ProgressCallback | None = None
"""In a worker while it runs a task: sends progress to the parent. None elsewhere."""

_in_worker = False
_worker_task: WorkerTask | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerTask:
    """The task running in this worker process: its id, name and attempt, and progress."""

    id: str
    name: str
    attempt: int

    def report_progress(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Show progress in the task's record, as ``CurrentTask.report_progress`` does."""
        report_progress_in_worker(done, total, message)


def in_worker() -> bool:
    """True in a bgtasks worker process (``isolation="process"``)."""
    return _in_worker


def worker_task() -> WorkerTask | None:
    """The task this worker process is running, or None (also in the parent)."""
    return _worker_task


def report_progress_in_worker(
    done: float, total: float | None = None, message: str | None = None
) -> None:
    """Send progress from a task running in a worker process to its record."""
    sink = child_progress_sink
    if sink is None:
        msg = (
            "report_progress_in_worker() was called outside a task running in a bgtasks "
            'worker process (isolation="process"); in other tasks use '
            "bgtasks.current_task().report_progress(...)."
        )
        raise RuntimeError(msg)
    sink(done, total, message)
