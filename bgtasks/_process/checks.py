"""Refusing early what a worker process could not run: the function and its arguments.

``check_importable`` runs when a function is decorated with
``isolation="process"``, ``check_picklable`` when it is called; each raises
``TypeError`` naming what is wrong and the fix.
"""

from __future__ import annotations

import functools
import inspect
import pickle
import sys
from collections.abc import Callable
from typing import Any

from .wire import PROTOCOL

__all__ = ["check_importable", "check_picklable", "qualified_name"]


def qualified_name(fn: object) -> str:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}" if module else str(qualname)


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    if main is None:
        return False
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) is not None or getattr(main, "__file__", None) is not None


def check_importable(fn: Callable[..., Any]) -> None:
    """Refuse a function a worker process could not import (used at decoration time).

    Raises ``TypeError`` for a lambda, a function defined inside another
    function, and a function of an interactive ``__main__`` (a REPL, a notebook,
    ``python -c``). A function in a script run as ``python app.py`` is fine: the
    worker imports the script as ``__mp_main__``, so its top-level code must sit
    under ``if __name__ == "__main__":``.
    """
    if not callable(fn):
        msg = f'isolation="process" runs a function, got {type(fn).__name__}.'
        raise TypeError(msg)
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.ismethod(target):
        target = target.__func__
    if not (inspect.isfunction(target) or inspect.isbuiltin(target)):
        target = type(target)  # a callable object: its class must be importable
    label = qualified_name(target)
    qualname = getattr(target, "__qualname__", "")
    if getattr(target, "__name__", None) == "<lambda>":
        msg = (
            f"{label} is a lambda, which a worker process cannot import "
            '(isolation="process" sends a function by its module and name). '
            "Define it with def at the top level of a module."
        )
        raise TypeError(msg)
    if "<locals>" in qualname:
        msg = (
            f"{label} is defined inside another function, so a worker process cannot import "
            'it (isolation="process" sends a function by its module and name). '
            "Move it to the top level of its module."
        )
        raise TypeError(msg)
    module = getattr(target, "__module__", None)
    if module is None:
        msg = (
            f"{label} has no __module__, so a worker process cannot import it; "
            "define it in a module."
        )
        raise TypeError(msg)
    if module == "__main__" and not _main_is_importable():
        msg = (
            f"{label} is defined in an interactive __main__ (a REPL, a notebook or "
            "python -c), which a worker process cannot import. Move it into a module "
            "file and import it from there."
        )
        raise TypeError(msg)


def _describe_arg(fn: Callable[..., Any] | None, index: int) -> str:
    if fn is not None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if index < len(params) and params[index].kind in positional:
            return f"argument {params[index].name!r} (position {index})"
    return f"positional argument {index}"


def _unpicklable_reason(value: object) -> str | None:
    try:
        pickle.dumps(value, PROTOCOL)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_picklable(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, fn: Callable[..., Any] | None = None
) -> None:
    """Refuse arguments that cannot be pickled to a worker, naming the first bad one.

    With ``fn``, positional arguments are named after its parameters.
    """
    together = _unpicklable_reason((args, kwargs))
    if together is None:
        return
    labelled = [(_describe_arg(fn, i), value) for i, value in enumerate(args)]
    labelled += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for what, value in labelled:
        reason = _unpicklable_reason(value)
        if reason is not None:
            msg = (
                f"{what} ({type(value).__name__}) cannot be pickled to send to the worker "
                f'process (isolation="process"): {reason}. Pass plain data such as str, '
                "numbers, lists, dicts or dataclasses, and open files, connections or "
                "locks inside the task instead."
            )
            raise TypeError(msg)
    msg = (
        "the arguments cannot be pickled together to send to the worker process "
        f'(isolation="process"): {together}. Pass plain data such as str, numbers, '
        "lists, dicts or dataclasses."
    )
    raise TypeError(msg)
