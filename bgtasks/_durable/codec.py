"""Durable calls: what they store, and checking it at decoration time.

A ``@background(durable=True)`` call is validated against the function's
annotations and stored as JSON (``Codec``); ``check_durable`` refuses, when
the function is decorated, what another process could not run again.
``resolve`` finds the function of a journaled call by its ``module:qualname``.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import typing
from collections.abc import Callable
from typing import Any

import pydantic
import pydantic_core
import typing_extensions

__all__ = ["Codec", "check_durable", "codec_of", "resolve", "target_of"]

_codecs: dict[Callable[..., Any], Codec] = {}
_codecs_lock = threading.Lock()

# Built at run time from a signature, which static checkers cannot follow.
_TypedDict: Any = typing_extensions.TypedDict


def check_durable(fn: Callable[..., Any]) -> None:
    """Refuse, at decoration time, what another process could not run again:
    a function it cannot import, or a parameter that cannot be stored as JSON."""
    what = f"@background(durable=True) on {_describe(fn)}"
    if not inspect.isfunction(fn):
        msg = (
            f"{what}: a durable task must be a plain function defined with `def` at module "
            f"level (got {type(fn).__name__}), so that another process can import it by "
            "name and run it after a crash."
        )
        raise TypeError(msg)
    if "<locals>" in fn.__qualname__ or "<lambda>" in fn.__qualname__:
        msg = (
            f"{what}: a durable task must be defined at module level, not inside a function "
            "or as a lambda, so that another process can import it by name and run it after "
            "a crash; move it to the top level of its module."
        )
        raise TypeError(msg)
    codec = Codec.build(fn, lenient=True)
    if codec is not None:
        with _codecs_lock:
            _codecs[fn] = codec


def _describe(fn: object) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{name}" if module and module != "__main__" else str(name)


def target_of(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


class Codec:
    """Validates one function's arguments and turns them into JSON and back."""

    __slots__ = ("adapter", "fn", "signature")

    def __init__(
        self,
        fn: Callable[..., Any],
        signature: inspect.Signature,
        adapter: pydantic.TypeAdapter[Any],
    ) -> None:
        self.fn = fn
        self.signature = signature
        self.adapter = adapter

    @classmethod
    def build(cls, fn: Callable[..., Any], *, lenient: bool = False) -> Codec | None:
        """The codec of ``fn``; None if ``lenient`` and an annotation names a type
        that does not exist yet (a forward reference): it is built at the first call."""
        what = f"@background(durable=True) on {_describe(fn)}"
        signature = inspect.signature(fn)
        try:
            hints = _parameter_hints(fn, signature)
        except _Unresolved as exc:
            if lenient:
                return None
            msg = (
                f"{what}: the annotation of parameter {exc.name!r} ({exc.annotation}) names "
                f"a type that cannot be found ({exc.error}). Import it at module level, not "
                "only under `if TYPE_CHECKING:`, so the arguments can be validated and stored."
            )
            raise TypeError(msg) from None
        fields: dict[str, Any] = {}
        for name, param in signature.parameters.items():
            ann = hints.get(name, Any)
            typ: Any = pydantic.JsonValue if ann is Any else ann
            _check_storable(what, name, ann, typ)
            # Arguments left out (defaults, an empty *args) stay out of the JSON.
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                typ = typing_extensions.NotRequired[tuple[typ, ...]]
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                typ = typing_extensions.NotRequired[dict[str, typ]]
            elif param.default is not inspect.Parameter.empty:
                typ = typing_extensions.NotRequired[typ]
            fields[name] = typ
        if not fields:
            adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(dict[str, None])
        else:
            args_type = _TypedDict(f"{fn.__name__}_arguments", fields)
            adapter = pydantic.TypeAdapter(args_type)
        return cls(fn, signature, adapter)

    def dump(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any], str]:
        """Validate a call; return the arguments to run it with and their JSON."""
        bound = self.signature.bind(*args, **kwargs)
        try:
            data = self.adapter.validate_python(dict(bound.arguments))
            payload = self.adapter.dump_json(data).decode()
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err["loc"])
            msg = (
                f"durable task {name!r}: argument {where!r} cannot be stored as JSON: "
                f"{err['msg']} (got {type(err['input']).__name__}). Pass a value of the "
                "parameter's annotated type, or annotate the parameter with the type you pass "
                "(an unannotated or Any parameter takes JSON values only: str, int, float, "
                "bool, None, list, dict)."
            )
            raise TypeError(msg) from None
        except pydantic_core.PydanticSerializationError as exc:
            msg = (
                f"durable task {name!r}: its arguments cannot be stored as JSON ({exc}); pass "
                "values pydantic can serialise (an id, a URL, a pydantic model)."
            )
            raise TypeError(msg) from None
        call_args, call_kwargs = self._call(data)
        return call_args, call_kwargs, payload

    def load(self, payload: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments to run a journaled call with."""
        return self._call(self.adapter.validate_json(payload))

    def _call(self, data: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        by_keyword = False
        for name, param in self.signature.parameters.items():
            kind = param.kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(data.get(name, ()))
            elif kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(data.get(name, {}))
            elif name not in data:
                by_keyword = True  # a default was used: what follows goes by name
            elif kind is inspect.Parameter.KEYWORD_ONLY or (
                by_keyword and kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            ):
                kwargs[name] = data[name]
            else:
                args.append(data[name])
        return tuple(args), kwargs


class _Unresolved(Exception):
    """A parameter's annotation names something that does not exist (yet)."""

    def __init__(self, name: str, annotation: str, error: NameError) -> None:
        super().__init__(name)
        self.name = name
        self.annotation = annotation
        self.error = error


def _parameter_hints(fn: Callable[..., Any], signature: inspect.Signature) -> dict[str, Any]:
    """The resolved annotations of ``fn``'s parameters (not of its return: it is not
    stored), resolved one by one so that a missing name is told by its parameter."""
    raw: dict[str, Any] = getattr(fn, "__annotations__", None) or {}
    hints: dict[str, Any] = {}
    for name in signature.parameters:
        if name not in raw:
            continue
        # get_type_hints on a stand-in holding this one annotation, with fn's globals.
        one = _OneAnnotation(fn, name, raw[name])
        try:
            hints.update(typing.get_type_hints(one))
        except NameError as exc:
            ann = raw[name]
            raise _Unresolved(name, ann if isinstance(ann, str) else repr(ann), exc) from None
    return hints


class _OneAnnotation:
    __slots__ = ("__annotations__", "__globals__")

    def __init__(self, fn: Callable[..., Any], name: str, annotation: Any) -> None:
        self.__annotations__ = {name: annotation}
        # As get_type_hints does for fn itself: the innermost function's globals.
        inner = inspect.unwrap(fn) if callable(fn) else fn
        self.__globals__: dict[str, Any] = getattr(inner, "__globals__", {})


def _check_storable(what: str, name: str, ann: Any, typ: Any) -> None:
    try:
        pydantic.TypeAdapter(typ).json_schema()
    except Exception as exc:
        label = getattr(ann, "__qualname__", None) or repr(ann)
        msg = (
            f"{what}: parameter {name!r} ({label}) cannot be stored as JSON "
            f"({type(exc).__name__}), so the task could not be run again after a crash. "
            f"Pass what the task needs to rebuild it instead (an id, a URL, a pydantic "
            f"model) and create the {label} inside the task, or drop durable=True."
        )
        raise TypeError(msg) from None


def codec_of(fn: Callable[..., Any]) -> Codec:
    codec = _codecs.get(fn)
    if codec is None:
        codec = Codec.build(fn)
        assert codec is not None
        with _codecs_lock:
            _codecs[fn] = codec
    return codec


def resolve(target: str) -> Callable[..., Any]:
    module, _, qualname = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        msg = (
            f"cannot run the journaled task again: {target} cannot be imported "
            f"({type(exc).__name__}: {exc}). Keep durable functions importable under the "
            "same module and name while work journaled by an earlier version may remain."
        )
        raise LookupError(msg) from exc
    opts = getattr(obj, "__bgtasks__", None)
    fn = opts.fn if opts is not None else getattr(obj, "__wrapped__", obj)
    if not callable(fn):
        msg = f"cannot run the journaled task again: {target} is not a function."
        raise LookupError(msg)
    return fn  # type: ignore[no-any-return]
