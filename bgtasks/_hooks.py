"""The events a runtime fires, and their dispatch.

Handlers are user code: whatever they raise is logged on the ``"bgtasks"``
logger and never reaches the runtime or another handler.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from ._task import TaskRecord

__all__ = [
    "BeforeUnloadEvent",
    "EventName",
    "Handler",
    "UnhandledRejectionEvent",
    "UnloadReason",
    "dispatch",
]

logger = logging.getLogger("bgtasks")

UnloadReason = Literal["shutdown", "memory", "wall_clock", "cpu"]
EventName = Literal["beforeunload", "unhandledrejection"]
EVENT_NAMES: tuple[str, ...] = ("beforeunload", "unhandledrejection")


@dataclasses.dataclass(frozen=True, slots=True)
class BeforeUnloadEvent:
    """Fired before the runtime unloads (``task`` is None) or a task nears a limit.

    ``reason`` is ``"shutdown"`` or ``"memory"`` for the whole runtime, and
    ``"wall_clock"`` or ``"cpu"`` (with ``task`` set) at 90% of a task's budget.
    """

    reason: UnloadReason
    task: TaskRecord | None = None


@dataclasses.dataclass(slots=True)
class UnhandledRejectionEvent:
    """Fired once for a task that ended in an error after its last attempt.

    Unless a handler calls ``prevent_default()``, the error is then logged with
    its traceback on the ``"bgtasks"`` logger.
    """

    task: TaskRecord
    error: BaseException
    default_prevented: bool = False

    def prevent_default(self) -> None:
        """Do not log the error: a handler has dealt with it."""
        self.default_prevented = True


Event = BeforeUnloadEvent | UnhandledRejectionEvent
Handler = Callable[[Any], Awaitable[None] | None]


async def dispatch(handlers: list[Handler], event: Event) -> None:
    """Call every handler in order; await async ones; log and swallow failures."""
    for handler in tuple(handlers):
        try:
            result = handler(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("bgtasks: %s handler %r raised; ignored", _name(event), handler)


def _name(event: Event) -> str:
    return "beforeunload" if isinstance(event, BeforeUnloadEvent) else "unhandledrejection"
