"""Runtime: the façade over admission, the registry, the runner and the monitors."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import threading
import time
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from . import _context, _lifecycle
from ._admission import Admission
from ._config import Backoff, Config, task_limits
from ._context import active
from ._direct import start_direct
from ._enforce import Deadlines, Watchdog
from ._errors import BgTasksError, RegistryFull, RuntimeNotActive
from ._handle import TaskHandle
from ._hooks import EVENT_NAMES, BeforeUnloadEvent, EventName, Handler, dispatch
from ._ids import new_id
from ._limits import NO_LIMITS, Limits
from ._observe import Observer, carrier, safely
from ._registry import Registry
from ._runner import Runner, Ticket
from ._spec import Isolation, Kind, Spec, await_, describe, is_async_callable, not_work_error
from ._state import ctl_of
from ._task import FINISHED, TaskRecord
from ._threads import ThreadPool
from ._watch import Hub

if TYPE_CHECKING:
    from .stores import Store

__all__ = ["Backoff", "Runtime", "Spec", "Ticket"]

logger = logging.getLogger("bgtasks")

F = TypeVar("F", bound=Callable[..., Any])

_CoroutineType = types.CoroutineType
_get_ident = threading.get_ident
_describe = describe  # older import name


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
        max_result_bytes: int | None = 1 << 20,
        loop_block_warning: float | None = 1.0,
        consume: bool = True,
    ) -> None:
        cfg = Config.check(
            limits=limits,
            max_pending=max_pending,
            max_concurrency=max_concurrency,
            shutdown_grace=shutdown_grace,
            memory_limit=memory_limit,
            retention=retention,
            max_finished=max_finished,
            backoff=backoff,
            max_threads=max_threads,
            memory_check_interval=memory_check_interval,
            process_pool_size=process_pool_size,
            process_max_tasks=process_max_tasks,
            process_idle_timeout=process_idle_timeout,
            max_result_bytes=max_result_bytes,
            loop_block_warning=loop_block_warning,
        )
        self.config = cfg
        self.limits = cfg.limits
        self.max_pending = cfg.max_pending
        self.max_concurrency = cfg.max_concurrency
        self.shutdown_grace = cfg.shutdown_grace
        self.memory_limit = cfg.memory_limit
        self.retention = cfg.retention
        self.max_finished = cfg.max_finished
        self.backoff = cfg.backoff
        self.max_threads = cfg.max_threads
        self.memory_check_interval = cfg.memory_check_interval
        self.process_pool_size = cfg.process_pool_size
        self.process_max_tasks = cfg.process_max_tasks
        self.process_idle_timeout = cfg.process_idle_timeout
        self.max_result_bytes = cfg.max_result_bytes
        #: Runs durable work queued by other hosts (a shared store); False: enqueue only.
        self.consume = bool(consume)
        self._store_arg = store
        from .stores import open_store

        self.store: Store = open_store(store)

        self._handlers: dict[str, list[Handler]] = {name: [] for name in EVENT_NAMES}
        self._observers: tuple[Observer, ...] = ()
        self._hub = Hub()  # change notifications for push (bgtasks._watch)
        self._state: Literal["new", "started", "closing", "closed"] = "new"
        self._admission = Admission(max_pending=cfg.max_pending, memory_limit=cfg.memory_limit)
        self._registry = Registry(retention=cfg.retention, max_finished=cfg.max_finished)
        self._runner = Runner(self)
        self._deadlines: Deadlines | None = None
        self._thread_sem: asyncio.Semaphore | None = None
        self._threads = ThreadPool(max_threads=cfg.max_threads)
        self._watchdog = Watchdog()
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._token: contextvars.Token[Runtime | None] | None = None
        self._process_pool: Any = None
        self._loop_watch: Any = None
        self._replay: Any = None  # bgtasks._durable.replay.Replay, on a durable store
        self._parked_waiters: dict[str, list[Callable[[], None]]] = {}
        #: Called with no arguments by the first submission to a runtime that was never
        #: started; an adapter with no lifespan sets it to start the runtime elsewhere
        #: (on its own loop thread). It returns once the runtime is started, or raises.
        self.autostart: Callable[[], None] | None = None

    def __repr__(self) -> str:
        unfinished = self._admission.unfinished + self._admission.foreign
        return f"<bgtasks.Runtime {self._state} unfinished={unfinished}>"

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
        await _lifecycle.start(self)

    async def shutdown(self) -> None:
        """Graceful shutdown: ``beforeunload("shutdown")``, wait up to
        ``shutdown_grace`` for unfinished tasks, then cancel the rest."""
        await _lifecycle.shutdown(self)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or running (and hooks are done).

        Returns False if ``timeout`` seconds passed first.
        """
        self._require_started("drain")
        return await _lifecycle.wait_idle(self, timeout)

    @property
    def started(self) -> bool:
        return self._state == "started"

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._runner.loop

    @property
    def _loop_thread_id(self) -> int | None:
        return self._runner.loop_thread_id

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

    def observe(self, observer: Observer) -> Callable[[], None]:
        """Report task events to ``observer`` (see ``bgtasks._observe``); returns
        a function that stops it."""
        if not isinstance(observer, Observer):
            msg = f"observe() needs a bgtasks Observer, got {type(observer).__name__}."
            raise TypeError(msg)
        self._observers = (*self._observers, observer)

        def unsubscribe() -> None:
            self._observers = tuple(o for o in self._observers if o is not observer)

        return unsubscribe

    def _fire_soon(self, event: BeforeUnloadEvent) -> None:
        """Dispatch ``event`` from any thread, without waiting for it."""
        handlers = self._handlers["beforeunload"]
        loop = self._runner.loop
        if not handlers or loop is None:
            return

        def go() -> None:
            task = self._side(dispatch(handlers, event))
            task._bgtasks_hook = True  # type: ignore[attr-defined]

        if _get_ident() == self._runner.loop_thread_id:
            go()
        else:
            loop.call_soon_threadsafe(go)

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
                runner = self._runner
                if _get_ident() == runner.loop_thread_id:
                    t._task = runner.loop.create_task(runner.run(t))  # type: ignore[union-attr]
                else:
                    runner.launch(t)
                return t
            spec = Spec("coro", aw, limits=self._task_limits(limits, inline=True))
        elif callable(aw):
            kind: Kind = "async" if is_async_callable(aw) else "sync"
            spec = Spec(kind, aw, args, {}, self._task_limits(limits, inline=True))
        elif inspect.isawaitable(aw):
            if args:
                msg = "wait_until() got an awaitable and extra arguments; pass only the awaitable."
                raise TypeError(msg)
            spec = Spec("coro", await_(aw), limits=self._task_limits(limits, inline=True))
        else:
            raise not_work_error(aw)
        return self.submit(spec, name=name or describe(aw))

    def submit(self, spec: Spec, *, name: str) -> TaskHandle:
        """Admit and start a task described by ``spec`` (the adapters' entry point)."""
        try:
            t = self._admit(name, spec)
        except BaseException:
            if spec.kind == "coro" and type(spec.fn) is _CoroutineType:
                spec.fn.close()
            raise
        runner = self._runner
        if (
            spec.kind == "sync"
            and spec.retries == 0
            and spec.wake_at is None
            and spec.limits.wall_clock is None
            and spec.limits.cpu_time is None
            and runner.sem is None
            and not runner.persist
            and not self._observers
            and _get_ident() != runner.loop_thread_id
        ):
            start_direct(self, t, spec)
        else:
            runner.launch(t)
        return t

    def reserve(self, name: str, work: Any, task_id: str | None = None) -> Ticket:
        """Admit a task without starting it (durable submission journals it first)."""
        t = self._admit(name, work, task_id, announce=False)
        return Ticket(self, t, _get_ident() == self._runner.loop_thread_id)

    def _task_limits(self, limits: Limits | None, *, inline: bool) -> Limits:
        return task_limits(self.limits, limits, inline=inline)

    def _admit(
        self, name: str, work: Any, task_id: str | None = None, *, announce: bool = True
    ) -> TaskHandle:
        if self._state == "new" and self.autostart is not None:
            try:
                self.autostart()
            except BaseException:
                if type(work) is _CoroutineType:
                    work.close()
                raise
        if self._state != "started":
            if type(work) is _CoroutineType:
                work.close()
            self._refuse(name, "shutdown")
            if self._state == "new":
                msg = (
                    "this Runtime has not started; use `async with rt:` or install it in "
                    "your app with bgtasks.asgi.BackgroundMiddleware / bgtasks.flask.BgTasks."
                )
                raise RuntimeNotActive(msg)
            msg = "the runtime is shutting down and accepts no new work; retry on another worker."
            raise RegistryFull(msg, retry_after=1.0)
        full = self._admission.admit(_get_ident() == self._runner.loop_thread_id)
        if full:
            if type(work) is _CoroutineType:
                work.close()
            self._refuse(name, full)
            raise self._admission.refused(full)
        t = TaskHandle(self, task_id or new_id(), name)
        t._work = work
        if type(work) is Spec and work.wake_at is not None:  # delayed: shown from the start
            ctl_of(t).wake_at = work.wake_at
        self._registry.add(t)
        if announce and self._observers:
            self._announce(t)
        return t

    def _announce(self, t: TaskHandle) -> None:
        task = self._runner.observed(t)
        for o in self._observers:
            safely(o, "submitted", task)

    def _refuse(self, name: str, reason: str) -> None:
        for o in self._observers:
            safely(o, "rejected", name, reason)

    def _carrier(self) -> dict[str, str] | None:
        """The observers' propagation headers here, kept with a durable call."""
        return carrier(self._observers)

    # ------------------------------------------------------------------ stopping
    def cancel(self, task_id: str) -> bool:
        """Cancel a pending or running task. False if unknown or already finished.

        True means the cancellation was requested: a task whose last step was
        already returning can still end ``succeeded``; its record says.
        """
        t = self._registry.get(task_id) if isinstance(task_id, str) else None
        if t is None and self._runner.persist and isinstance(task_id, str):
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
        self._runner.stop(t, error)

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
        return self._registry.stats()

    def expire(self) -> int:
        """Forget finished tasks older than ``retention``; returns how many."""
        cutoff = time.time() - self.retention
        n = self._registry.expire(cutoff)
        self.store.expire(cutoff)
        return n

    # ------------------------------------------------------------------ decorators
    def background(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
        """``@rt.background`` / ``@rt.background(...)``: like ``@bgtasks.background``,
        bound to this runtime instead of the one active in context."""
        from ._api import background

        return background(fn, runtime=self, **options)  # type: ignore[call-overload]

    # ------------------------------------------------------------------ internals
    def _side(self, aw: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(aw)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    def _require_started(self, what: str) -> None:
        if self._state == "new":
            msg = f"Runtime.{what}() needs a started runtime: use `async with rt:` first."
            raise RuntimeNotActive(msg)


__all__ += ["BgTasksError", "Isolation", "Kind", "active", "is_async_callable"]
