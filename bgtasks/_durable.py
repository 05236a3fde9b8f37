"""Durable submission, replay after a crash, and idempotency keys.

A ``@background(durable=True)`` call is validated against the function's
annotations and written to the store's journal (as JSON) before the call
returns; a runtime that finds journaled work whose process is gone imports the
function by its ``module:qualname`` and runs it again. Idempotency keys map
``(task name, key)`` to one task: in the store's unique index when the store is
durable, in the memory store (per process) otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import threading
import typing
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import pydantic
import pydantic_core
import typing_extensions

from ._errors import RegistryFull, StoreError
from ._limits import Limits
from ._runtime import Spec, is_async_callable
from ._task import TaskHandle, TaskRecord, TaskStatus
from .stores._journal import JournalEntry

if TYPE_CHECKING:
    from ._api import _Options
    from ._runtime import Runtime
    from .stores import Store
    from .stores.sqlite import ClaimedTask, SQLiteStore

__all__ = ["check_durable", "replay_loop", "replay_once", "submit_durable", "submit_durable_async"]

logger = logging.getLogger("bgtasks")

_codecs: dict[Callable[..., Any], Codec] = {}
_codecs_lock = threading.Lock()
_warned: weakref.WeakSet[Runtime] = weakref.WeakSet()
_warned_blocking: weakref.WeakSet[Runtime] = weakref.WeakSet()

# Built at run time from a signature, which static checkers cannot follow.
_TypedDict: Any = typing_extensions.TypedDict

#: Most orphaned tasks one look claims; the next look takes the rest.
CLAIM_BATCH = 100


# ---------------------------------------------------------------------- decoration
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


def _codec(fn: Callable[..., Any]) -> Codec:
    codec = _codecs.get(fn)
    if codec is None:
        codec = Codec.build(fn)
        assert codec is not None
        with _codecs_lock:
            _codecs[fn] = codec
    return codec


# ---------------------------------------------------------------------- submission
@dataclasses.dataclass(slots=True)
class _Pending:
    """A task admitted in memory whose journal write is in flight."""

    rt: Runtime
    store: Store
    task: TaskHandle
    future: concurrent.futures.Future[TaskRecord | None]
    #: admitted on the runtime's loop thread: settle it there too (see Runtime._retract)
    on_loop: bool
    #: the store's engine runs it on whichever host takes its job, not here
    remote: bool = False

    def settle_later(self) -> None:
        """The caller stopped waiting: let the commit decide, whenever it comes."""

        def done(fut: concurrent.futures.Future[TaskRecord | None]) -> None:
            loop = self.rt._loop
            if not self.on_loop:
                _settle_late(self, fut)
            elif loop is not None:
                with contextlib.suppress(RuntimeError):  # closed: the journal keeps it
                    loop.call_soon_threadsafe(_settle_late, self, fut)

        self.future.add_done_callback(done)


def submit_durable(
    rt: Runtime, opts: _Options[Any, Any], spec: Spec, idempotency_key: str | None
) -> TaskHandle:
    """Submit ``spec``, returning the existing task for ``idempotency_key`` if any.

    With a durable store the call is journaled (committed) before this returns;
    on the event-loop thread that blocks the loop for the write (logged once per
    runtime; ``fn.submit_async`` and the endpoint path use ``submit_durable_async``,
    which awaits it instead).
    """
    begun = _begin(rt, opts, spec, idempotency_key)
    fut = begun.future
    if begun.on_loop and begun.store.durable and rt not in _warned_blocking:
        _warned_blocking.add(rt)
        logger.warning(
            "bgtasks: %s(...) was called on the event loop's thread, outside a "
            "@background endpoint, so the loop waits for its journal write to be "
            "committed (up to the store's busy_timeout if another process holds the "
            "lock). In a coroutine, use `await %s.submit_async(...)`, which awaits the "
            "write and returns the same TaskHandle.",
            opts.fn.__name__,
            opts.fn.__name__,
        )
    if not fut.done():
        timeout = begun.store.journal_timeout
        try:
            concurrent.futures.wait((fut,), timeout)
        except BaseException:  # KeyboardInterrupt while waiting
            begun.settle_later()
            raise
        if not fut.done():
            begun.settle_later()
            msg = (
                f"the task store did not confirm the journal write within {timeout:g}s; "
                "the call was not accepted (it may still run once the store answers). "
                "Retry later."
            )
            raise RegistryFull(msg, retry_after=1.0)
    return _outcome(begun)


async def submit_durable_async(
    rt: Runtime, opts: _Options[Any, Any], spec: Spec, idempotency_key: str | None
) -> TaskHandle:
    """``submit_durable`` for async callers: the event loop never waits on the write."""
    begun = _begin(rt, opts, spec, idempotency_key)
    if not begun.future.done():
        try:
            await asyncio.shield(asyncio.wrap_future(begun.future))
        except asyncio.CancelledError:
            # The caller went away; the commit, not the caller, decides the task's fate.
            begun.settle_later()
            raise
        except Exception:
            pass  # _outcome reports it
    return _outcome(begun)


def _begin(rt: Runtime, opts: _Options[Any, Any], spec: Spec, key: str | None) -> _Pending:
    store = rt.store
    payload = options = target = None
    if opts.durable:
        codec = _codec(opts.fn)
        args, kwargs, payload = codec.dump(opts.name, spec.args, spec.kwargs)
        spec = Spec(spec.kind, spec.fn, args, kwargs, spec.limits, spec.retries)
        target = target_of(opts.fn)
        options = json.dumps(
            {
                "retries": spec.retries,
                "limits": _limits_json(spec.limits),
                "isolation": opts.isolation,
            }
        )
        if not store.durable and rt not in _warned:
            _warned.add(rt)
            logger.warning(
                "bgtasks: durable task %r runs on a runtime whose store is not durable; "
                "nothing survives a crash. Use Runtime(store='sqlite:///path.db') to "
                "journal durable tasks.",
                opts.name,
            )
    t = rt._admit(opts.name, spec)
    entry = JournalEntry(
        id=t._id,
        name=opts.name,
        created_at=t._created_at,
        durable=opts.durable,
        target=target,
        payload=payload,
        options=options,
        idempotency_key=key,
    )
    try:
        fut = store.journal(rt, entry)
    except BaseException:
        rt._retract(t)
        raise
    remote = opts.durable and getattr(store, "dispatches_durable", False)
    return _Pending(rt, store, t, fut, threading.get_ident() == rt._loop_thread_id, remote)


def _outcome(begun: _Pending) -> TaskHandle:
    exc = begun.future.exception()
    if exc is not None:
        raise _refused(begun, exc) from exc
    return _settle(begun, begun.future.result())


def _settle(begun: _Pending, existing: TaskRecord | None) -> TaskHandle:
    rt, t = begun.rt, begun.task
    if existing is None:
        if begun.remote:  # committed with its job: a consuming host runs it
            rt._retract(t)
            return RemoteHandle.of(rt, t.record)
        rt._launch(t)
        return t
    # Another task already holds this idempotency key: that one is the answer.
    begun.store.forget_journal(t._id)
    rt._retract(t)
    handle = rt.handle(existing.id)
    if handle is not None:
        return handle
    return RemoteHandle.of(rt, existing)


def _settle_late(begun: _Pending, fut: concurrent.futures.Future[TaskRecord | None]) -> None:
    try:
        exc = fut.exception()
        if exc is None:
            _settle(begun, fut.result())
        else:
            _refused(begun, exc)
    except Exception:  # a closed loop: the journal keeps the task for the next start
        logger.debug("bgtasks: could not settle task %s", begun.task._id, exc_info=True)


def _refused(begun: _Pending, exc: BaseException) -> BaseException:
    begun.store.forget_journal(begun.task._id)
    begun.rt._retract(begun.task)
    if isinstance(exc, StoreError):
        why = str(exc).rstrip(".")
        msg = f"the call was not accepted: it could not be journaled ({why}). Retry later."
        return RegistryFull(msg, retry_after=1.0)
    return exc


def _limits_json(limits: Limits) -> dict[str, Any]:
    return {
        "wall_clock": limits.wall_clock,
        "cpu_time": limits.cpu_time,
        "memory": limits.memory_bytes,
    }


class RemoteHandle(TaskHandle):
    """A task that another process (or an earlier runtime) runs.

    Returned for an idempotency key that a task outside this runtime holds.
    ``status`` and ``record`` are read from the store each time; ``wait``
    polls it.
    """

    __slots__ = ()

    @classmethod
    def of(cls, rt: Runtime, record: TaskRecord) -> RemoteHandle:
        handle = cls(rt, record.id, record.name)
        handle._created_at = record.created_at.timestamp()
        handle._attempts = record.attempts
        handle._status = record.status
        return handle

    def _fresh(self) -> TaskRecord | None:
        record = self._rt.get(self._id)
        if record is not None:
            self._status = record.status
        return record

    @property
    def status(self) -> TaskStatus:
        self._fresh()
        return self._status

    @property
    def record(self) -> TaskRecord:
        return self._fresh() or super().record

    async def wait(self, timeout: float | None = None) -> TaskRecord:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.02
        while True:
            record = self.record
            if record.finished:
                return record
            if deadline is not None and loop.time() + delay > deadline:
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def wait_sync(self, timeout: float | None = None) -> TaskRecord:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            record = self.record
            if record.finished:
                return record
            if deadline is not None and time.monotonic() + delay > deadline:
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


# ---------------------------------------------------------------------- replay
async def replay_once(rt: Runtime, store: SQLiteStore) -> int:
    """Claim orphaned journaled tasks and run them here; returns how many."""
    if not rt.started:
        return 0
    limit = CLAIM_BATCH
    if rt.max_pending is not None:
        limit = min(limit, rt.max_pending - rt._unfinished)
    claimed = await asyncio.wrap_future(store.claim(limit))
    refused: list[str] = []
    for task in claimed:
        if not _adopt(rt, store, task):
            refused.append(task.id)
    if refused:  # full after all: back in the queue for whoever has room
        store.release(refused)
    if claimed:
        logger.info("bgtasks: running %d journaled task(s) again", len(claimed))
    return len(claimed)


async def replay_loop(rt: Runtime, store: SQLiteStore) -> None:
    """Look for orphaned tasks every ``store.poll`` seconds (sooner while there are more)."""
    while True:
        await asyncio.sleep(store.poll)
        try:
            more = True
            while more:  # a full batch: there may be more waiting
                more = await replay_once(rt, store) >= CLAIM_BATCH
        except StoreError as exc:
            logger.warning("bgtasks: could not look for orphaned tasks: %s", exc)


def _adopt(rt: Runtime, store: SQLiteStore, claimed: ClaimedTask) -> bool:
    try:
        spec = _spec_of(rt, claimed)
    except Exception as exc:
        # Reported through the normal path: the record fails with this error,
        # unhandledrejection fires, the error is logged.
        spec = Spec("coro", _raise(exc))
    try:
        t = rt._admit(claimed.name, spec, task_id=claimed.id)
    except RegistryFull:
        if spec.kind == "coro":
            spec.fn.close()
        return False
    t._created_at = claimed.created_at
    t._attempts = claimed.attempts
    t._progress = claimed.progress
    store.adopt(t._id)
    rt._launch(t)
    return True


def _spec_of(rt: Runtime, claimed: ClaimedTask) -> Spec:
    fn = _resolve(claimed.target)
    options = json.loads(claimed.options)
    isolation = options.get("isolation", "inline")
    limits = Limits(**{k: v for k, v in (options.get("limits") or {}).items() if v is not None})
    args, kwargs = _codec(fn).load(claimed.payload)
    kind: Any = "async" if is_async_callable(fn) else "sync"
    if isolation == "process":
        kind = "process"
    return Spec(
        kind,
        fn,
        args,
        kwargs,
        rt._task_limits(limits, inline=kind != "process"),
        int(options.get("retries", 0)),
    )


def _resolve(target: str) -> Callable[..., Any]:
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


async def _raise(exc: BaseException) -> NoReturn:
    raise exc
