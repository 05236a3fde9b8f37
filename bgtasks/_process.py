"""``isolation="process"``: a pool of worker processes with hard per-task OS limits.

The parent side lives here: ``ProcessPool`` (used by the runtime), the checks
run when a function is decorated and when it is called, and the child-side
hooks a task reads inside a worker (``in_worker``, ``worker_task``,
``report_progress_in_worker``). The worker's own loop is in ``_process_worker``.

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
import dataclasses
import functools
import inspect
import logging
import math
import multiprocessing
import multiprocessing.util  # registers its atexit hook before ours, so ours runs first
import os
import pickle
import signal
import socket
import sys
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from . import _process_worker as _child
from ._errors import CPULimitExceeded, MemoryLimitExceeded, WorkerCrashed

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

__all__ = [
    "ProcessPool",
    "RemoteTraceback",
    "WorkerTask",
    "WorkerTaskError",
    "check_importable",
    "check_picklable",
    "child_progress_sink",
    "in_worker",
    "report_progress_in_worker",
    "worker_task",
]

logger = logging.getLogger("bgtasks")

ProgressCallback = Callable[[float, float | None, str | None], None]

_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
_RETIRE_GRACE = 5.0  # seconds a retired worker has to exit before it is killed
_TERMINATE_GRACE = 2.0  # seconds aclose() waits after SIGTERM before SIGKILL
_EXIT_AFTER_EOF = 5.0  # seconds to wait for a worker that closed its socket to exit
_LARGE = 1 << 20  # a message body past this size is read into a buffer of its own
_CPU_WARNING = 0.9  # on_cpu_warning fires at this share of the CPU budget
_CPU_CHECK_INTERVAL = 0.05  # at most this many seconds between looks at a worker's CPU

# ---------------------------------------------------------------- child side

child_progress_sink: ProgressCallback | None = None
"""In a worker while it runs a task: sends progress to the parent. None elsewhere."""

_in_worker = False
_worker_task: WorkerTask | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerTask:
    """The task running in this worker process: its id, name and attempt, and progress."""

    id: str
    name: str
    attempt: int

    def report_progress(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Show progress in the task's record, as ``CurrentTask.report_progress`` does."""
        report_progress_in_worker(done, total, message)


def in_worker() -> bool:
    """True in a bgtasks worker process (``isolation="process"``)."""
    return _in_worker


def worker_task() -> WorkerTask | None:
    """The task this worker process is running, or None (also in the parent)."""
    return _worker_task


def report_progress_in_worker(
    done: float, total: float | None = None, message: str | None = None
) -> None:
    """Send progress from a task running in a worker process to its record."""
    sink = child_progress_sink
    if sink is None:
        msg = (
            "report_progress_in_worker() was called outside a task running in a bgtasks "
            'worker process (isolation="process"); in other tasks use '
            "bgtasks.current_task().report_progress(...)."
        )
        raise RuntimeError(msg)
    sink(done, total, message)


# ------------------------------------------------------------------- errors


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as its ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class WorkerTaskError(RuntimeError):
    """A task in a worker raised an exception that could not be sent back as itself.

    ``type_name`` and ``message`` are the original's; its traceback is the
    ``__cause__`` (and ``remote_traceback``).
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str, reason: str) -> None:
        text = f"{type_name}: {message}" if message else type_name
        super().__init__(
            f"{text} (raised in a worker process; the original exception could not be "
            f"sent back because {reason})"
        )
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


# ------------------------------------------------------------------- checks


def _label(fn: object) -> str:
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
    label = _label(target)
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
        pickle.dumps(value, _child.PROTOCOL)
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


def _function_ref(fn: Callable[..., Any]) -> tuple[str, str, int] | None:
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


def _encode_request(
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
    ref = _function_ref(fn)
    try:
        payload = pickle.dumps((ref, None if ref else fn, args, kwargs), _child.PROTOCOL)
    except Exception as exc:
        check_picklable(args, kwargs, fn=fn)
        check_importable(fn)
        msg = (
            f"{_label(fn)} cannot be sent to a worker process: {type(exc).__name__}: {exc}. "
            'isolation="process" needs a function importable by its module and name.'
        )
        raise TypeError(msg) from exc
    meta = ("run", task_id, name, attempt, cpu_time, memory, watch_cpu)
    return _child.encode(meta, payload)


# ------------------------------------------------------------------- worker


class _Worker:
    """One worker process seen from the event loop: its socket, its exit, its inbox."""

    def __init__(
        self,
        pool: ProcessPool,
        loop: asyncio.AbstractEventLoop,
        proc: BaseProcess,
        sock: socket.socket,
    ) -> None:
        assert proc.pid is not None
        pool._started += 1
        self.pool = pool
        self.loop = loop
        self.proc = proc
        self.pid: int = proc.pid
        self.sentinel = proc.sentinel
        self.tasks = 0
        self.idle_since = 0.0
        self.busy = False
        self.exited: asyncio.Future[int | None] = loop.create_future()
        # (meta, blob) of each message from the worker; None once the channel closed
        self.inbox: asyncio.Queue[tuple[tuple[Any, ...], memoryview] | None] = asyncio.Queue()
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._in = bytearray()  # received bytes not yet parsed
        self._large: bytearray | None = None  # the body of a large message being read
        self._large_meta = 0
        self._got = 0
        self._out: deque[memoryview] = deque()  # pieces not yet written
        self._writing = False
        sock.setblocking(False)
        loop.add_reader(self._fd, self._on_readable)
        loop.add_reader(self.sentinel, self._on_exit)

    @property
    def alive(self) -> bool:
        return not self.exited.done() and self._sock is not None

    # -- the socket
    def send(self, parts: list[bytes]) -> None:
        """Queue a message (the pieces from ``_child.encode``) and write what fits now."""
        if self._sock is None:
            return  # the inbox already holds the end-of-channel marker
        self._out.extend(memoryview(part) for part in parts)
        if not self._writing:
            self._flush()
            if self._out and self._sock is not None:
                self._writing = True
                self.loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        sock = self._sock
        out = self._out
        while out and sock is not None:
            part = out[0]
            try:
                sent = sock.send(part)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close_channel()
                return
            if sent < len(part):
                out[0] = part[sent:]
                return
            out.popleft()
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        large = self._large
        try:
            if large is not None:
                # A large message: read straight into its own buffer, no copies.
                got = sock.recv_into(memoryview(large)[self._got :])
            else:
                data = sock.recv(1 << 18)
                got = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = 0
        if got == 0:
            self.close_channel()
            return
        if large is not None:
            self._got += got
            if self._got == len(large):
                self._large = None
                self._deliver(self._large_meta, large)
            return
        buf = self._in
        buf += data
        head = _child.HEADER.size
        while len(buf) >= head:
            meta_size, blob_size = _child.HEADER.unpack_from(buf)
            end = head + meta_size + blob_size
            if len(buf) >= end:
                body = buf[head:end]
                del buf[:end]
                self._deliver(meta_size, body)
                continue
            if end - head > _LARGE:
                large = bytearray(end - head)
                self._got = len(buf) - head
                large[: self._got] = memoryview(buf)[head:]
                self._large, self._large_meta = large, meta_size
                buf.clear()
            break

    def _deliver(self, meta_size: int, body: bytearray) -> None:
        view = memoryview(body)
        try:
            meta = pickle.loads(view[:meta_size])
        except Exception as exc:
            meta = ("corrupt", f"{type(exc).__name__}: {exc}")
        self.inbox.put_nowait((meta, view[meta_size:]))

    def close_channel(self) -> None:
        """Close our end (the worker then exits) and mark the end of its messages."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self.loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self._fd)
        self._out.clear()
        self._large = None
        sock.close()
        self.inbox.put_nowait(None)

    # -- the process
    def _on_exit(self) -> None:
        self.loop.remove_reader(self.sentinel)
        # The sentinel is ready, so the process has exited: join() returns at once.
        self.proc.join()
        code = self.proc.exitcode
        self.proc.close()
        self.exited.set_result(code)
        self.pool._forget(self)
        if not self.busy:
            self.close_channel()
        elif self._sock is not None:
            # What it wrote before dying is still in the socket: let the reader
            # drain it; the end of the channel normally follows at once.
            self.loop.call_later(0.5, self.close_channel)

    def signal(self, sig: int) -> None:
        if self.exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def retire(self) -> None:
        """Let the worker exit on its own; kill it if it has not after a grace period."""
        self.close_channel()
        if not self.exited.done():
            self.loop.call_later(_RETIRE_GRACE, self.signal, signal.SIGKILL)

    async def wait_exit(self, grace: float) -> int | None:
        """The exit code, killing the worker if it has not exited within ``grace`` seconds."""
        if not self.exited.done():
            done, _ = await asyncio.wait((self.exited,), timeout=grace)
            if not done:
                self.kill()
                await asyncio.wait((self.exited,), timeout=grace)
        return self.exited.result() if self.exited.done() else None

    def kill_now(self) -> None:
        """Last resort outside the event loop (interpreter exit)."""
        if not self.exited.done():
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)


class _CpuWatch:
    """Calls ``on_warning`` once a worker has used 90% of a task's CPU budget.

    The parent reads the worker's CPU time (``/proc`` through psutil) rather than
    the worker timing itself: a thread in the worker would need the GIL, which a
    busy task or a long C call holds. On a busy machine the last 10% may pass
    between two looks; ``run`` then warns before it raises ``CPULimitExceeded``,
    so the warning always comes first.
    """

    def __init__(self, worker: _Worker, cpu_time: float, on_warning: Callable[[], None]) -> None:
        self._worker = worker
        self._budget = cpu_time
        self._on_warning = on_warning
        self._warn_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._process: Any = None
        self._warned = False

    @classmethod
    def maybe(
        cls, worker: _Worker, cpu_time: float | None, on_warning: Callable[[], None] | None
    ) -> _CpuWatch | None:
        if cpu_time is None or on_warning is None:
            return None
        return cls(worker, cpu_time, on_warning)

    def start(self, cpu_start: float) -> None:
        """The task began when the worker had used ``cpu_start`` CPU seconds."""
        import psutil

        try:
            self._process = psutil.Process(self._worker.pid)
        except psutil.Error:
            return
        self._warn_at = cpu_start + _CPU_WARNING * self._budget
        self._check()

    def _check(self) -> None:
        import psutil

        self._timer = None
        try:
            times = self._process.cpu_times()
        except psutil.Error:
            return
        left = self._warn_at - (times.user + times.system)
        if left <= 0:
            self.warn()
            return
        # CPU time passes no faster than wall time for one busy thread; a task
        # running several at once is caught by the cap.
        self._timer = self._worker.loop.call_later(min(left, _CPU_CHECK_INTERVAL), self._check)

    def warn(self) -> None:
        """Call ``on_warning`` unless it was called already."""
        self.stop()
        if not self._warned:
            self._warned = True
            _call_safely(self._on_warning)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# --------------------------------------------------------------------- pool

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
        self._idle: deque[_Worker] = deque()
        self._workers: set[_Worker] = set()  # every worker not yet reaped
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
        label = name or _label(fn)
        request = _encode_request(
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
            cpu_watch = _CpuWatch.maybe(worker, cpu_time, on_cpu_warning)
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
        if cpu_watch is not None and reply[0] == "died" and _cpu_limit_signal(reply[1]):
            cpu_watch.warn()  # the 90% look came too late (a busy machine): warn before failing
            # A callback that hands the warning to the loop (call_soon_threadsafe,
            # as the runtime's does) gets it handled while the task still runs.
            await asyncio.sleep(0)
        return self._settle(reply, blob, worker, label, cpu_time, memory)

    async def _exchange(
        self,
        worker: _Worker,
        request: list[bytes],
        on_progress: ProgressCallback | None,
        cpu_watch: _CpuWatch | None,
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
                        _call_safely(on_progress, *meta[1:])
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
        worker: _Worker,
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
            raise _rebuild_error(reply, blob)
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
            raise _death_error(reply[1], worker, name, cpu_time, memory, self._closed)
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

    async def _checkout(self) -> _Worker:
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

    def _checkin(self, worker: _Worker, keep: bool) -> None:
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

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        parent_sock, child_sock = socket.socketpair()
        proc: BaseProcess = self._ctx.Process(
            target=_child.main, args=(child_sock,), name="bgtasks-worker", daemon=False
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
        worker = _Worker(self, loop, proc, parent_sock)
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
        worker = _Worker(self, loop, proc, parent_sock)
        self._workers.add(worker)
        worker.retire()

    def _forget(self, worker: _Worker) -> None:
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


def _call_safely(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("bgtasks: a callback of ProcessPool.run raised; ignoring it")


def _rebuild_error(reply: tuple[Any, ...], blob: memoryview) -> BaseException:
    _, type_name, text, tb, reason = reply
    remote = RemoteTraceback(tb)
    if blob:
        try:
            exc = pickle.loads(blob)
        except Exception as load_error:
            reason = (
                f"it could not be unpickled ({type(load_error).__name__}: {load_error}); "
                "pass every "
                "argument of its __init__ on to super().__init__() to make it picklable"
            )
        else:
            if isinstance(exc, BaseException):
                exc.__cause__ = remote
                return exc
            reason = f"it unpickled as a {type(exc).__name__}"
    err = WorkerTaskError(type_name, text, tb, reason)
    err.__cause__ = remote
    return err


def _cpu_limit_signal(code: int | None) -> bool:
    """Whether an exit code says the kernel stopped the worker at its CPU limit."""
    return code is not None and -code in (
        getattr(signal, "SIGPROF", None),
        getattr(signal, "SIGXCPU", None),
    )


_CRASH_SIGNALS = {"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"}


def _death_error(
    code: int | None,
    worker: _Worker,
    name: str,
    cpu_time: float | None,
    memory: int | None,
    closing: bool,
) -> BaseException:
    signame = ""
    if code is not None and code < 0:
        try:
            signame = signal.Signals(-code).name
        except ValueError:
            signame = f"signal {-code}"
    if cpu_time is not None and _cpu_limit_signal(code) and not closing:
        msg = (
            f"task {name!r} used more than its CPU limit of {cpu_time:g}s, so its worker "
            "process was stopped; raise Limits.cpu_time if the work needs more."
        )
        return CPULimitExceeded(msg)
    if code is None:
        how = "died (its exit code is unknown)"
    elif signame:
        how = f"was killed by {signame} ({-code})"
    else:
        how = f"exited with code {code}"
    if closing:
        why = "the process pool was closing"
    elif signame in _CRASH_SIGNALS:
        why = "a crash in native code (a C extension or ctypes)"
        if memory is not None:
            why += f", possibly an allocation past its memory limit of {memory} bytes"
    elif signame == "SIGKILL":
        why = "the kernel's out-of-memory killer or another process sending SIGKILL"
    elif signame:
        why = "a signal from outside"
    else:
        why = "the task or a library it uses ended the process (os._exit or similar)"
    msg = (
        f"the worker process (pid {worker.pid}) running task {name!r} {how}; the likely "
        f"cause is {why}. The worker was replaced; give the task retries to run it again."
    )
    return WorkerCrashed(msg)
