"""ProcessPool: worker processes with hard per-task CPU and memory limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

import bgtasks

sys.path.insert(0, str(Path(__file__).resolve().parent))

import process_funcs as pf  # needs the path above; workers inherit sys.path

from bgtasks._errors import (
    CPULimitExceeded,
    MemoryLimitExceeded,
    WorkerCrashed,
)
from bgtasks._process import (
    ProcessPool,
    RemoteTraceback,
    WorkerTaskError,
    check_importable,
    check_picklable,
    in_worker,
    report_progress_in_worker,
    worker_task,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process limits are Linux-only")

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # module scope: the shared runtime below lives across tests


@pytest.fixture
async def pool() -> AsyncIterator[ProcessPool]:
    async with ProcessPool(size=2) as p:
        yield p


async def run(pool: ProcessPool, fn: Any, *args: Any, **options: Any) -> Any:
    options.setdefault("cpu_time", None)
    options.setdefault("memory", None)
    return await pool.run(fn, args, {}, **options)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------ results and errors


@pytest.mark.anyio
async def test_returns_the_result(pool: ProcessPool) -> None:
    assert await pool.run(pf.add, (1,), {"b": 2}, cpu_time=None, memory=None) == 3


@pytest.mark.anyio
async def test_runs_an_async_function_with_asyncio_run(pool: ProcessPool) -> None:
    assert await run(pool, pf.async_add, 2, 3) == 5


@pytest.mark.anyio
async def test_runs_the_original_under_a_wrapping_decorator(pool: ProcessPool) -> None:
    # Like @background: the module attribute is the wrapper, the pool gets the original.
    assert await run(pool, inspect.unwrap(pf.wrapped_double), 21) == 42


@pytest.mark.anyio
async def test_exception_propagates_with_the_worker_traceback(pool: ProcessPool) -> None:
    with pytest.raises(ValueError, match=r"^no luck$") as info:
        await run(pool, pf.boom, "no luck")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in boom" in str(cause)
    assert await run(pool, pf.add, 1, 1) == 2  # the worker is still usable


@pytest.mark.anyio
async def test_exception_that_cannot_cross_becomes_worker_task_error(pool: ProcessPool) -> None:
    with pytest.raises(WorkerTaskError, match=r"^process_funcs\.TwoArgError: x/y \(") as info:
        await run(pool, pf.raise_two_arg_error)
    assert info.value.type_name == "process_funcs.TwoArgError"
    assert "super().__init__()" in str(info.value)
    assert "raise TwoArgError" in info.value.remote_traceback

    with pytest.raises(WorkerTaskError, match=r"^SystemExit: 4 \(.*not an Exception"):
        await run(pool, pf.exit_with_system_exit)


@pytest.mark.anyio
async def test_unpicklable_result_is_a_type_error(pool: ProcessPool) -> None:
    with pytest.raises(TypeError, match="cannot be pickled to send it back"):
        await run(pool, pf.unpicklable_result)


@pytest.mark.anyio
async def test_unpicklable_argument_is_refused_before_a_worker_starts(pool: ProcessPool) -> None:
    with pytest.raises(TypeError, match=r"argument 'b' \(position 1\) \(lock\) cannot be pickled"):
        await run(pool, pf.add, 1, threading.Lock())
    assert pool.pids == []


# ------------------------------------------------------------------------ limits


async def stopped_at_cpu_limit(
    pool: ProcessPool, fn: Any, budget: float, warnings: list[float]
) -> tuple[float, float]:
    """Run ``fn`` on a warm worker until its CPU limit stops it.

    Returns the CPU seconds the worker used meanwhile (sampled from outside) and
    the wall-clock seconds it took, which depend on how busy the machine is.
    """
    worker = psutil.Process(await run(pool, pf.pid))
    samples: list[float] = []

    async def sample() -> None:
        with contextlib.suppress(psutil.Error):
            while True:
                times = worker.cpu_times()
                samples.append(times.user + times.system)
                await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    await asyncio.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(CPULimitExceeded, match=f"CPU limit of {budget:g}s"):
        await run(
            pool, fn, cpu_time=budget, on_cpu_warning=lambda: warnings.append(time.monotonic())
        )
    wall = time.monotonic() - start
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    # At 90% of the budget, and in any case before the error.
    assert len(warnings) == 1
    assert start < warnings[0] < start + wall
    return samples[-1] - samples[0], wall


@pytest.mark.anyio
async def test_cpu_limit_stops_a_python_loop(pool: ProcessPool) -> None:
    used, wall = await stopped_at_cpu_limit(pool, pf.spin_forever, 0.5, [])
    assert 0.3 < used < 0.5 + 0.15  # the limit is precise in CPU time ...
    assert wall < 0.5 + 1.5 or used < wall / 2  # ... and in wall time, unless starved of CPU
    assert await run(pool, pf.add, 1, 1) == 2


@pytest.mark.anyio
async def test_cpu_limit_stops_one_long_c_call(pool: ProcessPool) -> None:
    used, wall = await stopped_at_cpu_limit(pool, pf.long_c_call, 0.5, [])
    assert 0.3 < used < 0.5 + 0.15
    assert wall < 0.5 + 1.5 or used < wall / 2


@pytest.mark.anyio
async def test_no_cpu_warning_within_budget(pool: ProcessPool) -> None:
    warnings: list[None] = []
    for _ in range(3):
        await run(pool, pf.add, 1, 1, cpu_time=5.0, on_cpu_warning=lambda: warnings.append(None))
    assert warnings == []


@pytest.mark.anyio
async def test_cpu_limit_is_relative_to_what_the_worker_used() -> None:
    async with ProcessPool(size=1) as pool:
        worker = await run(pool, pf.pid)
        assert await run(pool, pf.burn, 1.2) == 1.2  # no limit: the worker is past 1.2 CPU s
        # A limit counted from the worker's start (RLIMIT_CPU at 0.5 s) would stop
        # this at once: the task gets its whole budget on top of what was used.
        assert await run(pool, pf.burn, 0.3, cpu_time=0.5) == 0.3
        assert await run(pool, pf.pid) == worker
        with pytest.raises(CPULimitExceeded, match=r"CPU limit of 0\.5s"):
            await run(pool, pf.burn, 1.0, cpu_time=0.5)
        assert gone(worker)


@pytest.mark.anyio
async def test_limits_end_with_the_task(pool: ProcessPool) -> None:
    before = await run(pool, pf.limits_now)
    assert await run(pool, pf.burn, 0.05, cpu_time=0.3, memory=100 * MiB) == 0.05
    assert await run(pool, pf.limits_now) == before  # same worker, limits lifted
    assert await run(pool, pf.burn, 0.5) == 0.5  # more than the last budget
    assert await run(pool, pf.allocate, 200 * MiB) == 200 * MiB


@pytest.mark.anyio
async def test_memory_limit(pool: ProcessPool) -> None:
    before = await run(pool, pf.pid)
    with pytest.raises(MemoryLimitExceeded, match=f"memory limit of {100 * MiB} bytes") as info:
        await run(pool, pf.allocate, 500 * MiB, memory=100 * MiB)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "MemoryError" in str(info.value.__cause__)
    # The worker was replaced, and the limit did not outlive the task.
    assert await run(pool, pf.allocate, 500 * MiB) == 500 * MiB
    assert before not in pool.pids


@pytest.mark.anyio
async def test_allocation_within_the_memory_limit_succeeds(pool: ProcessPool) -> None:
    assert await run(pool, pf.allocate, 20 * MiB, memory=100 * MiB) == 20 * MiB
    # A thread's stack and malloc arena fit in a modest budget too.
    assert await run(pool, pf.threaded_alloc, MiB, memory=64 * MiB) == MiB
    assert await run(pool, pf.async_add, 1, 2, memory=64 * MiB) == 3


# ----------------------------------------------------------------- worker deaths


@pytest.mark.anyio
async def test_os_exit_is_worker_crashed_and_the_pool_goes_on(pool: ProcessPool) -> None:
    with pytest.raises(WorkerCrashed, match=r"exited with code 3") as info:
        await run(pool, pf.hard_exit, 3, name="exiter")
    assert "'exiter'" in str(info.value)
    assert await run(pool, pf.add, 2, 2) == 4


@pytest.mark.anyio
async def test_segfault_is_worker_crashed(pool: ProcessPool) -> None:
    with pytest.raises(WorkerCrashed, match=r"killed by SIGSEGV \(11\).*native code"):
        await run(pool, pf.segfault)
    assert await run(pool, pf.add, 2, 2) == 4


@pytest.mark.anyio
async def test_sigkill_is_worker_crashed(pool: ProcessPool) -> None:
    with pytest.raises(WorkerCrashed, match=r"killed by SIGKILL \(9\).*out-of-memory killer"):
        await run(pool, pf.kill_self)
    assert await run(pool, pf.add, 2, 2) == 4


# ------------------------------------------------------------------ cancellation


@pytest.mark.anyio
async def test_cancellation_kills_the_worker(pool: ProcessPool) -> None:
    started = asyncio.Event()
    pids: list[int] = []

    def on_progress(done: float, total: float | None, message: str | None) -> None:
        pids.append(int(done))
        started.set()

    task = asyncio.create_task(run(pool, pf.report_pid_then_sleep, 30, on_progress=on_progress))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(pids[0])
    assert pids[0] not in pool.pids
    assert await run(pool, pf.add, 1, 2) == 3


@pytest.mark.anyio
async def test_anyio_timeout_kills_the_worker() -> None:
    pids: list[int] = []
    async with ProcessPool(size=1) as pool:
        with anyio.move_on_after(1.0) as scope:
            await run(
                pool,
                pf.report_pid_then_sleep,
                30,
                on_progress=lambda done, total, message: pids.append(int(done)),
            )
        assert scope.cancelled_caught
        assert gone(pids[0])
        assert await run(pool, pf.pid) != pids[0]


@pytest.mark.anyio
async def test_cancellation_while_the_worker_starts() -> None:
    async with ProcessPool(size=1) as pool:
        task = asyncio.create_task(run(pool, pf.add, 1, 2))
        await asyncio.sleep(0)  # now in the middle of starting a worker
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The worker that was starting is adopted and let go.
        with anyio.fail_after(10):
            while pool.workers_started == 0 or pool.pids:
                await anyio.sleep(0.02)
        assert await run(pool, pf.add, 1, 2) == 3


def test_workers_exit_when_the_parent_dies(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, os, signal, sys
            sys.path.insert(0, sys.argv[1])
            import process_funcs
            from bgtasks._process import ProcessPool

            def on_progress(done, total, message):
                print(int(done), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

            async def main():
                await ProcessPool(size=1).run(
                    process_funcs.report_pid_then_sleep, (60,), {},
                    cpu_time=None, memory=None, on_progress=on_progress,
                )

            if __name__ == "__main__":
                asyncio.run(main())
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).resolve().parent)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    worker = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(worker)


@pytest.mark.anyio
async def test_aclose_stops_a_busy_worker() -> None:
    pool = ProcessPool(size=1)
    started = asyncio.Event()
    pids: list[int] = []

    def on_progress(done: float, total: float | None, message: str | None) -> None:
        pids.append(int(done))
        started.set()

    task = asyncio.create_task(run(pool, pf.report_pid_then_sleep, 30, on_progress=on_progress))
    await asyncio.wait_for(started.wait(), 10)
    await pool.aclose()
    with pytest.raises(WorkerCrashed, match="pool was closing"):
        await task
    assert gone(pids[0])
    await pool.aclose()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await run(pool, pf.pid)


# ------------------------------------------------------- progress and task info


@pytest.mark.anyio
async def test_progress_reaches_the_callback(pool: ProcessPool) -> None:
    seen: list[tuple[float, float | None, str | None]] = []
    result = await run(
        pool,
        pf.count_with_progress,
        3,
        on_progress=lambda done, total, message: seen.append((done, total, message)),
    )
    assert result == 3
    assert seen == [(1.0, 3.0, "step 1"), (2.0, 3.0, "step 2"), (3.0, 3.0, "step 3")]


@pytest.mark.anyio
async def test_a_failing_progress_callback_is_logged(
    pool: ProcessPool, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(done: float, total: float | None, message: str | None) -> None:
        raise RuntimeError("callback bug")

    assert await run(pool, pf.count_with_progress, 2, on_progress=broken) == 2
    assert "callback of ProcessPool.run raised" in caplog.text


@pytest.mark.anyio
async def test_worker_knows_its_task(pool: ProcessPool) -> None:
    got = await run(pool, pf.whoami, task_id="t1", name="job", attempt=2)
    assert got == (True, "t1", "job", 2)
    assert not in_worker()
    assert worker_task() is None
    with pytest.raises(RuntimeError, match="outside a task running in a bgtasks worker"):
        report_progress_in_worker(1)


# --------------------------------------------------------- recycling and sizing


@pytest.mark.anyio
async def test_worker_is_replaced_after_max_tasks() -> None:
    async with ProcessPool(size=1, max_tasks_per_worker=2) as pool:
        pids = [await run(pool, pf.pid) for _ in range(3)]
    assert pids[0] == pids[1] != pids[2]


@pytest.mark.anyio
async def test_idle_worker_stops_after_idle_timeout() -> None:
    async with ProcessPool(size=1, idle_timeout=0.2) as pool:
        pid = await run(pool, pf.pid)
        with anyio.fail_after(5):
            while pool.pids:
                await anyio.sleep(0.05)
        assert gone(pid)
        assert await run(pool, pf.pid) != pid


@pytest.mark.anyio
async def test_size_bounds_the_workers() -> None:
    async with ProcessPool(size=2) as pool:
        pids: list[int] = []

        async def one() -> None:
            await run(
                pool,
                pf.report_pid_then_sleep,
                0.3,
                on_progress=lambda done, total, message: pids.append(int(done)),
            )

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(one)
        assert len(pids) == 4
        assert len(set(pids)) == 2


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="size"):
        ProcessPool(size=0)
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        ProcessPool(max_tasks_per_worker=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        ProcessPool(idle_timeout=0)
    assert ProcessPool().size >= 1


# ------------------------------------------------------------------------ checks


def test_check_importable_accepts_a_module_level_function() -> None:
    check_importable(pf.add)
    check_importable(pf.async_add)


def test_check_importable_rejects_a_lambda() -> None:
    with pytest.raises(TypeError, match=r"is a lambda.*Define it with def at the top level"):
        check_importable(lambda: None)


def test_check_importable_rejects_a_nested_function() -> None:
    def inner() -> None:
        pass

    with pytest.raises(TypeError, match=r"inside another function.*Move it to the top level"):
        check_importable(inner)


def test_check_importable_rejects_an_interactive_main(monkeypatch: pytest.MonkeyPatch) -> None:
    fn = types.FunctionType(pf.add.__code__, {}, "add")
    fn.__module__ = "__main__"
    fn.__qualname__ = "add"
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    with pytest.raises(TypeError, match=r"interactive __main__.*Move it into a module file"):
        check_importable(fn)


def test_check_picklable_names_the_argument() -> None:
    check_picklable((1, "x"), {"y": [1, 2]})
    with pytest.raises(TypeError, match=r"^positional argument 1 \(lock\) cannot be pickled"):
        check_picklable((1, threading.Lock()), {})
    with pytest.raises(TypeError, match=r"^argument 'b' \(position 1\)"):
        check_picklable((1, threading.Lock()), {}, fn=pf.add)
    with pytest.raises(TypeError, match=r"^keyword argument 'b' \(lock\).*Pass plain data"):
        check_picklable((1,), {"b": threading.Lock()})


# --------------------------------------------------------------- in the runtime
#
# One runtime (and its two workers) serves the tests below that need no options
# of their own, so they share the cost of starting worker processes. Each test
# looks only at its own tasks and events, and leaves nothing running.


@dataclasses.dataclass
class Shared:
    rt: bgtasks.Runtime
    unloads: list[bgtasks.BeforeUnloadEvent]
    rejections: list[bgtasks.UnhandledRejectionEvent]

    def unloads_of(self, handle: bgtasks.TaskHandle) -> list[str]:
        return [e.reason for e in self.unloads if e.task is not None and e.task.id == handle.id]

    def rejections_of(self, handle: bgtasks.TaskHandle) -> list[str]:
        return [type(e.error).__name__ for e in self.rejections if e.task.id == handle.id]


@pytest.fixture(scope="module")
async def shared_runtime() -> AsyncIterator[Shared]:
    rt = bgtasks.Runtime(
        process_pool_size=2,
        backoff=bgtasks.Backoff(initial=0.01, max=0.05, jitter=0.0),
        shutdown_grace=5.0,
    )
    shared = Shared(rt, [], [])
    rt.on("beforeunload", shared.unloads.append)
    rt.on("unhandledrejection", shared.rejections.append)
    # anyio runs fixtures and tests in one task, so the tests see rt as the
    # active runtime (@background functions schedule on it).
    async with rt:
        yield shared


@pytest.fixture
async def shared(shared_runtime: Shared) -> AsyncIterator[Shared]:
    yield shared_runtime
    assert await shared_runtime.rt.drain(10), "a test left tasks running"


async def until(predicate: Callable[[], object], seconds: float = 10.0) -> None:
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.01)


def reported_pid(handle: bgtasks.TaskHandle) -> int | None:
    """The pid a task showed as its progress (see process_funcs._report_pid)."""
    progress = handle.record.progress
    return None if progress is None else int(progress.done)


@pytest.mark.anyio
async def test_runtime_runs_an_async_function_in_a_worker(shared: Shared) -> None:
    record = await pf.bg_async_sum_and_pid(2, 3).wait(20)
    assert record.status == "succeeded"
    assert record.result is not None
    total, worker = record.result
    assert total == 5
    assert worker != os.getpid()
    assert worker in shared.rt._process_pool.pids


@pytest.mark.anyio
async def test_runtime_refuses_unpicklable_arguments_naming_the_parameter(
    shared: Shared,
) -> None:
    before = shared.rt.stats()
    with pytest.raises(TypeError, match=r"^argument 'b' \(position 1\) \(lock\) cannot be pickled"):
        pf.bg_add(1, threading.Lock())
    with pytest.raises(TypeError, match=r"^keyword argument 'b' \(lock\) cannot be pickled"):
        pf.bg_add(1, b=threading.Lock())
    assert shared.rt.stats() == before  # refused before a task was created


def test_a_lambda_or_nested_function_is_refused_at_decoration() -> None:
    isolate = bgtasks.background(isolation="process")
    with pytest.raises(TypeError, match=r"is a lambda.*Define it with def at the top level"):
        isolate(lambda: None)

    def nested() -> None:
        pass

    with pytest.raises(TypeError, match=r"inside another function.*Move it to the top level"):
        isolate(nested)


@pytest.mark.anyio
async def test_runtime_memory_limit(shared: Shared) -> None:
    hog = pf.bg_allocate.using(limits=bgtasks.Limits(memory="64MiB"))(256 * MiB)
    record = await hog.wait(20)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type == "MemoryLimitExceeded"
    assert f"memory limit of {64 * MiB} bytes" in record.error.message
    await until(lambda: shared.rejections_of(hog))
    assert shared.rejections_of(hog) == ["MemoryLimitExceeded"]
    # The limit went with the task: the same allocation now succeeds.
    again = await pf.bg_allocate(256 * MiB).wait(20)
    assert (again.status, again.result) == ("succeeded", 256 * MiB)


@pytest.mark.anyio
async def test_runtime_cpu_limit_stops_one_long_c_call(shared: Shared) -> None:
    handle = pf.bg_long_c_call.using(limits=bgtasks.Limits(cpu_time=0.5))()
    record = await handle.wait(20)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type == "CPULimitExceeded"
    assert "CPU limit of 0.5s" in record.error.message
    assert record.attempts == 1  # a limit is not retried
    # beforeunload at 90% of the CPU budget, with the task; then the rejection.
    await until(lambda: shared.unloads_of(handle) and shared.rejections_of(handle))
    assert shared.unloads_of(handle) == ["cpu"]
    assert shared.rejections_of(handle) == ["CPULimitExceeded"]


@pytest.mark.anyio
async def test_runtime_retries_a_task_whose_worker_crashed(shared: Shared) -> None:
    # retries=1: the first attempt kills its worker, the second runs on a new one.
    flaky = pf.bg_crash_before_attempt(2)
    record = await flaky.wait(20)
    assert (record.status, record.attempts, record.result) == ("succeeded", 2, 2)

    doomed = pf.bg_crash_before_attempt(3)
    record = await doomed.wait(20)
    assert (record.status, record.attempts) == ("failed", 2)
    assert record.error is not None
    assert record.error.type == "WorkerCrashed"
    assert "exited with code 9" in record.error.message
    await until(lambda: shared.rejections_of(doomed))
    await anyio.sleep(0.05)  # a second event, were there one, would be on its way
    assert shared.rejections_of(doomed) == ["WorkerCrashed"]  # once, after the last attempt
    assert shared.rejections_of(flaky) == []


@pytest.mark.anyio
async def test_runtime_progress_from_a_worker_shows_in_the_record(shared: Shared) -> None:
    record = await pf.bg_count_with_progress(3).wait(20)
    assert record.status == "succeeded"
    assert record.progress == bgtasks.Progress(done=3, total=3, message="step 3")


@pytest.mark.anyio
async def test_runtime_cancel_kills_the_worker(shared: Shared) -> None:
    handle = pf.bg_report_pid_then_sleep(30)
    await until(lambda: reported_pid(handle))  # progress while running
    worker = reported_pid(handle)
    assert worker is not None
    assert handle.record.progress == bgtasks.Progress(done=worker, message="started")
    assert handle.cancel()
    record = await handle.wait(10)
    assert record.status == "cancelled"
    assert gone(worker)  # killed and reaped before the task ended
    assert worker not in shared.rt._process_pool.pids
    nxt = await pf.bg_pid().wait(20)
    assert nxt.status == "succeeded"
    assert nxt.result != worker


@pytest.mark.anyio
async def test_runtime_wall_clock_kills_and_replaces_the_worker(shared: Shared) -> None:
    warm = await pf.bg_pid().wait(20)  # an idle worker, so start-up is not timed
    handle = pf.bg_sleep()  # reports its pid, then sleeps past wall_clock=0.5
    record = await handle.wait(20)
    assert record.status == "failed"
    assert record.error is not None
    assert record.error.type == "WallClockLimitExceeded"
    worker = reported_pid(handle)
    assert worker == warm.result  # the idle worker took it
    assert gone(worker)
    assert worker not in shared.rt._process_pool.pids
    await until(lambda: shared.rejections_of(handle))
    assert shared.unloads_of(handle) == ["wall_clock"]
    nxt = await pf.bg_pid().wait(20)
    assert nxt.status == "succeeded"
    assert nxt.result != worker


# --------------------------------------------------- runtime options for the pool


@pytest.mark.anyio
async def test_runtime_pool_options_are_honoured() -> None:
    rt = bgtasks.Runtime(process_pool_size=1, process_max_tasks=2, process_idle_timeout=0.3)
    async with rt:
        await rt.wait_until(pf.add, 1, 2).wait(10)
        assert rt._process_pool is None  # lazy: no pool before the first isolated task

        handles = [pf.bg_pid() for _ in range(3)]  # submitted together
        pids = [(await h.wait(20)).result for h in handles]
        pool = rt._process_pool
        assert (pool.size, pool.max_tasks_per_worker, pool.idle_timeout) == (1, 2, 0.3)
        # One worker at a time (two would have shared the first two tasks), and
        # it is replaced after its second task.
        assert pids[0] == pids[1] != pids[2]
        await until(lambda: gone(pids[0]))

        # The idle worker stops after process_idle_timeout.
        await until(lambda: not pool.pids, 5)
        assert gone(pids[2])

        last = (await pf.bg_pid().wait(20)).result
        assert pool.pids == [last]
    # Shutdown stops the workers.
    assert gone(last)
    assert pool.pids == []


def test_runtime_pool_defaults() -> None:
    rt = bgtasks.Runtime()
    assert (rt.process_pool_size, rt.process_max_tasks, rt.process_idle_timeout) == (
        None,
        100,
        60.0,
    )
    unlimited = bgtasks.Runtime(process_max_tasks=None, process_idle_timeout=math.inf)
    assert unlimited.process_max_tasks is None


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("process_pool_size", 0, "process_pool_size must be a positive int or None"),
        ("process_max_tasks", 0, "process_max_tasks must be a positive int or None"),
        ("process_max_tasks", 2.5, "process_max_tasks must be a positive int or None"),
        ("process_idle_timeout", 0, r"process_idle_timeout must be a number of seconds > 0"),
        ("process_idle_timeout", -1.0, r"process_idle_timeout must be a number of seconds > 0"),
        ("process_idle_timeout", "60", r"\(math.inf to keep idle worker processes\), got '60'"),
        ("process_idle_timeout", True, r"got True\.$"),
    ],
)
def test_runtime_pool_options_are_validated(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bgtasks.Runtime(**{option: value})  # type: ignore[arg-type]
