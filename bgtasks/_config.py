"""Every check of Runtime's arguments, once, and the per-task limits rule."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ._limits import NO_LIMITS, Limits, parse_size

__all__ = ["HAS_THREAD_CPU_CLOCKS", "Backoff", "Config", "task_limits"]

HAS_THREAD_CPU_CLOCKS = hasattr(time, "pthread_getcpuclockid")  # Linux and most Unixes


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Waits between attempts: exponential from ``initial``, capped at ``max``,
    plus up to ``jitter`` seconds at random. Defaults suit web work."""

    initial: float = 0.1
    max: float = 5.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for field in ("initial", "max", "jitter"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                msg = f"Backoff.{field} must be a number of seconds >= 0, got {v!r}."
                raise ValueError(msg)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """A Runtime's checked settings (see ``Runtime`` for what each means)."""

    limits: Limits
    max_pending: int | None
    max_concurrency: int | None
    shutdown_grace: float
    memory_limit: int | None
    retention: float
    max_finished: int
    backoff: Backoff
    max_threads: int
    memory_check_interval: float
    process_pool_size: int | None
    process_max_tasks: int | None
    process_idle_timeout: float
    max_result_bytes: int | None = 1 << 20
    loop_block_warning: float | None = 1.0

    @classmethod
    def check(
        cls,
        *,
        limits: Any,
        max_pending: Any,
        max_concurrency: Any,
        shutdown_grace: Any,
        memory_limit: Any,
        retention: Any,
        max_finished: Any,
        backoff: Any,
        max_threads: Any,
        memory_check_interval: Any,
        process_pool_size: Any,
        process_max_tasks: Any,
        process_idle_timeout: Any,
        max_result_bytes: Any = 1 << 20,
        loop_block_warning: Any = 1.0,
    ) -> Config:
        """Validate Runtime's keyword arguments; raise with the fix in the message."""
        if limits is not None and not isinstance(limits, Limits):
            msg = f"limits must be a bgtasks.Limits, got {type(limits).__name__}."
            raise TypeError(msg)
        if limits is not None and limits.memory is not None:
            msg = (
                "Runtime(limits=Limits(memory=...)) would apply to in-process tasks, which "
                "cannot be bounded one by one: use Runtime(memory_limit=...) for the process, "
                'or Limits(memory=...) on @background(isolation="process") functions.'
            )
            raise ValueError(msg)
        for value, what in (
            (max_pending, "max_pending"),
            (max_concurrency, "max_concurrency"),
            (max_threads, "max_threads"),
            (max_finished, "max_finished"),
            (process_pool_size, "process_pool_size"),
            (process_max_tasks, "process_max_tasks"),
            (max_result_bytes, "max_result_bytes"),
        ):
            _positive_int_or_none(value, what)
        if (
            isinstance(process_idle_timeout, bool)
            or not isinstance(process_idle_timeout, (int, float))
            or not process_idle_timeout > 0
        ):
            msg = (
                "process_idle_timeout must be a number of seconds > 0 (math.inf to keep "
                f"idle worker processes), got {process_idle_timeout!r}."
            )
            raise ValueError(msg)
        for value, what in (
            (shutdown_grace, "shutdown_grace"),
            (retention, "retention"),
            (memory_check_interval, "memory_check_interval"),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                msg = f"{what} must be a number of seconds >= 0, got {value!r}."
                raise ValueError(msg)
        if loop_block_warning is not None and (
            isinstance(loop_block_warning, bool)
            or not isinstance(loop_block_warning, (int, float))
            or not loop_block_warning > 0
        ):
            msg = (
                "loop_block_warning must be a number of seconds > 0, or None to turn the "
                f"warning off, got {loop_block_warning!r}."
            )
            raise ValueError(msg)
        if backoff is not None and not isinstance(backoff, Backoff):
            msg = f"backoff must be a bgtasks.Backoff, got {type(backoff).__name__}."
            raise TypeError(msg)
        return cls(
            limits=limits or NO_LIMITS,
            max_pending=max_pending,
            max_concurrency=max_concurrency,
            shutdown_grace=float(shutdown_grace),
            memory_limit=parse_size(memory_limit, what="memory_limit"),
            retention=float(retention),
            max_finished=max_finished,
            backoff=backoff or Backoff(),
            max_threads=max_threads,
            memory_check_interval=float(memory_check_interval),
            process_pool_size=process_pool_size,
            process_max_tasks=process_max_tasks,
            process_idle_timeout=float(process_idle_timeout),
            max_result_bytes=max_result_bytes,
            loop_block_warning=None if loop_block_warning is None else float(loop_block_warning),
        )


def task_limits(default: Limits, limits: Limits | None, *, inline: bool) -> Limits:
    """The limits one task runs under: ``default`` overridden by ``limits``.

    ``inline`` tasks run in this process, where a memory bound cannot apply to
    one task and a CPU bound needs per-thread CPU clocks.
    """
    if limits is not None and not isinstance(limits, Limits):
        msg = f"limits must be a bgtasks.Limits, got {type(limits).__name__}."
        raise TypeError(msg)
    merged = default if limits is None else default.merged(limits)
    if inline and merged.cpu_time is not None and not HAS_THREAD_CPU_CLOCKS:
        msg = (
            "Limits(cpu_time=...) on a task that runs in this process needs per-thread CPU "
            "clocks (time.pthread_getcpuclockid), which this platform does not have; use a "
            'wall_clock limit, or run the task with @background(isolation="process") on Linux.'
        )
        raise ValueError(msg)
    if inline and merged.memory is not None:
        msg = (
            "Limits(memory=...) cannot bound a task that runs in this process; run it "
            'with @background(isolation="process", limits=Limits(memory=...)), or bound '
            "the whole process with Runtime(memory_limit=...)."
        )
        raise ValueError(msg)
    return merged


def _positive_int_or_none(value: object, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{what} must be a positive int or None (no limit), got {value!r}."
        raise ValueError(msg)
