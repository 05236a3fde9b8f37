"""wait_until, @background and current_task: the surface users touch."""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import sys
import time
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

from typing_extensions import ParamSpec

from . import _context
from ._context import active
from ._handle import TaskHandle
from ._limits import Limits
from ._spec import Isolation, Kind, Spec, is_async_callable
from ._spec import describe as _describe

if TYPE_CHECKING:
    from ._process import WorkerTask
    from ._runtime import Runtime

__all__ = ["BackgroundFunction", "CurrentTask", "background", "current_task", "wait_until"]

P = ParamSpec("P")
R = TypeVar("R")


def wait_until(
    aw: Any, /, *args: Any, name: str | None = None, limits: Limits | None = None
) -> TaskHandle:
    """Run ``aw`` in the background on the active runtime; return its handle at once.

    ``aw`` is an awaitable, or a callable run with ``*args`` (a sync callable in
    a worker thread). Raises ``RuntimeNotActive`` if no runtime is installed.
    """
    rt = _context.active_runtime.get()
    if rt is None:
        if inspect.iscoroutine(aw):
            aw.close()
        rt = active()
    work = _context.wrap_work(aw)
    if work is aw:
        return rt.wait_until(aw, *args, name=name, limits=limits)
    # The adapter wrapped it (e.g. in Flask's request context): keep the task's
    # name, and close the caller's coroutine if it is refused.
    if name is None:
        name = aw.__qualname__ if inspect.iscoroutine(aw) else _describe(aw)
    try:
        return rt.wait_until(work, *args, name=name, limits=limits)
    except BaseException:
        if inspect.iscoroutine(aw):
            aw.close()
        raise


class CurrentTask:
    """The task whose code is running: see ``current_task()``."""

    __slots__ = ("_handle",)

    def __init__(self, handle: TaskHandle) -> None:
        self._handle = handle

    def __repr__(self) -> str:
        return f"<CurrentTask id={self.id!r} name={self.name!r} attempt={self.attempt}>"

    @property
    def id(self) -> str:
        return self._handle.id

    @property
    def name(self) -> str:
        return self._handle.name

    @property
    def attempt(self) -> int:
        """1 on the first attempt, 2 on the first retry, and so on."""
        return self._handle._attempts

    @property
    def handle(self) -> TaskHandle:
        return self._handle

    def report_progress(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Show progress in the task's record (``progress`` in the status JSON)."""
        self._handle._report_progress(done, total, message)


def current_task() -> CurrentTask | WorkerTask | None:
    """Inside a task: its id, name, attempt and ``report_progress``; else None."""
    handle = _context.current_task_var.get()
    if handle is None:
        # In an isolated worker process (which has imported _process): its task.
        process = sys.modules.get("bgtasks._process")
        return process.worker_task() if process is not None and process.in_worker() else None
    return CurrentTask(handle)


class BackgroundFunction(Protocol[P, R]):
    """What ``@background`` returns: call it to schedule the original."""

    __wrapped__: Callable[P, R]
    __name__: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...

    def using(
        self,
        *,
        idempotency_key: str | None = None,
        limits: Limits | None = None,
        delay: float | datetime.timedelta | None = None,
        run_at: datetime.datetime | None = None,
    ) -> BackgroundFunction[P, R]: ...

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle: ...

    async def submit_async(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle: ...


class _Options(Generic[P, R]):
    """What one ``@background`` decoration fixed, shared by its bound copies."""

    __slots__ = ("durable", "fn", "isolation", "kind", "limits", "name", "retries", "runtime")

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None,
        retries: int,
        limits: Limits | None,
        durable: bool,
        isolation: Isolation,
        runtime: Runtime | None,
    ) -> None:
        if not callable(fn):
            msg = f"@background decorates a function, got {type(fn).__name__}."
            raise TypeError(msg)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            msg = f"retries must be an int >= 0 (extra attempts after the first), got {retries!r}."
            raise ValueError(msg)
        if limits is not None and not isinstance(limits, Limits):
            msg = f"limits must be a bgtasks.Limits, got {type(limits).__name__}."
            raise TypeError(msg)
        if isolation not in ("inline", "process"):
            msg = f"isolation must be 'inline' or 'process', got {isolation!r}."
            raise ValueError(msg)
        if isolation == "inline" and limits is not None and limits.memory is not None:
            msg = (
                f"@background on {_qualname(fn)}: Limits(memory=...) cannot bound a task "
                'that runs in this process; add isolation="process" to run it in a worker '
                "process with a hard memory limit, or bound the whole process with "
                "Runtime(memory_limit=...)."
            )
            raise ValueError(msg)
        kind: Kind
        if isolation == "process":
            from ._process import check_importable

            check_importable(fn)
            kind = "process"
        else:
            kind = "async" if is_async_callable(fn) else "sync"
        self.fn = fn
        self.name = name or _qualname(fn)
        self.retries = retries
        self.limits = limits
        self.durable = durable
        self.isolation = isolation
        self.kind = kind
        self.runtime = runtime
        if durable:
            from ._durable import check_durable

            check_durable(fn)

    def schedule(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        limits: Limits | None,
        idempotency_key: str | None,
        wake_at: float | None = None,
    ) -> TaskHandle:
        if (
            wake_at is None
            and self.kind == "async"
            and self.retries == 0
            and limits is None
            and self.limits is None
            and not self.durable
            and idempotency_key is None
        ):
            # The common case takes wait_until's coroutine fast path.
            rt = self.runtime or active()
            if rt.limits.unlimited:
                fn = _context.wrap_work(self.fn)
                return rt.wait_until(fn(*args, **kwargs), name=self.name)
        rt, spec = self._prepare(args, kwargs, limits, wake_at)
        if self.durable or idempotency_key is not None:
            from ._durable import submit_durable

            return submit_durable(rt, self, spec, idempotency_key)
        return rt.submit(spec, name=self.name)

    async def schedule_async(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        limits: Limits | None,
        idempotency_key: str | None,
        wake_at: float | None = None,
    ) -> TaskHandle:
        """``schedule`` of a durable or keyed call from the event loop: the journal
        write is awaited, not waited on."""
        from ._durable import submit_durable_async

        rt, spec = self._prepare(args, kwargs, limits, wake_at)
        return await submit_durable_async(rt, self, spec, idempotency_key)

    def _prepare(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        limits: Limits | None,
        wake_at: float | None = None,
    ) -> tuple[Runtime, Spec]:
        rt = self.runtime or active()
        lim = rt._task_limits(limits or self.limits, inline=self.kind != "process")
        if self.kind == "process":
            from ._process import check_picklable

            check_picklable(args, kwargs, fn=self.fn)
        fn = self.fn if self.kind == "process" else _context.wrap_work(self.fn)
        return rt, Spec(self.kind, fn, args, kwargs, lim, self.retries, wake_at)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _on_trio()  # FastAPI under trio awaits the endpoint too
    return True


def _on_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


async def _respond(
    opts: _Options[Any, Any],
    responder: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limits: Limits | None,
    key: str | None,
    wake_at: float | None,
) -> Any:
    handle = await opts.schedule_async(
        args, kwargs, limits=limits, idempotency_key=key, wake_at=wake_at
    )
    return responder.accepted(handle)


class _Deferred:
    """What an async ``@background`` endpoint returns when a journal write must
    finish before the response: the framework awaits it and gets the 202."""

    __slots__ = ("_coro",)

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        return self._coro.__await__()


_awaitable_types: dict[type, type] = {}


def _awaitable(response: Any) -> Any:
    """``response``, made awaitable (awaiting it gives itself).

    An async ``@background`` function's wrapper is a plain function (calling it
    returns at once), but FastAPI sees the async original through
    ``__wrapped__`` and awaits what the endpoint returns.
    """
    cls = type(response)
    sub = _awaitable_types.get(cls)
    if sub is None:

        def __await__(self: Any) -> Generator[Any, Any, Any]:
            return self
            yield  # pragma: no cover - makes this a generator

        sub = _awaitable_types[cls] = type(cls.__name__, (cls,), {"__await__": __await__})
    try:
        response.__class__ = sub
    except TypeError:  # a type whose layout forbids it: wrap instead
        return _Deferred(_ready(response))
    return response


async def _ready(value: Any) -> Any:
    return value


def _qualname(fn: object) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}.{name}" if module and module != "__main__" else str(name)


def _make_wrapper(
    opts: _Options[P, R],
    limits: Limits | None,
    idempotency_key: str | None,
    when: tuple[str, float] | None = None,
) -> BackgroundFunction[P, R]:
    fn = opts.fn

    # Frameworks that see an async function (FastAPI looks through __wrapped__)
    # await what the endpoint returns, on the event loop.
    awaited = opts.kind == "async" or (opts.kind == "process" and inspect.iscoroutinefunction(fn))

    def wake() -> float | None:
        if when is None:
            return None
        kind, value = when
        return time.time() + value if kind == "delay" else value

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wake_at = wake()
        responder = _context.responder.get()
        endpoint = responder is not None and responder.is_endpoint(wrapper)
        key = idempotency_key
        if endpoint and key is None:
            key = responder.idempotency_key  # type: ignore[union-attr]
        if endpoint and awaited and _on_event_loop():
            if (opts.durable or key is not None) and asyncio._get_running_loop() is not None:
                # The journal write is awaited off the loop before the 202 goes out.
                return _Deferred(
                    _respond(opts, responder, args, kwargs, limits, key, wake_at)
                )
            handle = opts.schedule(
                args, kwargs, limits=limits, idempotency_key=key, wake_at=wake_at
            )
            return _awaitable(responder.accepted(handle))  # type: ignore[union-attr]
        handle = opts.schedule(args, kwargs, limits=limits, idempotency_key=key, wake_at=wake_at)
        if endpoint:
            return responder.accepted(handle)  # type: ignore[union-attr]
        return handle

    functools.update_wrapper(wrapper, fn)

    def using(
        *,
        idempotency_key: str | None = None,
        limits: Limits | None = None,
        delay: float | datetime.timedelta | None = None,
        run_at: datetime.datetime | None = None,
    ) -> BackgroundFunction[P, R]:
        if limits is not None and not isinstance(limits, Limits):
            msg = f"limits must be a bgtasks.Limits, got {type(limits).__name__}."
            raise TypeError(msg)
        from ._http import MAX_IDEMPOTENCY_KEY

        if idempotency_key is not None and (
            not isinstance(idempotency_key, str)
            or not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY
        ):
            msg = (
                "idempotency_key must be a non-empty string of at most "
                f"{MAX_IDEMPOTENCY_KEY} characters."
            )
            raise ValueError(msg)
        return _make_wrapper(opts, limits, idempotency_key, _when(delay, run_at))

    def submit(*args: Any, **kwargs: Any) -> TaskHandle:
        return opts.schedule(
            args, kwargs, limits=limits, idempotency_key=idempotency_key, wake_at=wake()
        )

    async def submit_async(*args: Any, **kwargs: Any) -> TaskHandle:
        """``submit`` for coroutines: a journal write is awaited, never waited on."""
        if opts.durable or idempotency_key is not None:
            return await opts.schedule_async(
                args, kwargs, limits=limits, idempotency_key=idempotency_key, wake_at=wake()
            )
        return opts.schedule(args, kwargs, limits=limits, idempotency_key=None, wake_at=wake())

    bf: Any = wrapper
    bf.using = using
    bf.submit = submit
    bf.submit_async = submit_async
    bf.options = opts
    # FastAPI documents the route from the signature; the endpoint returns 202.
    bf.__bgtasks__ = opts
    sig = _endpoint_signature(fn)
    if sig is not None:
        bf.__signature__ = sig
    return bf  # type: ignore[no-any-return]


def _when(delay: object, run_at: object) -> tuple[str, float] | None:
    """``using(delay=...)`` / ``using(run_at=...)``, checked: when the task may start."""
    if delay is not None and run_at is not None:
        msg = "using() takes delay= or run_at=, not both."
        raise TypeError(msg)
    if delay is not None:
        if isinstance(delay, datetime.timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
            seconds = float(delay)
        else:
            msg = f"delay must be seconds or a datetime.timedelta, got {type(delay).__name__}."
            raise TypeError(msg)
        if not seconds >= 0:
            msg = f"delay must be >= 0 seconds, got {delay!r}."
            raise ValueError(msg)
        return ("delay", seconds)
    if run_at is not None:
        from ._steps import aware_timestamp

        return ("run_at", aware_timestamp(run_at, "using(run_at=...)"))
    return None


def _endpoint_signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The original's parameters, returning the 202 body: what FastAPI documents.

    FastAPI reads the request's parameters and the response model from the
    endpoint's signature; as an endpoint the wrapper answers ``TaskAccepted``.
    """
    from ._http import TaskAccepted

    try:
        try:
            sig = inspect.signature(fn, eval_str=True)
        except Exception:  # a forward reference not defined yet: FastAPI resolves it later
            sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a callable without a signature
        return None
    return sig.replace(return_annotation=TaskAccepted)


@overload
def background(fn: Callable[P, R], /) -> BackgroundFunction[P, R]: ...
@overload
def background(
    *,
    name: str | None = None,
    retries: int = 0,
    limits: Limits | None = None,
    durable: bool = False,
    isolation: Literal["inline", "process"] = "inline",
) -> Callable[[Callable[P, R]], BackgroundFunction[P, R]]: ...


def background(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    limits: Limits | None = None,
    durable: bool = False,
    isolation: Literal["inline", "process"] = "inline",
    runtime: Runtime | None = None,
) -> BackgroundFunction[P, R] | Callable[[Callable[P, R]], BackgroundFunction[P, R]]:
    """Make calling ``fn`` schedule it in the background.

    In a request handled by a bgtasks adapter, where the decorated function is
    the endpoint, the call answers ``202 Accepted`` with the status URL;
    anywhere else it returns a ``TaskHandle`` at once, for sync and async
    functions alike. ``fn.submit(...)`` always returns a handle;
    ``await fn.submit_async(...)`` too, and in a coroutine it awaits the
    journal write of a durable (or keyed) call instead of blocking the event
    loop on it. ``fn.__wrapped__`` is the original.
    """

    def decorate(f: Callable[P, R]) -> BackgroundFunction[P, R]:
        opts = _Options(
            f,
            name=name,
            retries=retries,
            limits=limits,
            durable=durable,
            isolation=isolation,
            runtime=runtime,
        )
        return _make_wrapper(opts, None, None)

    if fn is not None:
        return decorate(fn)
    return decorate
