"""Runtime: admission, the host of every task, limits, retries, drain and shutdown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import threading
import time
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import psutil
import stamina
from pydantic_core import to_jsonable_python

from . import _context
from ._enforce import Deadlines, Interrupt, Slot, Watchdog, metered
from ._errors import (
    BgTasksError,
    CPULimitExceeded,
    LimitExceeded,
    MemoryLimitExceeded,
    RegistryFull,
    RuntimeNotActive,
    WallClockLimitExceeded,
)
from ._hooks import (
    EVENT_NAMES,
    BeforeUnloadEvent,
    EventName,
    Handler,
    UnhandledRejectionEvent,
    UnloadReason,
    dispatch,
)
from ._ids import new_id
from ._limits import NO_LIMITS, Limits, parse_size
from ._task import FINISHED, ErrorInfo, TaskHandle, TaskRecord, TaskStatus
from ._threads import ThreadPool

if TYPE_CHECKING:
    from .stores import Store

__all__ = ["Backoff", "Runtime", "Spec"]

logger = logging.getLogger("bgtasks")

F = TypeVar("F", bound=Callable[..., Any])
Kind = Literal["coro", "async", "sync", "process"]
Isolation = Literal["inline", "process"]

_CoroutineType = types.CoroutineType
_get_ident = threading.get_ident
_now = time.time
_set_current_task = _context.current_task_var.set
_get_responder = _context.responder.get


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


class _Ctl:
    """Per-task control state, created only for tasks that need it."""

    __slots__ = ("callbacks", "claimed", "slot", "stop_exc")

    def __init__(self) -> None:
        self.slot: Slot | None = None
        self.stop_exc: BaseException | None = None
        self.callbacks: list[Callable[[], None]] = []
        self.claimed = False  # a direct task's ending is being recorded


def _ctl(t: TaskHandle) -> _Ctl:
    ctl: _Ctl | None = t._x
    if ctl is None:
        ctl = t._x = _Ctl()
    return ctl


def _describe(obj: object) -> str:
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


def _not_work_error(aw: object) -> TypeError:
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


class Runtime:
    """Hosts background work: admits it, runs it under limits, observes it, drains it.

    Use it as an async context manager (``async with rt:``), or let a framework
    adapter run it for the app's lifetime.
    """

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        max_pending: int | None = 10_000,
        max_concurrency: int | None = None,
        shutdown_grace: float = 25.0,
        memory_limit: int | str | None = None,
        store: str | Store = "memory",
        retention: float = 3600.0,
        max_finished: int = 100_000,
        backoff: Backoff | None = None,
        max_threads: int = 40,
        memory_check_interval: float = 0.1,
        process_pool_size: int | None = None,
        process_max_tasks: int | None = 100,
        process_idle_timeout: float = 60.0,
        consume: bool = True,
    ) -> None:
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
        _positive_int_or_none(max_pending, "max_pending")
        _positive_int_or_none(max_concurrency, "max_concurrency")
        _positive_int_or_none(max_threads, "max_threads")
        _positive_int_or_none(max_finished, "max_finished")
        _positive_int_or_none(process_pool_size, "process_pool_size")
        _positive_int_or_none(process_max_tasks, "process_max_tasks")
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
        self.limits = limits or NO_LIMITS
        self.max_pending = max_pending
        self.max_concurrency = max_concurrency
        self.shutdown_grace = float(shutdown_grace)
        self.memory_limit = parse_size(memory_limit, what="memory_limit")
        self.retention = float(retention)
        self.max_finished = max_finished
        self.backoff = backoff or Backoff()
        self.max_threads = max_threads
        self.memory_check_interval = float(memory_check_interval)
        self.process_pool_size = process_pool_size
        self.process_max_tasks = process_max_tasks
        self.process_idle_timeout = float(process_idle_timeout)
        #: Runs durable work queued by other hosts (a shared store); False: enqueue only.
        self.consume = bool(consume)
        self._store_arg = store
        self.store: Store = _open_store_spec(store)
        self._persist = self.store.durable  # records go to the store at every transition
        self._replay: Any = None  # bgtasks._durable.Replay, on a durable store

        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENT_NAMES}
        self._registry: dict[str, TaskHandle] = {}  # every known task, until it expires
        # Ids of finished tasks, oldest first (their handles hold the times): ids,
        # not (time, id) tuples, so a finished task adds no object for the GC.
        self._finished: collections.deque[str] = collections.deque()
        # Unfinished tasks: _unfinished is written only on the loop thread (no lock on
        # the hot path); admissions from other threads count in _foreign, under
        # _lock, until _spawn moves them over.
        self._unfinished = 0
        self._foreign = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._state: Literal["new", "started", "closing", "closed"] = "new"
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._deadlines: Deadlines | None = None
        self._sem: asyncio.Semaphore | None = None
        self._thread_sem: asyncio.Semaphore | None = None
        self._threads = ThreadPool(max_threads=max_threads)
        self._watchdog = Watchdog()
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._memory_high = False
        self._token: contextvars.Token[Runtime | None] | None = None
        self._process_pool: Any = None

    def __repr__(self) -> str:
        return f"<bgtasks.Runtime {self._state} unfinished={self._unfinished}>"

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Runtime:
        await self.start()
        self._token = _context.active_runtime.set(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.shutdown()
        finally:
            if self._token is not None:
                try:
                    _context.active_runtime.reset(self._token)
                except ValueError:  # exited in another context than entered
                    _context.active_runtime.set(None)
                self._token = None

    async def start(self) -> None:
        """Start on the running event loop (``async with rt`` does this for you)."""
        if self._state != "new":
            msg = (
                f"this Runtime was already {self._state}; a Runtime runs once. "
                "Create a new bgtasks.Runtime for each app lifetime."
            )
            raise RuntimeError(msg)
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = _get_ident()
        if self.max_concurrency is not None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        self._thread_sem = asyncio.Semaphore(self.max_threads)
        self._deadlines = Deadlines(self._loop)
        await self.store.open()
        self._state = "started"
        self._side(self._sweep_loop())
        if self.memory_limit is not None:
            self._side(self._memory_loop())
        if self.store.durable:
            from ._durable.replay import Replay

            replay = Replay(self, self.store)
            try:
                await replay.start()
            except BaseException:
                await self._abort_start()
                raise
            self._replay = replay

    async def _abort_start(self) -> None:
        """Start failed after the store opened: leave nothing running."""
        self._state = "closed"
        for side in tuple(self._side_tasks):
            side.cancel()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def shutdown(self) -> None:
        """Graceful shutdown: ``beforeunload("shutdown")``, wait up to
        ``shutdown_grace`` for unfinished tasks, then cancel the rest."""
        if self._state != "started":
            return
        self._state = "closing"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_grace
        try:
            if self._handlers["beforeunload"]:
                try:
                    await asyncio.wait_for(
                        dispatch(self._handlers["beforeunload"], BeforeUnloadEvent("shutdown")),
                        self.shutdown_grace,
                    )
                except asyncio.TimeoutError:
                    logger.warning("bgtasks: beforeunload handlers outlasted shutdown_grace")
            remaining = max(0.0, deadline - loop.time())
            if not await self._wait_idle(remaining):
                # A "failed" task whose rejection handlers still run has not ended.
                leftover = [
                    t
                    for t in self._registry.values()
                    if t._status not in FINISHED or t._task is not None
                ]
                logger.warning(
                    "bgtasks: %d task(s) still unfinished after shutdown_grace=%.1fs; %s",
                    len(leftover),
                    self.shutdown_grace,
                    "cancelling them" if not self.store.durable else "stopping them",
                )
                from ._durable.replay import release

                await release(self.store, [t._id for t in leftover if t._status not in FINISHED])
                for t in leftover:
                    self._stop(t, None)
                # Cancelled coroutines finish at once; a thread stuck in a system call is
                # abandoned after a short wait (see _in_thread).
                await self._wait_idle(5.0)
            for side in tuple(self._side_tasks):
                side.cancel()
            if self._side_tasks:
                await asyncio.wait(tuple(self._side_tasks), timeout=5.0)
        finally:
            self._watchdog.close()
            if self._deadlines is not None:
                self._deadlines.close()
            if self._process_pool is not None:
                await self._process_pool.aclose()
            if self._replay is not None:
                await self._replay.stop()
            await self.store.close()
            self._state = "closed"

    async def _wait_idle(self, timeout: float | None) -> bool:
        if not self._unfinished and not self._foreign and not self._side_busy():
            return True
        try:
            await asyncio.wait_for(self._until_idle(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def _side_busy(self) -> bool:
        return any(getattr(t, "_bgtasks_hook", False) for t in self._side_tasks)

    async def _until_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._unfinished or self._foreign:
                fut: asyncio.Future[None] = loop.create_future()
                # Under the lock a direct task finishes under (_finish_direct): it
                # either sees this waiter or has already made the counts zero.
                with self._lock:
                    self._idle_waiters.append(fut)
                    idle = not self._unfinished and not self._foreign
                if idle:
                    self._wake_if_idle()
                await fut
                continue
            hooks = [t for t in self._side_tasks if getattr(t, "_bgtasks_hook", False)]
            if not hooks:
                return
            await asyncio.wait(hooks)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or running (and hooks are done).

        Returns False if ``timeout`` seconds passed first.
        """
        self._require_started("drain")
        return await self._wait_idle(timeout)

    @property
    def started(self) -> bool:
        return self._state == "started"

    # ------------------------------------------------------------------ hooks
    @overload
    def on(self, event: EventName) -> Callable[[F], F]: ...
    @overload
    def on(self, event: EventName, handler: F) -> F: ...

    def on(self, event: EventName, handler: F | None = None) -> F | Callable[[F], F]:
        """Register a handler for ``"beforeunload"`` or ``"unhandledrejection"``.

        ``rt.on("beforeunload", fn)`` or ``@rt.on("beforeunload")``; sync or async.
        """
        if event not in self._handlers:
            msg = f"unknown event {event!r}; bgtasks fires 'beforeunload' and 'unhandledrejection'."
            raise ValueError(msg)

        def register(fn: F) -> F:
            if not callable(fn):
                msg = f"an event handler must be callable, got {type(fn).__name__}."
                raise TypeError(msg)
            self._handlers[event].append(fn)
            return fn

        return register if handler is None else register(handler)

    def off(self, event: EventName, handler: Callable[..., Any]) -> None:
        """Remove a handler registered with ``on``."""
        self._handlers[event].remove(handler)

    def _fire_soon(self, event: BeforeUnloadEvent) -> None:
        """Dispatch ``event`` from any thread, without waiting for it."""
        handlers = self._handlers["beforeunload"]
        if not handlers or self._loop is None:
            return

        def go() -> None:
            task = self._side(dispatch(handlers, event))
            task._bgtasks_hook = True  # type: ignore[attr-defined]

        if _get_ident() == self._loop_thread_id:
            go()
        else:
            self._loop.call_soon_threadsafe(go)

    # ------------------------------------------------------------------ submission
    def wait_until(
        self,
        aw: Any,
        /,
        *args: Any,
        name: str | None = None,
        limits: Limits | None = None,
    ) -> TaskHandle:
        """Run ``aw`` in the background and return its handle at once.

        ``aw`` is an awaitable, or a callable run with ``*args``: an async one is
        awaited on the loop, a sync one runs in a worker thread.
        """
        if type(aw) is _CoroutineType:
            if args:
                aw.close()
                msg = (
                    "wait_until() got a coroutine and extra arguments; pass either "
                    "wait_until(fn(a, b)) or wait_until(fn, a, b)."
                )
                raise TypeError(msg)
            if limits is None and (self.limits is NO_LIMITS or self.limits.unlimited):
                # The hot path, kept flat: admit, then one create_task.
                t = self._admit(name or aw.__qualname__, aw)
                if _get_ident() == self._loop_thread_id:
                    t._task = self._loop.create_task(self._run(t))  # type: ignore[union-attr]
                else:
                    self._launch(t)
                return t
            spec = Spec("coro", aw, limits=self._task_limits(limits, inline=True))
        elif callable(aw):
            kind: Kind = "async" if is_async_callable(aw) else "sync"
            spec = Spec(kind, aw, args, {}, self._task_limits(limits, inline=True))
        elif inspect.isawaitable(aw):
            if args:
                msg = "wait_until() got an awaitable and extra arguments; pass only the awaitable."
                raise TypeError(msg)
            spec = Spec("coro", _await(aw), limits=self._task_limits(limits, inline=True))
        else:
            raise _not_work_error(aw)
        return self.submit(spec, name=name or _describe(aw))

    def submit(self, spec: Spec, *, name: str) -> TaskHandle:
        """Admit and start a task described by ``spec`` (the adapters' entry point)."""
        try:
            t = self._admit(name, spec)
        except BaseException:
            if spec.kind == "coro" and type(spec.fn) is _CoroutineType:
                spec.fn.close()
            raise
        if (
            spec.kind == "sync"
            and spec.retries == 0
            and spec.limits.wall_clock is None
            and spec.limits.cpu_time is None
            and self._sem is None
            and not self._persist
            and _get_ident() != self._loop_thread_id
        ):
            self._start_direct(t, spec)
        else:
            self._launch(t)
        return t

    def _task_limits(self, limits: Limits | None, *, inline: bool) -> Limits:
        if limits is not None and not isinstance(limits, Limits):
            msg = f"limits must be a bgtasks.Limits, got {type(limits).__name__}."
            raise TypeError(msg)
        merged = self.limits if limits is None else self.limits.merged(limits)
        if inline and merged.cpu_time is not None and not _HAS_THREAD_CPU_CLOCKS:
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

    def _admit(self, name: str, work: Any, task_id: str | None = None) -> TaskHandle:
        if self._state != "started":
            if type(work) is _CoroutineType:
                work.close()
            if self._state == "new":
                msg = (
                    "this Runtime has not started; use `async with rt:` or install it in "
                    "your app with bgtasks.asgi.BackgroundMiddleware / bgtasks.flask.BgTasks."
                )
                raise RuntimeNotActive(msg)
            msg = "the runtime is shutting down and accepts no new work; retry on another worker."
            raise RegistryFull(msg, retry_after=1.0)
        if _get_ident() == self._loop_thread_id:
            full = self._full()
            if not full:
                self._unfinished += 1
        else:
            with self._lock:
                full = self._full()
                if not full:
                    self._foreign += 1
        if full:
            if type(work) is _CoroutineType:
                work.close()
            if full == "pending":
                msg = (
                    f"too many unfinished tasks (max_pending={self.max_pending}); "
                    "retry later or raise Runtime(max_pending=...)."
                )
            else:
                msg = (
                    f"process memory is above 90% of memory_limit={self.memory_limit} bytes; "
                    "new work is refused until it falls."
                )
            raise RegistryFull(msg, retry_after=1.0)
        t = TaskHandle(self, task_id or new_id(), name)
        t._work = work
        self._registry[t._id] = t
        return t

    def _full(self) -> Literal["pending", "memory", ""]:
        """Why new work is refused now ("" if it is not)."""
        max_pending = self.max_pending
        if max_pending is not None and self._unfinished + self._foreign >= max_pending:
            return "pending"
        return "memory" if self._memory_high else ""

    def _retract(self, t: TaskHandle) -> None:
        """Undo ``_admit`` of a task never launched (its journal write failed, or
        its idempotency key was taken). Call it on the thread that admitted it."""
        self._registry.pop(t._id, None)
        if _get_ident() == self._loop_thread_id:
            self._unfinished -= 1
            self._wake_if_idle()
            return
        with self._lock:
            self._foreign -= 1
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._wake_if_idle)

    def _wake_if_idle(self) -> None:
        if not self._unfinished and not self._foreign and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _launch(self, t: TaskHandle) -> None:
        loop = self._loop
        assert loop is not None
        if _get_ident() == self._loop_thread_id:
            t._task = loop.create_task(self._run(t))
        else:
            # Run _spawn in a copy of the caller's context: the task gets that copy.
            ctx = contextvars.copy_context()
            loop.call_soon_threadsafe(self._spawn, t, context=ctx)

    def _spawn(self, t: TaskHandle) -> None:
        self._unfinished += 1
        with self._lock:
            self._foreign -= 1
        t._task = asyncio.get_running_loop().create_task(self._run(t))
        if t._status == "cancelled":  # cancelled before it was spawned
            self._cancel_task(t, t._task)

    # ------------------------------------------------------------------ running
    async def _run(self, t: TaskHandle) -> None:
        _set_current_task(t)
        if _get_responder() is not None:
            _context.responder.set(None)
        work = t._work
        if self._persist:  # a shared store: other processes read this record
            self.store.save(t._snapshot())
        try:
            if self._sem is not None:
                async with self._sem:
                    await self._run_attempts(t, work)
            elif type(work) is _CoroutineType and not self._persist:
                # The hot path: one coroutine, no limits, no retries.
                t._status = "running"
                t._attempts = 1
                t._started_at = _now()
                result = await work
                self._succeed(t, result)
            else:
                await self._run_attempts(t, work)
        except asyncio.CancelledError:
            stop = t._x.stop_exc if t._x is not None else None
            if stop is not None:
                await self._fail(t, stop)
            else:
                self._finish(t, "cancelled")
        except Interrupt:
            await self._fail(t, self._stop_error(t, None))
        except Exception as exc:
            await self._fail(t, exc)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit from task code
            await self._fail(t, exc)
            raise

    async def _run_attempts(self, t: TaskHandle, work: Any) -> None:
        spec = Spec("coro", work) if type(work) is _CoroutineType else work
        if spec.kind == "coro" or spec.retries == 0:
            self._started(t)
            result = await self._attempt(t, spec)
            self._succeed(t, result)
            return
        b = self.backoff
        async for attempt in stamina.retry_context(
            on=_retryable,
            attempts=max(1, spec.retries + 1 - t._attempts),
            timeout=None,
            wait_initial=b.initial,
            wait_max=b.max,
            wait_jitter=b.jitter,
        ):
            with attempt:
                self._started(t)
                result = await self._attempt(t, spec)
        self._succeed(t, result)

    def _started(self, t: TaskHandle) -> None:
        t._status = "running"
        t._attempts += 1
        t._started_at = _now()
        if t._x is not None:
            t._x.stop_exc = None
        if self._persist:
            self.store.save(t._snapshot())

    async def _attempt(self, t: TaskHandle, spec: Spec) -> Any:
        limits = spec.limits
        loop = self._loop
        assert loop is not None
        # One deadline at a time: the 90% warning, which then sets the limit.
        timer: list[list[Any]] = []
        slot: Slot | None = None
        if limits.wall_clock is not None:
            assert self._deadlines is not None
            timer.append(
                self._deadlines.add(0.9 * limits.wall_clock, self._wall_warn, t, limits, timer)
            )
        if limits.cpu_time is not None and spec.kind != "process":
            slot = Slot(
                self._watchdog,
                limits.cpu_time,
                on_warn=functools.partial(self._warn_threadsafe, t, "cpu"),
            )
            _ctl(t).slot = slot
            self._watchdog.watch()
        try:
            if spec.kind == "coro":
                work = spec.fn
                return await (metered(work, slot) if slot is not None else work)
            if spec.kind == "async":
                coro = spec.fn(*spec.args, **spec.kwargs)
                return await (metered(coro, slot) if slot is not None else coro)
            if spec.kind == "sync":
                return await self._in_thread(t, spec, slot or Slot(self._watchdog, None))
            return await self._in_process(t, spec)
        except Interrupt:
            raise self._stop_error(t, spec) from None
        except asyncio.CancelledError:
            stop = t._x.stop_exc if t._x is not None else None
            if stop is None:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            raise stop from None
        finally:
            if timer:
                self._deadlines.cancel(timer[0])  # type: ignore[union-attr]
            if slot is not None:
                self._watchdog.unwatch()
                if t._x is not None:
                    t._x.slot = None

    def _stop_error(self, t: TaskHandle, spec: Spec | None) -> BaseException:
        stop: BaseException | None = t._x.stop_exc if t._x is not None else None
        if stop is not None:
            return stop
        budget = spec.limits.cpu_time if spec is not None else None
        return CPULimitExceeded(f"task {t._name!r} used more than its CPU limit of {budget:g}s")

    async def _in_thread(self, t: TaskHandle, spec: Spec, slot: Slot) -> Any:
        loop = self._loop
        assert loop is not None and self._thread_sem is not None
        fut: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        ctx = contextvars.copy_context()
        fn, args, kwargs = spec.fn, spec.args, spec.kwargs
        ctl = _ctl(t)
        ctl.slot = slot

        def deliver(outcome: tuple[bool, Any]) -> None:
            if not fut.done():
                fut.set_result(outcome)

        def body() -> None:
            try:
                slot.arm()
                outcome: tuple[bool, Any] = (True, ctx.run(fn, *args, **kwargs))
            except BaseException as exc:
                outcome = (False, exc)
            slot.disarm_safely()
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(deliver, outcome)

        async with self._thread_sem:
            self._threads.submit(body)
            try:
                ok, value = await asyncio.shield(fut)
            except asyncio.CancelledError:
                slot.interrupt()
                # Give the thread a moment to unwind; one blocked in a system call
                # cannot be interrupted and is abandoned (it is a daemon thread).
                await asyncio.wait((fut,), timeout=_ABANDON_AFTER)
                raise
            finally:
                ctl.slot = None
        if not ok:
            if isinstance(value, Interrupt):
                raise value
            raise value
        if inspect.isawaitable(value):  # a sync callable that returned a coroutine
            return await value
        return value

    async def _in_process(self, t: TaskHandle, spec: Spec) -> Any:
        pool = self._process_pool
        if pool is None:
            from ._process import ProcessPool

            pool = self._process_pool = ProcessPool(
                size=self.process_pool_size,
                max_tasks_per_worker=self.process_max_tasks,
                idle_timeout=self.process_idle_timeout,
            )

        def progress(done: float, total: float | None, message: str | None) -> None:
            t._report_progress(done, total, message)

        return await pool.run(
            spec.fn,
            spec.args,
            spec.kwargs,
            cpu_time=spec.limits.cpu_time,
            memory=spec.limits.memory_bytes,
            on_progress=progress,
            on_cpu_warning=functools.partial(self._warn_threadsafe, t, "cpu"),
            task_id=t._id,
            name=t._name,
            attempt=t._attempts,
        )

    # ------------------------------------------------------------------ outcomes
    def _succeed(self, t: TaskHandle, result: Any) -> None:
        t._result = None if result is None else self._jsonable(t, result)
        self._finish(t, "succeeded")

    @staticmethod
    def _jsonable(t: TaskHandle, result: Any) -> Any:
        if result is None:
            return None
        try:
            return to_jsonable_python(result)
        except Exception:
            logger.warning(
                "bgtasks: the result of task %s (%s) is not JSON-serialisable "
                "(%s); its record keeps result=null",
                t._id,
                t._name,
                type(result).__name__,
            )
            return None

    async def _fail(self, t: TaskHandle, exc: BaseException) -> None:
        t._error = ErrorInfo(type=type(exc).__name__, message=str(exc))
        if t._started_at is None:
            t._started_at = _now()
        t._status = "failed"
        t._finished_at = _now()
        if self._persist:
            self.store.save(t._snapshot())
        handlers = self._handlers["unhandledrejection"]
        event = UnhandledRejectionEvent(t.record, exc)
        try:
            if handlers:
                # Bounded: a hung handler must not keep the task (and drain) open.
                bound = max(self.shutdown_grace, _HOOK_MIN_TIMEOUT)
                try:
                    await asyncio.wait_for(dispatch(handlers, event), bound)
                except asyncio.TimeoutError:
                    logger.warning(
                        "bgtasks: unhandledrejection handlers for task %s outlasted %.1fs; "
                        "they were cancelled",
                        t._id,
                        bound,
                    )
            if not event.default_prevented:
                logger.error(
                    "bgtasks: task %s (%s) failed after %d attempt(s)",
                    t._id,
                    t._name,
                    t._attempts,
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
        finally:  # cancelled in a handler (shutdown) or not: the task has ended
            self._finish(t, "failed")

    def _finish(self, t: TaskHandle, status: TaskStatus) -> None:
        t._status = status
        if status != "failed" or t._finished_at is None:
            t._finished_at = _now()
        t._task = None
        t._work = None
        if status != "failed" and self._persist:
            self.store.save(t._snapshot())
        if self.retention > 0:
            finished = self._finished
            finished.append(t._id)
            if len(finished) > self.max_finished:  # memory before history
                self._registry.pop(finished.popleft(), None)
        else:
            self._registry.pop(t._id, None)
        self._unfinished -= 1
        if not self._unfinished and self._idle_waiters and not self._foreign:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        ctl = t._x
        if ctl is not None:
            callbacks, ctl.callbacks = ctl.callbacks, []
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    logger.exception("bgtasks: a done-callback of task %s raised", t._id)

    def _add_done_callback(self, t: TaskHandle, cb: Callable[[], None]) -> None:
        """Call ``cb`` (from the loop thread) when ``t`` has finished."""
        loop = self._loop
        if loop is not None and _get_ident() != self._loop_thread_id:
            loop.call_soon_threadsafe(self._add_done_callback, t, cb)
            return
        with self._lock:  # a direct task finishes on its worker thread, under this lock
            if t._status not in FINISHED:
                _ctl(t).callbacks.append(cb)
                return
        cb()

    def _remove_done_callback(self, t: TaskHandle, cb: Callable[[], None]) -> None:
        """Forget ``cb`` (a waiter that gave up); a no-op if it already ran."""
        loop = self._loop
        if loop is not None and _get_ident() != self._loop_thread_id:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._remove_done_callback, t, cb)
            return
        ctl = t._x
        if ctl is None:
            return
        with self._lock, contextlib.suppress(ValueError):
            ctl.callbacks.remove(cb)

    # ------------------------------------------------------------------ direct sync tasks
    # A sync function submitted from a thread other than the loop's (a Flask view,
    # a sync FastAPI endpoint), with no limits, retries or concurrency bound, runs
    # its whole life on a worker thread: the loop hears of it only if someone
    # waits on it or it fails. That saves two cross-thread wake-ups per task.

    def _start_direct(self, t: TaskHandle, spec: Spec) -> None:
        slot = Slot(self._watchdog, None)
        _ctl(t).slot = slot
        ctx = contextvars.copy_context()
        self._threads.submit(functools.partial(self._direct, t, spec, slot, ctx))

    def _direct(self, t: TaskHandle, spec: Spec, slot: Slot, ctx: contextvars.Context) -> None:
        with self._watchdog.lock:
            run = t._status == "pending"
            if run:
                t._status = "running"
                t._attempts = 1
                t._started_at = _now()
                slot.arm()
        if not run:  # cancelled before it started
            if self._claim(t):
                self._finish_direct(t, "cancelled", None)
            return
        try:
            value = ctx.run(_call_in_task, t, spec)
            ok = True
        except BaseException as exc:
            value, ok = exc, False
        slot.disarm_safely()
        if not self._claim(t):  # abandoned meanwhile (see _abandon)
            return
        if ok and not inspect.isawaitable(value):
            self._finish_direct(t, "succeeded", self._jsonable(t, value))
        elif ok:  # a sync callable that returned a coroutine: the loop awaits it
            self._adopt(t, self._await_result(t, value))
        elif isinstance(value, Interrupt):
            stop = t._x.stop_exc if t._x is not None else None
            if stop is None:
                self._finish_direct(t, "cancelled", None)
            else:
                self._adopt(t, self._fail(t, stop))
        else:
            self._adopt(t, self._fail(t, value))

    def _claim(self, t: TaskHandle) -> bool:
        """Whether the caller is the one to record how a direct task ended."""
        ctl = _ctl(t)
        with self._lock:
            if ctl.claimed:
                return False
            ctl.claimed = True
            return True

    def _abandon(self, t: TaskHandle) -> None:
        """A stopped direct task whose thread did not stop: record it as stopped."""
        if t._status in FINISHED or not self._claim(t):
            return
        logger.warning(
            "bgtasks: task %s (%s) did not stop within %.0fs of being stopped (blocked in a "
            "system call?); its thread is abandoned and its outcome will be ignored",
            t._id,
            t._name,
            _ABANDON_AFTER,
        )
        stop = t._x.stop_exc if t._x is not None else None
        if stop is None:
            self._finish_direct(t, "cancelled", None)
        else:
            self._adopt(t, self._fail(t, stop))

    def _finish_direct(self, t: TaskHandle, status: TaskStatus, result: Any) -> None:
        """``_finish`` for a direct task, on its worker thread."""
        t._result = result
        t._work = None
        now = _now()
        with self._lock:
            t._finished_at = now
            t._status = status
            ctl = t._x
            callbacks: list[Callable[[], None]] = []
            if ctl is not None:
                callbacks, ctl.callbacks = ctl.callbacks, []
            self._foreign -= 1
            # Read with the counts, under the lock _until_idle registers under.
            wake = bool(self._idle_waiters) and not self._foreign and not self._unfinished
        if self.retention > 0:
            finished = self._finished
            finished.append(t._id)
            if len(finished) > self.max_finished:
                with contextlib.suppress(IndexError):
                    self._registry.pop(finished.popleft(), None)
        else:
            self._registry.pop(t._id, None)
        if (callbacks or wake) and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._after_direct, t, callbacks)

    def _after_direct(self, t: TaskHandle, callbacks: list[Callable[[], None]]) -> None:
        for cb in callbacks:
            try:
                cb()
            except Exception:
                logger.exception("bgtasks: a done-callback of task %s raised", t._id)
        self._wake_if_idle()

    def _adopt(self, t: TaskHandle, coro: Awaitable[None]) -> None:
        """Hand a direct task's ending to the loop (from its worker thread)."""

        def adopt() -> None:
            self._unfinished += 1
            with self._lock:
                self._foreign -= 1
            t._task = asyncio.ensure_future(coro)

        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(adopt)
        except RuntimeError:  # the loop has closed: nobody to tell
            if inspect.iscoroutine(coro):
                coro.close()

    async def _await_result(self, t: TaskHandle, value: Awaitable[Any]) -> None:
        try:
            result = await value
        except asyncio.CancelledError:
            self._finish(t, "cancelled")
        except Exception as exc:
            await self._fail(t, exc)
        else:
            self._succeed(t, result)

    # ------------------------------------------------------------------ stopping
    def cancel(self, task_id: str) -> bool:
        """Cancel a pending or running task. False if unknown or already finished.

        True means the cancellation was requested: a task whose last step was
        already returning can still end ``succeeded``; its record says.
        """
        t = self._registry.get(task_id)
        if t is None and self._persist and isinstance(task_id, str):
            # Another process's task, in a shared store: ask its owner to cancel it.
            return self.store.request_cancel(task_id)
        if t is None or t._status in FINISHED:
            return False
        self._stop(t, None)
        return True

    def stop(self, task_id: str, error: BaseException) -> bool:
        """Stop a task so that it fails with ``error`` (how limits stop tasks)."""
        t = self._registry.get(task_id)
        if t is None or t._status in FINISHED:
            return False
        self._stop(t, error)
        return True

    def _stop(self, t: TaskHandle, error: BaseException | None) -> None:
        loop = self._loop
        if loop is not None and _get_ident() != self._loop_thread_id:
            loop.call_soon_threadsafe(self._stop, t, error)
            return
        ctl = _ctl(t)
        ctl.stop_exc = error
        with self._watchdog.lock:  # the lock a direct task starts under (see _direct)
            slot = ctl.slot
            if slot is not None and slot.interrupt_locked():
                if t._task is None and loop is not None:
                    # A direct task blocked in a system call sees the interrupt only
                    # when the call returns: give it a moment, then let it go.
                    loop.call_later(_ABANDON_AFTER, self._abandon, t)
            elif t._task is None and t._status == "pending":
                # Not started (admitted from another thread): it will not start.
                t._status = "cancelled"
        if t._task is not None:
            self._cancel_task(t, t._task)

    def _cancel_task(self, t: TaskHandle, task: asyncio.Task[None]) -> None:
        task.cancel()
        # A task cancelled before its first step never runs _run at all: account
        # for it when the asyncio task is done. (Only on this rare path, so the
        # hot path has no done-callback.)
        task.add_done_callback(lambda _: self._finish_unstarted(t))

    def _finish_unstarted(self, t: TaskHandle) -> None:
        if t._finished_at is not None:
            return
        work = t._work
        if isinstance(work, Spec) and work.kind == "coro":
            work = work.fn
        if type(work) is _CoroutineType:
            work.close()  # it never ran: no "never awaited" warning
        self._finish(t, "cancelled")

    def _wall_warn(self, t: TaskHandle, limits: Limits, timer: list[list[Any]]) -> None:
        self._warn(t, "wall_clock")
        assert self._deadlines is not None and limits.wall_clock is not None
        wall = limits.wall_clock
        error = WallClockLimitExceeded(
            f"task {t._name!r} ran past its wall-clock limit of {wall:g}s"
        )
        timer[0] = self._deadlines.add(0.1 * wall, self._stop, t, error)

    def _warn(self, t: TaskHandle, reason: UnloadReason) -> None:
        if t._status == "running":
            self._fire_soon(BeforeUnloadEvent(reason, t.record))

    def _warn_threadsafe(self, t: TaskHandle, reason: UnloadReason) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._warn, t, reason)

    # ------------------------------------------------------------------ queries
    def get(self, task_id: str) -> TaskRecord | None:
        """The record of a task, or None if unknown (or expired)."""
        if not isinstance(task_id, str):
            return None
        t = self._registry.get(task_id)
        if t is not None:
            return t.record
        return self.store.load(task_id)

    def handle(self, task_id: str) -> TaskHandle | None:
        """The live handle of a task this runtime knows, or None."""
        return self._registry.get(task_id)

    def stats(self) -> dict[str, int]:
        """Counts of known tasks by status."""
        counts = dict.fromkeys(("pending", "running", "succeeded", "failed", "cancelled"), 0)
        for t in tuple(self._registry.values()):
            counts[t._status] += 1
        return counts

    # ------------------------------------------------------------------ decorators
    def background(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@rt.background`` / ``@rt.background(...)``: like ``@bgtasks.background``,
        bound to this runtime instead of the one active in context."""
        from ._api import background

        return background(fn, runtime=self, **options)  # type: ignore[call-overload]

    # ------------------------------------------------------------------ background loops
    def _side(self, aw: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(aw)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    async def _sweep_loop(self) -> None:
        interval = min(max(self.retention / 4, 0.05), 30.0) if self.retention > 0 else 30.0
        while True:
            await asyncio.sleep(interval)
            self.expire()

    def expire(self) -> int:
        """Forget finished tasks older than ``retention``; returns how many."""
        cutoff = _now() - self.retention
        finished = self._finished
        registry = self._registry
        n = 0
        while finished:
            t = registry.get(finished[0])
            if t is not None:
                ended = t._finished_at
                if ended is not None and ended > cutoff:
                    break  # finished in order: the rest are newer
                del registry[t._id]
                n += 1
            finished.popleft()
        self.store.expire(cutoff)
        return n

    async def _memory_loop(self) -> None:
        limit = self.memory_limit
        assert limit is not None
        proc = psutil.Process()
        warned = False
        while True:
            rss = proc.memory_info().rss
            high = rss >= 0.9 * limit
            self._memory_high = high
            if high and not warned:
                warned = True
                logger.warning(
                    "bgtasks: process RSS %d bytes is above 90%% of memory_limit=%d; "
                    "refusing new work",
                    rss,
                    limit,
                )
                self._fire_soon(BeforeUnloadEvent("memory"))
            elif rss < 0.8 * limit:
                warned = False
            victim = None
            if rss >= limit:
                # The newest running task (not one already failing: its hooks still
                # run); on a tie, the one admitted last. A copy: threads admit
                # tasks meanwhile.
                tasks = list(self._registry.values())
                running = [t for t in reversed(tasks) if t._status == "running"]
                if running:
                    victim = max(running, key=_started_at)
            if victim is not None:
                self._stop(
                    victim,
                    MemoryLimitExceeded(
                        f"process RSS {rss} bytes reached memory_limit={limit}; the newest "
                        f"running task {victim._name!r} was stopped"
                    ),
                )
            await asyncio.sleep(self.memory_check_interval)

    def _require_started(self, what: str) -> None:
        if self._state == "new":
            msg = f"Runtime.{what}() needs a started runtime: use `async with rt:` first."
            raise RuntimeNotActive(msg)


_HAS_THREAD_CPU_CLOCKS = hasattr(time, "pthread_getcpuclockid")  # Linux and most Unixes
_ABANDON_AFTER = 1.0  # seconds a stopped thread gets before it is abandoned
_HOOK_MIN_TIMEOUT = 1.0  # unhandledrejection handlers get max(shutdown_grace, this)


def _call_in_task(t: TaskHandle, spec: Spec) -> Any:
    # Runs inside the task's own copy of the caller's context.
    _set_current_task(t)
    if _get_responder() is not None:
        _context.responder.set(None)
    return spec.fn(*spec.args, **spec.kwargs)


def _started_at(t: TaskHandle) -> float:
    return t._started_at or 0.0


def _retryable(exc: BaseException) -> bool:
    # Cancellation is not a failure, and a task that went over a limit would
    # only go over it again.
    return isinstance(exc, Exception) and not isinstance(exc, LimitExceeded)


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def _positive_int_or_none(value: object, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{what} must be a positive int or None (no limit), got {value!r}."
        raise ValueError(msg)


def _open_store_spec(store: object) -> Store:
    from .stores import open_store

    return open_store(store)


def active() -> Runtime:
    """The runtime of the current context, or raise RuntimeNotActive."""
    rt = _context.active_runtime.get()
    if rt is None:
        msg = (
            "no bgtasks runtime is active here. Install one in your app: "
            "app.add_middleware(bgtasks.asgi.BackgroundMiddleware) for FastAPI/Starlette, "
            "bgtasks.flask.BgTasks(app) for Flask, bgtasks.wsgi.BackgroundMiddleware(app) for "
            "WSGI; or run your code inside `async with bgtasks.Runtime():`."
        )
        raise RuntimeNotActive(msg)
    return rt


__all__ += ["BgTasksError", "active", "is_async_callable"]
