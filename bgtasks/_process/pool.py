"""``isolation="process"``: a pool of worker processes with hard per-task OS limits.

``ProcessPool`` (used by the runtime) hands each task to an idle worker
(``worker.Worker``) or starts one, sends the request (``request``), passes
progress on, watches the CPU budget (``cpuwatch``), and turns the reply into
the result or an exception (``errors``). The worker's own loop is in ``child``.

How each outcome reaches the caller of ``ProcessPool.run``:

- the result, unpickled; the function's exception, unpickled, with the worker's
  traceback as its ``__cause__`` (a ``RemoteTraceback``). An exception that
  cannot cross (it does not pickle or unpickle, or it is not an ``Exception``,
  e.g. ``SystemExit``) becomes ``WorkerTaskError``, a ``RuntimeError`` that keeps
  the original type name, message and traceback;
- over the CPU budget: the worker is terminated by the kernel (``SIGPROF`` from
  ``ITIMER_PROF``, or ``SIGXCPU`` from ``RLIMIT_CPU``) -> ``CPULimitExceeded``;
  at 90% of it, ``on_cpu_warning`` is called;
- over the memory budget (``RLIMIT_AS``): ``MemoryError`` in the task ->
  ``MemoryLimitExceeded``, and the worker is replaced;
- the worker died (``os._exit``, a segfault, ``SIGKILL``) -> ``WorkerCrashed``;
- the awaiting coroutine was cancelled -> the worker is killed with ``SIGKILL``
  and reaped, then the ``CancelledError`` propagates.

Workers are started with the ``forkserver`` method (``spawn`` where that is
missing), never ``fork``: the parent has threads and an event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import math
import multiprocessing
import multiprocessing.util  # registers its atexit hook before ours, so ours runs first
import os
import pickle
import signal
import socket
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import MemoryLimitExceeded, WorkerCrashed
from . import child
from .checks import qualified_name
from .cpuwatch import CpuWatch
from .current import ProgressCallback
from .errors import RemoteTraceback, call_safely, cpu_limit_signal, death_error, rebuild_error
from .request import encode_request
from .worker import Worker

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

__all__ = ["ProcessPool"]

_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
_TERMINATE_GRACE = 2.0  # seconds aclose() waits after SIGTERM before SIGKILL
_EXIT_AFTER_EOF = 5.0  # seconds to wait for a worker that closed its socket to exit


_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    # A pool nobody closed: kill its workers so multiprocessing's own exit hook,
    # which joins every child process and runs after this one, does not wait.
    for pool in list(_pools):
        for worker in list(pool._workers):
            worker.kill_now()


class ProcessPool:
    """Worker processes that run one task at a time each, under hard OS limits.

    - ``size``: the most workers at once (default: the number of CPUs, at least 1).
    - ``max_tasks_per_worker``: a worker is replaced after this many tasks
      (None: never), which bounds the effect of leaks in task code.
    - ``idle_timeout``: seconds an idle worker is kept before it is stopped.

    Workers start on first use. The pool belongs to the event loop it first runs
    on. ``aclose()`` (or ``async with``) stops every worker.
    """

    def __init__(
        self,
        *,
        size: int | None = None,
        max_tasks_per_worker: int | None = 100,
        idle_timeout: float = 60.0,
    ) -> None:
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            msg = (
                f"ProcessPool(size=...) must be an int >= 1, or None for one per CPU, not {size!r}."
            )
            raise ValueError(msg)
        if max_tasks_per_worker is not None and (
            isinstance(max_tasks_per_worker, bool)
            or not isinstance(max_tasks_per_worker, int)
            or max_tasks_per_worker < 1
        ):
            msg = (
                "ProcessPool(max_tasks_per_worker=...) must be an int >= 1, or None to never "
                f"recycle workers, got {max_tasks_per_worker!r}."
            )
            raise ValueError(msg)
        if (
            isinstance(idle_timeout, bool)
            or not isinstance(idle_timeout, (int, float))
            or not (idle_timeout > 0)
        ):
            msg = (
                "ProcessPool(idle_timeout=...) must be a positive number of seconds "
                f"(math.inf to keep idle workers), got {idle_timeout!r}."
            )
            raise ValueError(msg)
        self.size: int = size if size is not None else max(1, os.cpu_count() or 2)
        self.max_tasks_per_worker = max_tasks_per_worker
        self.idle_timeout = float(idle_timeout)
        # Typed loosely: typeshed's BaseContext does not declare .Process.
        self._ctx: Any = multiprocessing.get_context(_START_METHOD)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle: deque[Worker] = deque()
        self._workers: set[Worker] = set()  # every worker not yet reaped
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._started = 0
        _pools.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._workers)} workers"
        return f"<ProcessPool size={self.size} {state}>"

    async def __aenter__(self) -> ProcessPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def pids(self) -> list[int]:
        """Pids of the live workers (for diagnostics and tests)."""
        return sorted(w.pid for w in self._workers if not w.exited.done())

    @property
    def workers_started(self) -> int:
        """How many worker processes this pool has started so far."""
        return self._started

    # ------------------------------------------------------------------ run
    async def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        cpu_time: float | None,
        memory: int | None,
        on_progress: ProgressCallback | None = None,
        on_cpu_warning: Callable[[], None] | None = None,
        task_id: str = "",
        name: str = "",
        attempt: int = 1,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in a worker and return its result.

        An async ``fn`` runs under ``asyncio.run`` in the worker. ``cpu_time``
        (CPU seconds) and ``memory`` (bytes of address space) bound this call
        only. ``on_progress(done, total, message)`` receives the task's progress
        and ``on_cpu_warning()`` is called once the task has used 90% of
        ``cpu_time`` (the parent looks at the worker's CPU time at most 50 ms
        apart), and in any case before ``CPULimitExceeded`` is raised; both run
        on the event loop, and an exception from them is logged. ``task_id``,
        ``name`` and ``attempt`` are what ``worker_task()`` shows in the worker.
        See the module docstring for what each failure raises.
        """
        slots = self._bind()
        label = name or qualified_name(fn)
        request = encode_request(
            fn,
            args,
            kwargs,
            task_id=task_id,
            name=label,
            attempt=attempt,
            cpu_time=cpu_time,
            memory=memory,
            watch_cpu=cpu_time is not None and on_cpu_warning is not None,
        )
        async with slots:
            worker = await self._checkout()
            cpu_watch = CpuWatch.maybe(worker, cpu_time, on_cpu_warning)
            keep = False
            try:
                reply, blob = await self._exchange(worker, request, on_progress, cpu_watch)
                keep = reply[0] in ("ok", "err", "load", "bad_result")
            except BaseException:
                # Cancelled (a wall-clock limit, a user cancel, shutdown): the task
                # may be anywhere, even in C code, so the worker goes. Reap it before
                # re-raising, shielded from anyio's repeated cancellation.
                worker.kill()
                with contextlib.suppress(asyncio.CancelledError), anyio.CancelScope(shield=True):
                    await worker.wait_exit(_TERMINATE_GRACE)
                raise
            finally:
                self._checkin(worker, keep)
        if cpu_watch is not None and reply[0] == "died" and cpu_limit_signal(reply[1]):
            cpu_watch.warn()  # the 90% look came too late (a busy machine): warn before failing
            # A callback that hands the warning to the loop (call_soon_threadsafe,
            # as the runtime's does) gets it handled while the task still runs.
            await asyncio.sleep(0)
        return self._settle(reply, blob, worker, label, cpu_time, memory)

    async def _exchange(
        self,
        worker: Worker,
        request: list[bytes],
        on_progress: ProgressCallback | None,
        cpu_watch: CpuWatch | None,
    ) -> tuple[tuple[Any, ...], memoryview]:
        inbox = worker.inbox
        worker.send(request)
        try:
            while True:
                message = await inbox.get()
                if message is None:
                    code = await worker.wait_exit(_EXIT_AFTER_EOF)
                    return ("died", code), memoryview(b"")
                meta = message[0]
                if meta[0] == "progress":
                    if on_progress is not None:
                        call_safely(on_progress, *meta[1:])
                elif meta[0] == "started":
                    if cpu_watch is not None:
                        cpu_watch.start(meta[1])
                else:
                    return message
        finally:
            if cpu_watch is not None:
                cpu_watch.stop()

    def _settle(
        self,
        reply: tuple[Any, ...],
        blob: memoryview,
        worker: Worker,
        name: str,
        cpu_time: float | None,
        memory: int | None,
    ) -> Any:
        kind = reply[0]
        if kind == "ok":
            try:
                return pickle.loads(blob)
            except Exception as exc:
                msg = (
                    f"the result of task {name!r} could not be unpickled in the parent "
                    f"process ({type(exc).__name__}: {exc}); return a value whose type "
                    "is importable in the parent."
                )
                raise TypeError(msg) from exc
        if kind == "err":
            raise rebuild_error(reply, blob)
        if kind == "memory":
            msg = (
                f"task {name!r} ran out of its memory limit of {memory} bytes "
                "(the address space of its worker process, which was replaced); raise "
                "Limits.memory if the task needs more."
            )
            raise MemoryLimitExceeded(msg) from RemoteTraceback(reply[1])
        if kind == "load":
            _, type_name, text, tb = reply
            msg = (
                f"the worker process could not load task {name!r}: {type_name}: {text}. "
                "The function and its arguments must be importable in a fresh process: "
                "define them at the top level of a module that imports without side "
                "effects."
            )
            raise TypeError(msg) from RemoteTraceback(tb)
        if kind == "bad_result":
            _, type_name, reason = reply
            msg = (
                f"the result of task {name!r} ({type_name}) cannot be pickled to send it "
                f"back from the worker process: {reason}. Return plain data such as str, "
                "numbers, lists, dicts or dataclasses."
            )
            raise TypeError(msg)
        if kind == "died":
            raise death_error(reply[1], worker.pid, name, cpu_time, memory, self._closed)
        msg = (
            f"the worker process (pid {worker.pid}) running task {name!r} sent a reply "
            f"bgtasks does not understand ({kind!r}: {reply[1:]!r}); it was replaced. "
            "Make sure the task does not write to the worker's socket."
        )
        raise WorkerCrashed(msg)

    # -------------------------------------------------------------- workers
    def _bind(self) -> asyncio.Semaphore:
        if self._closed:
            msg = "this ProcessPool is closed; create a new one (the runtime does so on start)."
            raise RuntimeError(msg)
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._slots = asyncio.Semaphore(self.size)
        elif self._loop is not loop:
            msg = (
                "this ProcessPool belongs to another event loop; create one pool per "
                "event loop (one per Runtime)."
            )
            raise RuntimeError(msg)
        assert self._slots is not None
        return self._slots

    async def _checkout(self) -> Worker:
        if self._closed:
            msg = "this ProcessPool was closed while the task waited for a worker."
            raise RuntimeError(msg)
        while self._idle:
            worker = self._idle.pop()  # the most recently used: the others may idle out
            if worker.alive:
                worker.busy = True
                return worker
        worker = await self._spawn()
        worker.busy = True
        return worker

    def _checkin(self, worker: Worker, keep: bool) -> None:
        worker.busy = False
        worker.tasks += 1
        limit = self.max_tasks_per_worker
        if not keep or self._closed or not worker.alive or (limit and worker.tasks >= limit):
            worker.retire()
            return
        assert self._loop is not None
        worker.idle_since = self._loop.time()
        self._idle.append(worker)
        self._arm_idle_timer()

    async def _spawn(self) -> Worker:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        proc: BaseProcess = self._ctx.Process(
            target=child.main, args=(child_sock,), name="bgtasks-worker", daemon=False
        )
        # start() blocks for a moment (the first call starts the fork server):
        # do it in a thread.
        started = loop.run_in_executor(None, proc.start)
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            started.add_done_callback(
                functools.partial(self._abandon, loop, proc, parent_sock, child_sock)
            )
            raise
        except BaseException:
            parent_sock.close()
            child_sock.close()
            raise
        child_sock.close()
        worker = Worker(self, loop, proc, parent_sock)
        self._workers.add(worker)
        if self._closed:  # closed while it was starting
            worker.retire()
            msg = "this ProcessPool was closed while a worker was starting."
            raise RuntimeError(msg)
        return worker

    def _abandon(
        self,
        loop: asyncio.AbstractEventLoop,
        proc: BaseProcess,
        parent_sock: socket.socket,
        child_sock: socket.socket,
        started: asyncio.Future[None],
    ) -> None:
        # The caller was cancelled while the worker was starting: once started,
        # adopt it and let it exit at once.
        child_sock.close()
        if started.cancelled() or started.exception() is not None or loop.is_closed():
            parent_sock.close()
            return
        worker = Worker(self, loop, proc, parent_sock)
        self._workers.add(worker)
        worker.retire()

    def _forget(self, worker: Worker) -> None:
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None or not self._idle or math.isinf(self.idle_timeout):
            return
        assert self._loop is not None
        when = min(w.idle_since for w in self._idle) + self.idle_timeout
        self._idle_timer = self._loop.call_at(when, self._stop_idle)

    def _stop_idle(self) -> None:
        self._idle_timer = None
        assert self._loop is not None
        # The timer may fire a hair early: a little slack avoids a re-arm loop.
        deadline = self._loop.time() - self.idle_timeout + 0.01
        for worker in [w for w in self._idle if w.idle_since <= deadline]:
            self._idle.remove(worker)
            worker.retire()
        self._arm_idle_timer()

    # ---------------------------------------------------------------- close
    async def aclose(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after 2 seconds. Idempotent.

        A task still running fails with ``WorkerCrashed``.
        """
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._idle.clear()
        workers = [w for w in self._workers if not w.exited.done()]
        if not workers:
            return
        if asyncio.get_running_loop() is not self._loop:
            for worker in workers:
                worker.kill_now()
            return
        for worker in workers:
            worker.signal(signal.SIGTERM)
        _, late = await asyncio.wait([w.exited for w in workers], timeout=_TERMINATE_GRACE)
        for worker in workers:
            if not worker.exited.done():
                worker.kill()
        if late:
            await asyncio.wait(late, timeout=_TERMINATE_GRACE)
        for worker in workers:
            worker.close_channel()
