"""Per-task OS limits inside a worker process, relative to what it had used before.

- CPU: ``ITIMER_PROF`` counts the process's CPU time and, with ``SIGPROF`` left
  at its default action, terminates the process the moment the budget is spent,
  even in the middle of one long C call. ``RLIMIT_CPU`` (soft limit only, whole
  seconds, ``SIGXCPU``) backs it up should the task re-arm the timer itself.
- Memory: a soft ``RLIMIT_AS`` at the current address space plus the budget, so
  an allocation past it raises ``MemoryError``. The worker then answers and exits:
  a process that ran out of memory may be in a bad state.

``resource`` and the itimers exist on Unix only and are touched in the worker alone.
"""

from __future__ import annotations

import math
import os
import signal
import time

__all__ = ["Budget", "address_space", "default_cpu_signals"]


class Budget:
    """Per-task CPU and address-space limits, relative to what is used now."""

    def __init__(self, cpu_time: float | None, memory: int | None) -> None:
        self.cpu_time = cpu_time
        self.memory = memory
        self.cpu_start = 0.0
        self._saved: list[tuple[int, tuple[int, int]]] = []
        self._timer = False

    def apply(self) -> None:
        import resource

        if self.cpu_time is not None:
            # The limit relies on the default actions (terminate the process); an
            # earlier task may have installed handlers.
            default_cpu_signals()
            self.cpu_start = used = time.process_time()
            # The kernel checks RLIMIT_CPU in whole seconds: round up so it never
            # fires before the budget; the itimer is the precise limit.
            self._lower(resource.RLIMIT_CPU, math.ceil(used + self.cpu_time))
            signal.setitimer(signal.ITIMER_PROF, self.cpu_time)
            self._timer = True
        if self.memory is not None:
            self._lower(resource.RLIMIT_AS, address_space() + self.memory)

    def _lower(self, which: int, soft: int) -> None:
        import resource

        old_soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        # Only the soft limit moves: the hard one stays, so it can be raised again.
        resource.setrlimit(which, (soft, hard))
        self._saved.append((which, (old_soft, hard)))

    def restore(self) -> None:
        """Lift the limits again; safe to call more than once."""
        if self._timer:
            signal.setitimer(signal.ITIMER_PROF, 0)
            self._timer = False
        if self._saved:
            import resource

            while self._saved:
                which, limits = self._saved.pop()
                resource.setrlimit(which, limits)


def default_cpu_signals() -> None:
    for name in ("SIGPROF", "SIGXCPU"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def address_space() -> int:
    """The worker's current virtual memory size in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[0])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().vms)
