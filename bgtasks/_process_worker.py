"""The child side of ``isolation="process"``: the loop each worker process runs.

A worker serves one request at a time from its parent (``_process.ProcessPool``)
over a socket. A message is a header (two 8-byte lengths), a small pickled
tuple, the *meta*, and a *blob* of bytes that may be empty: large pickles travel
as blobs so they are neither pickled twice nor copied into a bigger frame.

The request is ``("run", task_id, name, attempt, cpu_time, memory, watch_cpu)``
with the blob ``pickle((ref, fn, args, kwargs))``. The worker answers with any
number of ``("progress", done, total, message)``, with ``("started",
cpu_seconds)`` (its CPU time as the task began) if ``watch_cpu``, then exactly
one of (blob in brackets)::

    ("ok",) [result pickle]
    ("err", type_name, message, traceback_text, reason) [exception pickle or empty]
    ("memory", traceback_text)                    MemoryError under a memory limit
    ("load", type_name, message, traceback_text)  the request could not be unpickled
    ("bad_result", type_name, reason)             the result cannot be pickled

Limits are per task and relative to what the worker had used before it:

- CPU: ``ITIMER_PROF`` counts the process's CPU time and, with ``SIGPROF`` left
  at its default action, terminates the process the moment the budget is spent,
  even in the middle of one long C call. ``RLIMIT_CPU`` (soft limit only, whole
  seconds, ``SIGXCPU``) backs it up should the task re-arm the timer itself.
- Memory: a soft ``RLIMIT_AS`` at the current address space plus the budget, so
  an allocation past it raises ``MemoryError``. The worker then answers and exits:
  a process that ran out of memory may be in a bad state.

This module imports only the standard library; ``resource`` and the itimers
exist on Unix only and are touched in the worker alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import math
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["HEADER", "PROTOCOL", "encode", "main"]

HEADER = struct.Struct("!QQ")  # length of the meta pickle, length of the blob
PROTOCOL = pickle.HIGHEST_PROTOCOL
_SMALL = 1 << 16  # a blob up to this size is sent in one piece with its header
_PARENT_CHECK_INTERVAL = 1.0  # seconds between checks that the parent is alive


def encode(meta: tuple[Any, ...], blob: bytes = b"") -> list[bytes]:
    """One message as the pieces that go on the wire, in order."""
    head = pickle.dumps(meta, PROTOCOL)
    first = HEADER.pack(len(head), len(blob)) + head
    if len(blob) <= _SMALL:
        return [first + blob]
    return [first, blob]


def resolve(module: str, qualname: str, depth: int) -> Callable[..., Any]:
    """Import ``module.qualname`` and unwrap it ``depth`` times (``__wrapped__``).

    The parent sends a function by name rather than by pickle because a function
    decorated with ``@background`` is not what its module attribute holds: that
    is the wrapper, and the original sits ``depth`` steps down its ``__wrapped__``
    chain.
    """
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    for _ in range(depth):
        obj = obj.__wrapped__
    if not callable(obj):
        msg = f"{module}.{qualname} is not callable in the worker process."
        raise TypeError(msg)
    return obj  # type: ignore[no-any-return]


class _Channel:
    """The worker's blocking end of the socket; sends may come from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._lock = threading.Lock()

    def recv(self) -> tuple[tuple[Any, ...], memoryview] | None:
        """The next message as (meta, blob), or None once the parent has closed its end."""
        header = self._read(HEADER.size)
        if header is None:
            return None
        meta_size, blob_size = HEADER.unpack(header)
        body = self._read(meta_size + blob_size)
        if body is None:
            return None
        view = memoryview(body)
        meta: tuple[Any, ...] = pickle.loads(view[:meta_size])
        return meta, view[meta_size:]

    def _read(self, size: int) -> bytearray | None:
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            try:
                n = self._sock.recv_into(view[got:])
            except OSError:
                return None
            if n == 0:
                return None
            got += n
        return buf

    def send(self, meta: tuple[Any, ...], blob: bytes = b"") -> None:
        parts = encode(meta, blob)
        with self._lock:
            for part in parts:
                self._sock.sendall(part)


class _TaskState:
    """What the worker runs now: for progress and ``worker_task()``.

    The task's own threads may report progress; the lock makes sure no report
    is sent after the task's reply, where the parent would take it for news of
    the next task.
    """

    def __init__(self, channel: _Channel, pool_side: Any) -> None:
        self._channel = channel
        self._pool_side = pool_side
        self._lock = threading.Lock()
        self._running = False

    def begin(self, task_id: str, name: str, attempt: int) -> None:
        self._pool_side._worker_task = self._pool_side.WorkerTask(
            id=task_id, name=name, attempt=attempt
        )
        with self._lock:
            self._running = True

    def end(self) -> None:
        with self._lock:
            self._running = False
        self._pool_side._worker_task = None

    def send(self, meta: tuple[Any, ...]) -> None:
        self._channel.send(meta)

    def progress(self, done: float, total: float | None, message: str | None) -> None:
        update = (
            "progress",
            float(done),
            None if total is None else float(total),
            None if message is None else str(message),
        )
        with self._lock:
            if self._running:
                self._channel.send(update)


class _Budget:
    """Per-task CPU and address-space limits, relative to what is used now."""

    def __init__(self, cpu_time: float | None, memory: int | None) -> None:
        self.cpu_time = cpu_time
        self.memory = memory
        self.cpu_start = 0.0
        self._saved: list[tuple[int, tuple[int, int]]] = []
        self._timer = False

    def apply(self) -> None:
        import resource

        if self.cpu_time is not None:
            # The limit relies on the default actions (terminate the process); an
            # earlier task may have installed handlers.
            _default_cpu_signals()
            self.cpu_start = used = time.process_time()
            # The kernel checks RLIMIT_CPU in whole seconds: round up so it never
            # fires before the budget; the itimer is the precise limit.
            self._lower(resource.RLIMIT_CPU, math.ceil(used + self.cpu_time))
            signal.setitimer(signal.ITIMER_PROF, self.cpu_time)
            self._timer = True
        if self.memory is not None:
            self._lower(resource.RLIMIT_AS, _address_space() + self.memory)

    def _lower(self, which: int, soft: int) -> None:
        import resource

        old_soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        # Only the soft limit moves: the hard one stays, so it can be raised again.
        resource.setrlimit(which, (soft, hard))
        self._saved.append((which, (old_soft, hard)))

    def restore(self) -> None:
        """Lift the limits again; safe to call more than once."""
        if self._timer:
            signal.setitimer(signal.ITIMER_PROF, 0)
            self._timer = False
        if self._saved:
            import resource

            while self._saved:
                which, limits = self._saved.pop()
                resource.setrlimit(which, limits)


def _default_cpu_signals() -> None:
    for name in ("SIGPROF", "SIGXCPU"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)


def _address_space() -> int:
    """The worker's current virtual memory size in bytes."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[0])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().vms)


def _caused_by_memory_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MemoryError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _type_name_of(value: object) -> str:
    cls = value if isinstance(value, type) else type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _error_reply(exc: BaseException) -> tuple[tuple[Any, ...], bytes]:
    data = b""
    # Only an Exception goes back as itself: SystemExit or KeyboardInterrupt
    # raised in the parent's event loop would take the parent down.
    if isinstance(exc, Exception):
        try:
            data = pickle.dumps(exc, PROTOCOL)
        except Exception as err:
            reason = (
                f"it could not be pickled ({type(err).__name__}: {err}); keep only "
                "picklable values on the exception to get the original type back"
            )
        else:
            reason = ""
    else:
        reason = "it is not an Exception (only Exceptions are sent back as themselves)"
    return ("err", _type_name_of(exc), str(exc), _traceback(exc), reason), data


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


def _load(blob: memoryview) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    ref, fn, args, kwargs = pickle.loads(blob)
    if ref is not None:
        fn = resolve(*ref)
    return fn, args, kwargs


def _run(
    meta: tuple[Any, ...],
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]],
    state: _TaskState,
) -> tuple[tuple[Any, ...], bytes, bool]:
    """Run one task; return the reply (meta, blob) and whether the worker should exit."""
    _, task_id, name, attempt, cpu_time, memory, watch_cpu = meta
    fn, args, kwargs = call
    budget = _Budget(cpu_time, memory)
    state.begin(task_id, name, attempt)
    try:
        budget.apply()
        if watch_cpu:
            # The parent watches our CPU time from here for the 90% warning.
            state.send(("started", budget.cpu_start))
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
    except BaseException as exc:
        # Lift the limits before anything else allocates.
        budget.restore()
        if memory is not None and _caused_by_memory_error(exc):
            return ("memory", _traceback(exc)), b"", True
        return (*_error_reply(exc), False)
    finally:
        budget.restore()
        state.end()
    try:
        data = pickle.dumps(result, PROTOCOL)
    except Exception as exc:
        return ("bad_result", _type_name_of(result), f"{type(exc).__name__}: {exc}"), b"", False
    return ("ok",), data, False


def _watch_parent(fd: int) -> None:
    """Exit the worker when its parent dies, even in the middle of a task.

    The parent never writes during a task, so the socket only reports hang-up
    (its end closed: the parent exited or retired us). A changed parent pid
    covers a parent whose socket end lives on in a process it forked.
    """
    ppid = os.getppid()
    poller = select.poll()
    poller.register(fd, 0)  # 0: only POLLHUP, POLLERR and POLLNVAL are reported

    def watch() -> None:
        while not poller.poll(_PARENT_CHECK_INTERVAL * 1000) and os.getppid() == ppid:
            pass
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)

    threading.Thread(target=watch, name="bgtasks-parent-watch", daemon=True).start()


def main(sock: socket.socket) -> None:
    """Serve requests on ``sock`` until the parent closes it (the process target)."""
    from . import _process as pool_side

    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _default_cpu_signals()

    channel = _Channel(sock)
    state = _TaskState(channel, pool_side)
    _watch_parent(sock.fileno())
    pool_side._in_worker = True
    pool_side.child_progress_sink = state.progress
    try:
        while (message := channel.recv()) is not None:
            meta, blob = message
            del message
            try:
                call = _load(blob)
            except BaseException as exc:
                channel.send(("load", _type_name_of(exc), str(exc), _traceback(exc)))
                continue
            finally:
                del blob  # the request's bytes: not kept alive during the task
            reply, data, leave = _run(meta, call, state)
            del call
            channel.send(reply, data)
            del data
            if leave:
                break
    except OSError:
        pass  # the parent went away mid-reply: nobody is left to answer
    finally:
        pool_side.child_progress_sink = None
