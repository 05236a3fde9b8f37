"""The child side of ``isolation="process"``: the loop each worker process runs.

A worker serves one request at a time from its parent (``pool.ProcessPool``)
over a socket, in the messages ``wire`` describes, under the per-task limits
of ``limits``. While a task runs, ``current`` tells it which task it is and
carries its progress to the parent.

``main`` is the worker process's target. This module and the ones it imports
use only the standard library.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import pickle
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from . import current
from .limits import Budget, default_cpu_signals
from .wire import HEADER, PROTOCOL, encode

__all__ = ["main", "resolve"]

_PARENT_CHECK_INTERVAL = 1.0  # seconds between checks that the parent is alive


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

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._running = False

    def begin(self, task_id: str, name: str, attempt: int) -> None:
        current._worker_task = current.WorkerTask(id=task_id, name=name, attempt=attempt)
        with self._lock:
            self._running = True

    def end(self) -> None:
        with self._lock:
            self._running = False
        current._worker_task = None

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
    budget = Budget(cpu_time, memory)
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
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    default_cpu_signals()

    channel = _Channel(sock)
    state = _TaskState(channel)
    _watch_parent(sock.fileno())
    current._in_worker = True
    current.child_progress_sink = state.progress
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
        current.child_progress_sink = None
