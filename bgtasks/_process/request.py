"""The parent's request to a worker: the function by name where it can, and its arguments."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from typing import Any

from .checks import check_importable, check_picklable, qualified_name
from .wire import PROTOCOL, encode

__all__ = ["encode_request", "function_ref"]


def function_ref(fn: Callable[..., Any]) -> tuple[str, str, int] | None:
    """(module, qualname, depth) if the worker can import ``fn`` by name, else None.

    ``depth`` counts ``__wrapped__`` steps from the module attribute down to
    ``fn``: a function under ``@background`` is reached through its wrapper.
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    for depth in range(32):
        if obj is None:
            return None
        if obj is fn:
            return (module, qualname, depth)
        obj = getattr(obj, "__wrapped__", None)
    return None


def encode_request(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    task_id: str,
    name: str,
    attempt: int,
    cpu_time: float | None,
    memory: int | None,
    watch_cpu: bool,
) -> list[bytes]:
    ref = function_ref(fn)
    try:
        payload = pickle.dumps((ref, None if ref else fn, args, kwargs), PROTOCOL)
    except Exception as exc:
        check_picklable(args, kwargs, fn=fn)
        check_importable(fn)
        msg = (
            f"{qualified_name(fn)} cannot be sent to a worker process: "
            f"{type(exc).__name__}: {exc}. "
            'isolation="process" needs a function importable by its module and name.'
        )
        raise TypeError(msg) from exc
    meta = ("run", task_id, name, attempt, cpu_time, memory, watch_cpu)
    return encode(meta, payload)
