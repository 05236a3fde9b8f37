"""Functions the process-pool tests run in worker processes.

They live in their own module because a worker imports a task function by its
module and name; test modules are not meant to be imported twice.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import bgtasks
from bgtasks import _process

F = TypeVar("F", bound=Callable[..., Any])


def add(a: int, b: int) -> int:
    return a + b


def pid() -> int:
    return os.getpid()


def boom(message: str) -> None:
    raise ValueError(message)


class TwoArgError(Exception):
    """Pickles, but does not unpickle: __init__ takes two arguments, args holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_two_arg_error() -> None:
    raise TwoArgError("x", "y")


def exit_with_system_exit() -> None:
    raise SystemExit(4)


def spin_forever() -> None:
    while True:
        pass


def long_c_call() -> bytes:
    # One C call that runs for minutes and never returns to the interpreter.
    return hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)


def allocate(size: int) -> int:
    block = bytearray(size)
    return len(block)


def threaded_alloc(size: int) -> int:
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(len(bytearray(size))))
    thread.start()
    thread.join()
    return out[0]


def limits_now() -> tuple[Any, ...]:
    """The worker's CPU and address-space limits and its CPU timer."""
    import resource

    return (
        resource.getrlimit(resource.RLIMIT_CPU),
        resource.getrlimit(resource.RLIMIT_AS),
        signal.getitimer(signal.ITIMER_PROF),
        os.getpid(),
    )


def burn(seconds: float) -> float:
    """Use ``seconds`` of CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return seconds


def hard_exit(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def report_pid_then_sleep(seconds: float) -> None:
    _process.report_progress_in_worker(os.getpid(), None, "started")
    time.sleep(seconds)


def count_with_progress(n: int) -> int:
    for i in range(1, n + 1):
        _process.report_progress_in_worker(i, n, f"step {i}")
    return n


def whoami() -> tuple[bool, str, str, int] | None:
    task = _process.worker_task()
    if task is None:
        return None
    return (_process.in_worker(), task.id, task.name, task.attempt)


def unpicklable_result() -> Any:
    return lambda: None


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0.01)
    return a + b


def _refuse_to_schedule(fn: F) -> F:
    """A stand-in for @background: the module attribute is a wrapper, not ``fn``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the worker called the wrapper instead of the original")

    return wrapper  # type: ignore[return-value]


@_refuse_to_schedule
def wrapped_double(x: int) -> int:
    return 2 * x


@bgtasks.background(isolation="process")
def bg_double(x: int) -> int:
    return 2 * x


@bgtasks.background(isolation="process", limits=bgtasks.Limits(cpu_time=0.5))
def bg_spin() -> None:
    spin_forever()


@bgtasks.background(isolation="process")
def bg_crash() -> None:
    os._exit(7)


@bgtasks.background(isolation="process", limits=bgtasks.Limits(wall_clock=0.5))
def bg_sleep() -> None:
    _report_pid()
    time.sleep(30)


def _report_pid() -> None:
    """Show the worker's pid as the task's progress (``done``), message "started"."""
    task = bgtasks.current_task()
    assert task is not None
    task.report_progress(os.getpid(), None, "started")


@bgtasks.background(isolation="process")
def bg_add(a: int, b: int) -> int:
    return a + b


@bgtasks.background(isolation="process")
def bg_pid() -> int:
    return os.getpid()


@bgtasks.background(isolation="process")
async def bg_async_sum_and_pid(a: int, b: int) -> tuple[int, int]:
    await asyncio.sleep(0.01)
    return a + b, os.getpid()


@bgtasks.background(isolation="process")
def bg_allocate(size: int) -> int:
    return allocate(size)


@bgtasks.background(isolation="process")
def bg_long_c_call() -> int:
    return len(long_c_call())


@bgtasks.background(isolation="process", retries=1)
def bg_crash_before_attempt(succeed_on: int) -> int:
    """Kill the worker on every attempt before ``succeed_on``; return the attempt."""
    task = bgtasks.current_task()
    assert task is not None
    if task.attempt < succeed_on:
        os._exit(9)
    return task.attempt


@bgtasks.background(isolation="process")
def bg_count_with_progress(n: int) -> int:
    task = bgtasks.current_task()
    assert task is not None
    for i in range(1, n + 1):
        task.report_progress(i, n, f"step {i}")
    return n


@bgtasks.background(isolation="process")
def bg_report_pid_then_sleep(seconds: float) -> None:
    _report_pid()
    time.sleep(seconds)


@bgtasks.background(durable=True, isolation="process")
def durable_wait_for(gate: str) -> int:
    """Durable and isolated: wait in the worker until ``gate`` exists; answer its pid."""
    while not os.path.exists(gate):
        time.sleep(0.01)
    return os.getpid()


@bgtasks.background(durable=True)
def append_id(path: str) -> None:
    """Durable: append this task's id and pid to ``path``, a log of every run.

    Here rather than in durable_apps (which builds a FastAPI app) so that the
    processes that replay it start quickly.
    """
    task = bgtasks.current_task()
    assert task is not None
    # One short line written at once to a file opened for appending: lines never interleave.
    with open(path, "a") as f:
        f.write(f"{task.id} {os.getpid()}\n")


def uses_a_step() -> int:
    """A process-isolated task that tries step.run (not supported there)."""
    from bgtasks import step

    return asyncio.run(step.run("inside a worker", int))
