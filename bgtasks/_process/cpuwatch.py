"""The 90% warning of a task's CPU budget, from the parent's side."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import call_safely

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["CpuWatch"]

_CPU_WARNING = 0.9  # on_cpu_warning fires at this share of the CPU budget
_CPU_CHECK_INTERVAL = 0.05  # at most this many seconds between looks at a worker's CPU


class CpuWatch:
    """Calls ``on_warning`` once a worker has used 90% of a task's CPU budget.

    The parent reads the worker's CPU time (``/proc`` through psutil) rather than
    the worker timing itself: a thread in the worker would need the GIL, which a
    busy task or a long C call holds. On a busy machine the last 10% may pass
    between two looks; ``run`` then warns before it raises ``CPULimitExceeded``,
    so the warning always comes first.
    """

    def __init__(self, worker: Worker, cpu_time: float, on_warning: Callable[[], None]) -> None:
        self._worker = worker
        self._budget = cpu_time
        self._on_warning = on_warning
        self._warn_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._process: Any = None
        self._warned = False

    @classmethod
    def maybe(
        cls, worker: Worker, cpu_time: float | None, on_warning: Callable[[], None] | None
    ) -> CpuWatch | None:
        if cpu_time is None or on_warning is None:
            return None
        return cls(worker, cpu_time, on_warning)

    def start(self, cpu_start: float) -> None:
        """The task began when the worker had used ``cpu_start`` CPU seconds."""
        import psutil

        try:
            self._process = psutil.Process(self._worker.pid)
        except psutil.Error:
            return
        self._warn_at = cpu_start + _CPU_WARNING * self._budget
        self._check()

    def _check(self) -> None:
        import psutil

        self._timer = None
        try:
            times = self._process.cpu_times()
        except psutil.Error:
            return
        left = self._warn_at - (times.user + times.system)
        if left <= 0:
            self.warn()
            return
        # CPU time passes no faster than wall time for one busy thread; a task
        # running several at once is caught by the cap.
        self._timer = self._worker.loop.call_later(min(left, _CPU_CHECK_INTERVAL), self._check)

    def warn(self) -> None:
        """Call ``on_warning`` unless it was called already."""
        self.stop()
        if not self._warned:
            self._warned = True
            call_safely(self._on_warning)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
