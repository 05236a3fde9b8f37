"""Observers: how instrumentation (OpenTelemetry, Prometheus, your own) sees tasks.

An observer is registered with ``Runtime.observe(observer)``. The runtime calls
its methods at fixed points of a task's life; with no observer registered the
runtime does not build anything for them, so instrumentation that is off costs
one falsy check per point.

Rules for observers:

- Methods must be quick and must not block: they run on the event-loop thread
  or on the thread that runs or submits the task.
- An observer that raises is logged on the ``"bgtasks"`` logger and skipped;
  it never breaks the runtime or a task.
- ``attempt_started`` and ``attempt_ended`` run in the context (contextvars)
  the task's code runs in, so an observer may make something current for the
  attempt (an OpenTelemetry span) and reset it when the attempt ends.
- ``submitted`` runs in the submitter's context (the request's), so an observer
  may capture what is current there (the request's span).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ._errors import (
    CPULimitExceeded,
    LimitExceeded,
    MemoryLimitExceeded,
    WallClockLimitExceeded,
)

__all__ = ["ObservedTask", "Observer", "RejectReason", "carrier", "limit_name", "safely"]

logger = logging.getLogger("bgtasks")

#: Why admission refused a task: too many pending tasks, the process memory
#: ceiling, the store could not take the call, or the runtime is shutting down.
RejectReason = str  # "pending" | "memory" | "store" | "shutdown"


class ObservedTask:
    """What an observer may know about one task; one object per task, shared by
    every observer of that task's events.

    ``origin`` is the trace carrier captured when the task was submitted
    (``Observer.carrier``), kept with a durable task's journal entry; a task
    replayed after a crash has ``replayed=True``. ``scratch`` is free for
    observers to keep per-task state in (use a key of your own). ``started_at``
    is the Unix time its first attempt in this process began (None before).
    """

    __slots__ = (
        "created_at",
        "durable",
        "id",
        "name",
        "origin",
        "replayed",
        "scratch",
        "started_at",
    )

    def __init__(
        self,
        task_id: str,
        name: str,
        *,
        created_at: float,
        durable: bool = False,
        origin: Mapping[str, str] | None = None,
        replayed: bool = False,
    ) -> None:
        self.id = task_id
        self.name = name
        self.created_at = created_at
        self.durable = durable
        self.origin = origin
        self.replayed = replayed
        self.started_at: float | None = None  # set by the runtime
        self.scratch: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<ObservedTask id={self.id!r} name={self.name!r}>"


class Observer:
    """Base class with a no-op for every event: override what you need.

    Statuses and errors: a succeeded attempt ends with ``error=None``; a failed
    one with the exception (a ``LimitExceeded`` subclass when a limit stopped
    it); a cancelled one with ``asyncio.CancelledError``. ``will_retry`` says
    whether another attempt follows.
    """

    def carrier(self) -> Mapping[str, str] | None:
        """Propagation headers of the current context, kept with a durable call
        so that a replay elsewhere can link back to the submitter."""
        return None

    def submitted(self, task: ObservedTask) -> None:
        """The task was admitted (it has an id); runs in the submitter's context."""

    def rejected(self, name: str, reason: RejectReason) -> None:
        """Admission refused a task named ``name`` (``RegistryFull`` or 503)."""

    def attempt_started(self, task: ObservedTask, attempt: int, queued_for: float) -> None:
        """Attempt ``attempt`` (1-based) begins; ``queued_for`` is the seconds the
        task waited between its creation and its first attempt (0 after)."""

    def attempt_ended(
        self,
        task: ObservedTask,
        attempt: int,
        error: BaseException | None,
        *,
        will_retry: bool,
        duration: float,
    ) -> None:
        """Attempt ``attempt`` ended after ``duration`` seconds."""

    def step_started(self, task: ObservedTask, step: str) -> None:
        """A step (``bgtasks.step.run``) of the task starts running, in the
        context its function runs in (a kept step that is skipped does not)."""

    def step_ended(
        self, task: ObservedTask, step: str, error: BaseException | None, attempts: int
    ) -> None:
        """The step ended after ``attempts`` attempts (``error`` None if it succeeded)."""

    def finished(self, task: ObservedTask, status: str, duration: float) -> None:
        """The task reached ``status`` ("succeeded", "failed", "cancelled");
        ``duration`` is the seconds from its first start (0 if it never ran)."""


def limit_name(error: BaseException | None) -> str | None:
    """The ``Limits`` field a ``LimitExceeded`` error stands for ("wall_clock",
    "cpu_time", "memory"); None for any other error."""
    if not isinstance(error, LimitExceeded):
        return None
    if isinstance(error, WallClockLimitExceeded):
        return "wall_clock"
    if isinstance(error, CPULimitExceeded):
        return "cpu_time"
    if isinstance(error, MemoryLimitExceeded):
        return "memory"
    return "other"


def safely(observer: Observer, method: str, *args: Any, **kwargs: Any) -> Any:
    """Call ``observer.method(*args)``; log and swallow what it raises."""
    try:
        return getattr(observer, method)(*args, **kwargs)
    except Exception:
        logger.exception("bgtasks observer %r failed in %s()", observer, method)
        return None


def carrier(observers: tuple[Observer, ...]) -> dict[str, str] | None:
    """The observers' propagation headers for the current context, merged."""
    merged: dict[str, str] = {}
    for o in observers:
        headers = safely(o, "carrier")
        if headers:
            merged.update(headers)
    return merged or None
