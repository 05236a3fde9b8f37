"""Durable submission and idempotency keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._api import _Options
    from ._runtime import Runtime, Spec
    from ._task import TaskHandle

__all__ = ["check_durable", "submit_durable"]


def check_durable(fn: Callable[..., Any]) -> None:
    """Refuse, at decoration time, parameters that cannot be stored as JSON."""


def submit_durable(
    rt: Runtime, opts: _Options[Any, Any], spec: Spec, idempotency_key: str | None
) -> TaskHandle:
    """Submit ``spec``, returning the existing task for ``idempotency_key`` if any."""
    if idempotency_key is not None:
        existing = rt._idempotent.get(idempotency_key)
        if existing is not None:
            handle = rt.handle(existing)
            if handle is not None:
                return handle
    handle = rt.submit(spec, name=opts.name)
    if idempotency_key is not None:
        rt._idempotent[idempotency_key] = handle.id
    return handle
