"""What one call or decoration fixed: the kind of work, what to call, its policy."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Awaitable
from typing import Any, Literal

from ._limits import NO_LIMITS, Limits

__all__ = ["Isolation", "Kind", "Spec", "describe", "is_async_callable", "not_work_error"]

Kind = Literal["coro", "async", "sync", "process"]
Isolation = Literal["inline", "process"]


@dataclasses.dataclass(slots=True)
class Spec:
    """How to run one task: what to call and under which policy.

    Not frozen: one is built per call of a ``@background`` function, and
    frozen dataclasses are slow to construct.
    """

    kind: Kind
    fn: Any = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    limits: Limits = NO_LIMITS
    retries: int = 0
    wake_at: float | None = None  # a delayed task starts no earlier (Unix time)


def describe(obj: object) -> str:
    """A task name for ``obj``: its qualified name, else its type's name."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return str(name) if name else type(obj).__name__


def is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if type(fn) is types.FunctionType:  # a function's own __call__ is never async
        return False
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def not_work_error(aw: object) -> TypeError:
    """The error for ``wait_until(x)`` where ``x`` is neither awaitable nor callable."""
    if aw is None:
        msg = (
            "wait_until() got None, not an awaitable or a callable. This usually means a sync "
            "function was called instead of passed: write wait_until(send_email, to) rather "
            "than wait_until(send_email(to)); for an async function, wait_until(send_email(to)) "
            "or wait_until(send_email, to)."
        )
    else:
        msg = (
            f"wait_until() needs an awaitable (a coroutine, task or future) or a callable, "
            f"got {type(aw).__name__}: {aw!r:.80}. Pass the function and its arguments: "
            "wait_until(fn, arg1, arg2)."
        )
    return TypeError(msg)


async def await_(aw: Awaitable[Any]) -> Any:
    """A coroutine that awaits ``aw`` (a future or task given to wait_until)."""
    return await aw
