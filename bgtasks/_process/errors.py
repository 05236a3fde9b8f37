"""How a task's failure in a worker process reaches the parent as an exception.

An exception that crosses back keeps the worker's traceback as its
``__cause__`` (a ``RemoteTraceback``); one that cannot cross becomes
``WorkerTaskError``. A worker that died becomes ``CPULimitExceeded`` (the
kernel stopped it at its CPU budget) or ``WorkerCrashed``, with the likely
cause named. A failing ``run`` callback is logged, never raised.
"""

from __future__ import annotations

import logging
import pickle
import signal
from collections.abc import Callable
from typing import Any

from .._errors import CPULimitExceeded, WorkerCrashed

__all__ = [
    "RemoteTraceback",
    "WorkerTaskError",
    "call_safely",
    "cpu_limit_signal",
    "death_error",
    "rebuild_error",
]

logger = logging.getLogger("bgtasks")


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


def call_safely(callback: Callable[..., None], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        logger.exception("bgtasks: a callback of ProcessPool.run raised; ignoring it")


def rebuild_error(reply: tuple[Any, ...], blob: memoryview) -> BaseException:
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


def cpu_limit_signal(code: int | None) -> bool:
    """Whether an exit code says the kernel stopped the worker at its CPU limit."""
    return code is not None and -code in (
        getattr(signal, "SIGPROF", None),
        getattr(signal, "SIGXCPU", None),
    )


_CRASH_SIGNALS = {"SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"}


def death_error(
    code: int | None,
    pid: int,
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
    if cpu_time is not None and cpu_limit_signal(code) and not closing:
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
        f"the worker process (pid {pid}) running task {name!r} {how}; the likely "
        f"cause is {why}. The worker was replaced; give the task retries to run it again."
    )
    return WorkerCrashed(msg)
