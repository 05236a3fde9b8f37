from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import bgtasks
from bgtasks import Limits, Runtime

pytestmark = pytest.mark.anyio

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


async def test_wait_until_coroutine_succeeds_with_json_result() -> None:
    async with Runtime() as rt:

        async def job(x: int) -> dict[str, int]:
            await anyio.lowlevel.checkpoint()
            return {"double": x * 2}

        handle = rt.wait_until(job(21))
        assert handle.status == "pending"  # never runs inline
        record = await handle.wait(5)
        assert record.status == "succeeded"
        assert record.result == {"double": 42}
        assert record.attempts == 1
        assert record.error is None
        assert record.created_at <= record.started_at <= record.finished_at  # type: ignore[operator]
        assert record.created_at.tzinfo is not None
        assert rt.get(handle.id) == record


async def test_wait_until_never_runs_work_inline() -> None:
    started = threading.Event()
    async with Runtime() as rt:

        async def job() -> None:
            started.set()

        handle = rt.wait_until(job())
        assert not started.is_set()
        await handle.wait(5)
        assert started.is_set()


async def test_sync_callable_runs_in_worker_thread_with_args() -> None:
    async with Runtime() as rt:
        loop_thread = threading.get_ident()

        def work(a: int, b: int) -> tuple[int, bool]:
            return a + b, threading.get_ident() != loop_thread

        record = await rt.wait_until(work, 2, 3).wait(5)
        assert record.result == [5, True]


async def test_async_callable_and_future_are_accepted() -> None:
    async with Runtime() as rt:

        async def work(a: int) -> int:
            return a * 3

        assert (await rt.wait_until(work, 5).wait(5)).result == 15
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        handle = rt.wait_until(fut)
        fut.set_result(7)
        assert (await handle.wait(5)).result == 7


async def test_wait_until_from_another_thread() -> None:
    async with Runtime() as rt:

        def from_thread() -> bgtasks.TaskHandle:
            async def job() -> str:
                return "ok"

            return rt.wait_until(job())

        handle = await anyio.to_thread.run_sync(from_thread)
        assert (await handle.wait(5)).result == "ok"


async def test_wait_until_none_shows_the_right_call() -> None:
    async with Runtime() as rt:
        with pytest.raises(TypeError, match=r"wait_until\(send_email, to\)"):
            rt.wait_until(None)
        with pytest.raises(TypeError, match="needs an awaitable"):
            rt.wait_until(42)


async def test_coroutine_with_args_is_refused_and_closed() -> None:
    async with Runtime() as rt:

        async def job() -> None:
            pass

        with pytest.raises(TypeError, match="either"):
            rt.wait_until(job(), 1)


def test_module_wait_until_without_runtime_says_how_to_install() -> None:
    with pytest.raises(bgtasks.RuntimeNotActive, match="BackgroundMiddleware"):
        bgtasks.wait_until(lambda: None)


async def test_module_wait_until_uses_active_runtime() -> None:
    async with Runtime() as rt:

        async def job() -> int:
            return 1

        handle = bgtasks.wait_until(job())
        assert rt.get(handle.id) is not None
        await handle.wait(5)


async def test_failure_records_error_type_and_message() -> None:
    async with Runtime() as rt:

        async def boom() -> None:
            raise ValueError("bad input")

        record = await rt.wait_until(boom()).wait(5)
        assert record.status == "failed"
        assert record.error is not None
        assert (record.error.type, record.error.message) == ("ValueError", "bad input")
        assert record.model_dump(mode="json")["error"] == {
            "type": "ValueError",
            "message": "bad input",
        }


async def test_non_json_result_is_stored_as_null_with_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Runtime() as rt:

        async def job() -> object:
            return object()

        with caplog.at_level(logging.WARNING, logger="bgtasks"):
            record = await rt.wait_until(job()).wait(5)
        assert record.status == "succeeded"
        assert record.result is None
        assert "not JSON-serialisable" in caplog.text


async def test_progress_shows_in_record() -> None:
    async with Runtime() as rt:
        seen = anyio.Event()
        go_on = anyio.Event()

        async def job() -> None:
            task = bgtasks.current_task()
            assert task is not None
            assert task.attempt == 1
            task.report_progress(3, 10, "three of ten")
            seen.set()
            await go_on.wait()

        handle = rt.wait_until(job())
        with anyio.fail_after(5):
            await seen.wait()
        progress = handle.record.progress
        assert progress is not None
        assert (progress.done, progress.total, progress.message) == (3, 10, "three of ten")
        go_on.set()
        await handle.wait(5)
    assert bgtasks.current_task() is None


async def test_finished_records_expire_after_retention() -> None:
    async with Runtime(retention=0.05) as rt:

        async def job() -> None:
            pass

        handle = rt.wait_until(job())
        await handle.wait(5)
        assert rt.get(handle.id) is not None
        with anyio.fail_after(5):
            while rt.get(handle.id) is not None:
                await anyio.sleep(0.02)


async def test_ids_are_random_url_safe_128_bits() -> None:
    async with Runtime() as rt:

        async def job() -> None:
            pass

        ids = {rt.wait_until(job()).id for _ in range(2000)}
        await rt.drain(5)
    assert len(ids) == 2000
    for task_id in ids:
        assert len(task_id) == 24  # 144 random bits, base64
        assert set(task_id) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )


async def test_task_sees_copy_of_context_and_leaks_nothing() -> None:
    async with Runtime() as rt:
        var.set("caller")

        async def job() -> str:
            seen = var.get()
            var.set("task")
            return seen

        def sync_job() -> str:
            seen = var.get()
            var.set("sync-task")
            return seen

        assert (await rt.wait_until(job()).wait(5)).result == "caller"
        assert (await rt.wait_until(sync_job).wait(5)).result == "caller"
        assert var.get() == "caller"


# --------------------------------------------------------------------------- limits


async def test_cpu_limit_stops_coroutine_that_never_yields() -> None:
    async with Runtime() as rt:

        async def spin() -> None:
            x = 0
            while True:
                x += 1

        t0 = time.monotonic()
        record = await rt.wait_until(spin(), limits=Limits(cpu_time=0.3)).wait(10)
        elapsed = time.monotonic() - t0
        assert record.status == "failed"
        assert record.error is not None and record.error.type == "CPULimitExceeded"
        assert elapsed < 0.3 + 1.0
        # The loop keeps serving other tasks afterwards.

        async def after() -> str:
            await anyio.lowlevel.checkpoint()
            return "still serving"

        assert (await rt.wait_until(after()).wait(5)).result == "still serving"


async def test_cpu_limit_stops_sync_function_in_thread() -> None:
    async with Runtime() as rt:

        def spin() -> None:
            x = 0
            while True:
                x += 1

        t0 = time.monotonic()
        record = await rt.wait_until(spin, limits=Limits(cpu_time=0.3)).wait(10)
        assert record.error is not None and record.error.type == "CPULimitExceeded"
        assert time.monotonic() - t0 < 0.3 + 1.0


async def test_cpu_limit_counts_only_the_tasks_own_cpu() -> None:
    """A task that mostly waits is not charged for other tasks' CPU."""
    async with Runtime() as rt:

        async def waiter() -> str:
            for _ in range(20):
                await anyio.sleep(0.01)
            return "done"

        def burner() -> None:
            end = time.thread_time() + 0.3
            while time.thread_time() < end:
                pass

        waiting = rt.wait_until(waiter(), limits=Limits(cpu_time=0.1))
        rt.wait_until(burner)
        assert (await waiting.wait(10)).status == "succeeded"


async def test_cpu_warning_fires_beforeunload_at_90_percent() -> None:
    events: list[bgtasks.BeforeUnloadEvent] = []
    async with Runtime() as rt:
        rt.on("beforeunload", events.append)

        def spin() -> None:
            while True:
                pass

        handle = rt.wait_until(spin, limits=Limits(cpu_time=0.3))
        await handle.wait(10)
        await rt.drain(5)
    cpu = [e for e in events if e.reason == "cpu"]
    assert len(cpu) == 1
    assert cpu[0].task is not None and cpu[0].task.id == handle.id


async def test_wall_clock_limit_and_warning() -> None:
    events: list[bgtasks.BeforeUnloadEvent] = []
    async with Runtime() as rt:
        rt.on("beforeunload", events.append)
        t0 = time.monotonic()
        handle = rt.wait_until(anyio.sleep(30), limits=Limits(wall_clock=0.3))
        record = await handle.wait(10)
        assert record.error is not None and record.error.type == "WallClockLimitExceeded"
        assert 0.25 < time.monotonic() - t0 < 2
        await rt.drain(5)
    warn = [e for e in events if e.reason == "wall_clock"]
    assert len(warn) == 1 and warn[0].task is not None and warn[0].task.id == handle.id


async def test_wall_clock_limit_stops_sync_function() -> None:
    async with Runtime() as rt:

        def slow_loop() -> None:
            while True:
                time.sleep(0.01)

        record = await rt.wait_until(slow_loop, limits=Limits(wall_clock=0.2)).wait(10)
        assert record.error is not None and record.error.type == "WallClockLimitExceeded"


async def test_memory_limit_on_inline_task_names_process_isolation() -> None:
    async with Runtime() as rt:
        with pytest.raises(ValueError, match='isolation="process"'):
            rt.wait_until(lambda: None, limits=Limits(memory="64MiB"))
    with pytest.raises(ValueError, match='isolation="process"'):

        @bgtasks.background(limits=Limits(memory="64MiB"))
        def f() -> None:
            pass


async def test_process_memory_ceiling() -> None:
    import psutil

    base = psutil.Process().memory_info().rss
    limit = base + 150 * 1024 * 1024
    events: list[bgtasks.BeforeUnloadEvent] = []
    async with Runtime(memory_limit=limit, memory_check_interval=0.02) as rt:
        rt.on("beforeunload", events.append)
        holding = anyio.Event()

        async def old() -> str:
            await anyio.sleep(1.0)
            return "old survived"

        async def hog() -> None:
            blob = b"\x01" * (200 * 1024 * 1024)
            holding.set()
            await anyio.sleep(30)
            del blob

        survivor = rt.wait_until(old())
        victim = rt.wait_until(hog())
        with anyio.fail_after(10):
            await holding.wait()
        record = await victim.wait(10)
        assert record.error is not None and record.error.type == "MemoryLimitExceeded"
        assert (await survivor.wait(10)).status == "succeeded"
        assert any(e.reason == "memory" and e.task is None for e in events)


async def test_memory_high_refuses_new_work() -> None:
    async with Runtime(memory_limit=1024 * 1024, memory_check_interval=0.01) as rt:
        with anyio.fail_after(5):
            while not rt._admission.memory_high:
                await anyio.sleep(0.01)
        with pytest.raises(bgtasks.RegistryFull, match="memory"):
            rt.wait_until(lambda: None)


# --------------------------------------------------------------------------- hooks


async def test_beforeunload_once_on_shutdown_before_cancelling() -> None:
    seen: list[tuple[str, str | None, str]] = []
    rt = Runtime(shutdown_grace=0.2)
    async with rt:
        started = anyio.Event()

        async def forever() -> None:
            started.set()
            await anyio.sleep(60)

        handle = rt.wait_until(forever())

        @rt.on("beforeunload")
        async def on_unload(event: bgtasks.BeforeUnloadEvent) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append((event.reason, event.task and event.task.id, handle.status))

        with anyio.fail_after(5):
            await started.wait()
    assert seen == [("shutdown", None, "running")]
    assert handle.status == "cancelled"


async def test_unhandledrejection_exactly_once_after_last_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[bgtasks.UnhandledRejectionEvent] = []
    async with Runtime(backoff=bgtasks.Backoff(initial=0, max=0, jitter=0)) as rt:
        rt.on("unhandledrejection", events.append)

        @rt.background(retries=2)
        async def flaky() -> None:
            raise RuntimeError("always")

        with caplog.at_level(logging.ERROR, logger="bgtasks"):
            record = await flaky().wait(5)
            await rt.drain(5)
    assert record.attempts == 3
    assert len(events) == 1
    assert isinstance(events[0].error, RuntimeError)
    assert events[0].task.status == "failed"
    assert "always" in caplog.text  # default action: logged with traceback


async def test_prevent_default_suppresses_log(caplog: pytest.LogCaptureFixture) -> None:
    async with Runtime() as rt:
        rt.on("unhandledrejection", lambda e: e.prevent_default())

        async def boom() -> None:
            raise RuntimeError("quiet please")

        with caplog.at_level(logging.ERROR, logger="bgtasks"):
            await rt.wait_until(boom()).wait(5)
    assert "quiet please" not in caplog.text


async def test_cancellation_is_not_a_rejection() -> None:
    events: list[Any] = []
    async with Runtime() as rt:
        rt.on("unhandledrejection", events.append)
        handle = rt.wait_until(anyio.sleep(60))
        await anyio.lowlevel.checkpoint()
        assert handle.cancel() is True
        assert (await handle.wait(5)).status == "cancelled"
        assert handle.cancel() is False
    assert events == []


async def test_raising_handler_is_logged_and_breaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    async with Runtime() as rt:

        def bad(event: Any) -> None:
            raise ZeroDivisionError("hook bug")

        rt.on("unhandledrejection", bad)
        rt.on("unhandledrejection", lambda e: calls.append("second"))

        async def boom() -> None:
            raise ValueError("x")

        with caplog.at_level(logging.ERROR, logger="bgtasks"):
            record = await rt.wait_until(boom()).wait(5)

        async def fine() -> int:
            return 1

        assert (await rt.wait_until(fine()).wait(5)).status == "succeeded"
    assert record.status == "failed"
    assert calls == ["second"]
    assert "hook bug" in caplog.text


def test_unknown_event_is_refused() -> None:
    with pytest.raises(ValueError, match="beforeunload"):
        Runtime().on("unload", print)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- retries


async def test_retries_with_backoff_then_success() -> None:
    attempts: list[int] = []
    async with Runtime(backoff=bgtasks.Backoff(initial=0.01, max=0.02, jitter=0)) as rt:

        @rt.background(retries=3)
        def flaky() -> str:
            task = bgtasks.current_task()
            assert task is not None
            attempts.append(task.attempt)
            if len(attempts) < 3:
                raise ConnectionError("try again")
            return "done"

        record = await flaky().wait(5)
    assert record.status == "succeeded" and record.result == "done"
    assert record.attempts == 3
    assert attempts == [1, 2, 3]


async def test_limit_exceeded_is_not_retried() -> None:
    async with Runtime() as rt:

        @rt.background(retries=3, limits=Limits(wall_clock=0.05))
        async def slow() -> None:
            await anyio.sleep(10)

        record = await slow().wait(5)
    assert record.attempts == 1
    assert record.error is not None and record.error.type == "WallClockLimitExceeded"


# --------------------------------------------------------------------------- admission


async def test_max_pending_refuses_without_creating_a_record() -> None:
    async with Runtime(max_pending=2, shutdown_grace=0) as rt:
        rt.wait_until(anyio.sleep(10))
        rt.wait_until(anyio.sleep(10))
        before = rt.stats()
        with pytest.raises(bgtasks.RegistryFull, match="max_pending"):
            rt.wait_until(anyio.sleep(10))
        assert rt.stats() == before
        assert sum(before.values()) == 2


async def test_max_concurrency_keeps_the_rest_pending() -> None:
    running = 0
    peak = 0
    async with Runtime(max_concurrency=2) as rt:

        async def job() -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.02)
            running -= 1

        handles = [rt.wait_until(job()) for _ in range(6)]
        await anyio.sleep(0.005)
        assert sum(h.status == "pending" for h in handles) >= 4
        assert await rt.drain(5)
    assert peak == 2
    assert all(h.status == "succeeded" for h in handles)


async def test_one_failure_does_not_affect_others() -> None:
    async with Runtime() as rt:

        async def ok(i: int) -> int:
            await anyio.sleep(0.01)
            return i

        async def bad() -> None:
            raise RuntimeError("one bad apple")

        handles = [rt.wait_until(ok(i)) for i in range(3)]
        failing = rt.wait_until(bad())
        handles += [rt.wait_until(ok(i)) for i in range(3, 6)]
        await rt.drain(5)
    assert failing.status == "failed"
    assert [h.record.result for h in handles] == [0, 1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_waits_for_tasks_within_grace() -> None:
    rt = Runtime(shutdown_grace=5)
    async with rt:
        handle = rt.wait_until(anyio.sleep(0.1))
    assert handle.status == "succeeded"


async def test_shutdown_cancels_after_grace() -> None:
    rt = Runtime(shutdown_grace=0.1)
    t0 = time.monotonic()
    async with rt:
        coro_handle = rt.wait_until(anyio.sleep(60))

        def blocking_loop() -> None:
            while True:
                time.sleep(0.01)

        thread_handle = rt.wait_until(blocking_loop)
    assert coro_handle.status == "cancelled"
    assert thread_handle.status == "cancelled"
    assert time.monotonic() - t0 < 3
    assert rt.stats()["cancelled"] == 2


async def test_no_new_work_during_shutdown() -> None:
    rt = Runtime(shutdown_grace=1)
    refused: list[BaseException] = []
    async with rt:

        @rt.on("beforeunload")
        def try_more(event: bgtasks.BeforeUnloadEvent) -> None:
            try:
                rt.wait_until(lambda: None)
            except bgtasks.RegistryFull as exc:
                refused.append(exc)

    assert len(refused) == 1


async def test_drain_waits_until_idle() -> None:
    async with Runtime() as rt:
        handles = [rt.wait_until(anyio.sleep(0.01 * i)) for i in range(5)]
        assert await rt.drain(5) is True
        assert all(h.status == "succeeded" for h in handles)
        long = rt.wait_until(anyio.sleep(5))
        assert await rt.drain(0.05) is False
        long.cancel()


async def test_handle_wait_timeout() -> None:
    async with Runtime(shutdown_grace=0) as rt:
        handle = rt.wait_until(anyio.sleep(5))
        with pytest.raises(TimeoutError):
            await handle.wait(0.05)


# --------------------------------------------------------------------------- @background


async def test_background_returns_handle_and_keeps_original() -> None:
    async with Runtime() as rt:

        @bgtasks.background
        def add(a: int, b: int = 1) -> int:
            """Adds."""
            return a + b

        @bgtasks.background(name="mul")
        async def mul(a: int, b: int) -> int:
            return a * b

        h1 = add(1, b=2)
        assert isinstance(h1, bgtasks.TaskHandle)
        h2 = mul(3, 4)
        assert isinstance(h2, bgtasks.TaskHandle)
        assert h2.name == "mul"
        assert (await h1.wait(5)).result == 3
        assert (await h2.wait(5)).result == 12
        assert add.__wrapped__(5) == 6
        assert add.__doc__ == "Adds."
        import inspect

        assert list(inspect.signature(add).parameters) == ["a", "b"]
        h3 = mul.submit(2, 2)
        assert (await h3.wait(5)).result == 4
        assert rt.get(h3.id) is not None


async def test_using_binds_limits() -> None:
    async with Runtime():

        @bgtasks.background
        async def slow() -> None:
            await anyio.sleep(10)

        record = await slow.using(limits=Limits(wall_clock=0.05))().wait(5)
        assert record.error is not None and record.error.type == "WallClockLimitExceeded"


def test_background_validates_options() -> None:
    with pytest.raises(ValueError, match="retries"):
        bgtasks.background(retries=-1)(lambda: None)
    with pytest.raises(ValueError, match="isolation"):
        bgtasks.background(isolation="thread")(lambda: None)  # type: ignore[arg-type]


def test_runtime_validates_arguments() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        Runtime(max_pending=0)
    with pytest.raises(ValueError, match="shutdown_grace"):
        Runtime(shutdown_grace=-1)
    with pytest.raises(ValueError, match="store"):
        Runtime(store="redis://x")
    with pytest.raises(ValueError, match="memory_limit"):
        Runtime(memory_limit="lots")


def test_limits_parse_sizes() -> None:
    assert Limits(memory="256MiB").memory == 256 * 1024 * 1024
    assert Limits(memory="1.5GB").memory == 1_500_000_000
    assert Limits(memory=1000).memory == 1000
    with pytest.raises(ValueError, match="256MiB"):
        Limits(memory="256 apples")
    with pytest.raises(ValueError, match="positive"):
        Limits(wall_clock=0)


async def test_runtime_runs_once() -> None:
    rt = Runtime()
    async with rt:
        pass
    with pytest.raises(RuntimeError, match="runs once"):
        await rt.start()


async def test_cancel_before_first_step_is_accounted() -> None:
    async with Runtime() as rt:

        async def never() -> None:
            raise AssertionError("must not run")

        handle = rt.wait_until(never())
        assert rt.cancel(handle.id) is True
        record = await handle.wait(5)
        assert record.status == "cancelled"
        assert await rt.drain(5)


async def test_cancel_from_thread_before_spawn() -> None:
    async with Runtime() as rt:

        def submit_and_cancel() -> bgtasks.TaskHandle:
            handle = rt.wait_until(anyio.sleep, 30)
            handle.cancel()
            return handle

        handle = await anyio.to_thread.run_sync(submit_and_cancel)
        assert (await handle.wait(5)).status == "cancelled"
        assert await rt.drain(5)


async def test_max_finished_bounds_memory() -> None:
    async with Runtime(max_finished=3) as rt:
        handles = [rt.wait_until(anyio.lowlevel.checkpoint()) for _ in range(5)]
        await rt.drain(5)
        assert [rt.get(h.id) is not None for h in handles] == [False, False, True, True, True]


# --------------------------------------------------------------------------- sync work from threads


async def test_sync_work_from_a_thread_succeeds_and_fails_like_any_task() -> None:
    events: list[bgtasks.UnhandledRejectionEvent] = []
    async with Runtime() as rt:
        rt.on("unhandledrejection", events.append)
        var.set("request")

        def ok(x: int) -> tuple[int, str, str | None]:
            task = bgtasks.current_task()
            return x * 2, var.get(), task.id if task else None

        def bad() -> None:
            raise KeyError("missing")

        def submit() -> tuple[bgtasks.TaskHandle, bgtasks.TaskHandle]:
            return rt.wait_until(ok, 21), rt.wait_until(bad)

        good, failing = await anyio.to_thread.run_sync(submit)
        good_record = await good.wait(5)
        assert good_record.result == [42, "request", good.id]
        assert (await failing.wait(5)).status == "failed"
        assert await rt.drain(5)
    assert [type(e.error) for e in events] == [KeyError]


async def test_sync_work_from_a_thread_cancelled_pending_and_running() -> None:
    async with Runtime(max_threads=1, shutdown_grace=5) as rt:
        started = threading.Event()

        def blocker() -> None:
            started.set()
            while True:
                time.sleep(0.01)

        def submit() -> tuple[bgtasks.TaskHandle, bgtasks.TaskHandle]:
            return rt.wait_until(blocker), rt.wait_until(lambda: "never")

        running, queued = await anyio.to_thread.run_sync(submit)
        assert await anyio.to_thread.run_sync(started.wait, 5)
        assert queued.status == "pending"  # the only worker thread is busy
        assert queued.cancel() and running.cancel()
        assert (await running.wait(5)).status == "cancelled"
        assert (await queued.wait(5)).status == "cancelled"
        assert await rt.drain(5)


async def test_shutdown_interrupts_sync_work_started_from_a_thread() -> None:
    rt = Runtime(shutdown_grace=0.1)
    async with rt:

        def forever() -> None:
            while True:
                time.sleep(0.01)

        handle = await anyio.to_thread.run_sync(lambda: rt.wait_until(forever))
        with anyio.fail_after(5):
            while handle.status != "running":
                await anyio.sleep(0.01)
    assert handle.status == "cancelled"


async def test_stopped_thread_blocked_in_a_system_call_is_abandoned() -> None:
    async with Runtime() as rt:
        release = threading.Event()
        started = threading.Event()

        def blocked() -> str:
            started.set()
            release.wait(10)  # a C-level wait: the interrupt waits for it to return
            return "late"

        handle = await anyio.to_thread.run_sync(lambda: rt.wait_until(blocked))
        assert await anyio.to_thread.run_sync(started.wait, 5)
        t0 = time.monotonic()
        assert handle.cancel()
        assert (await handle.wait(5)).status == "cancelled"
        assert time.monotonic() - t0 < 3
        release.set()
        assert await rt.drain(5)
        await anyio.sleep(0.05)
        assert handle.status == "cancelled"  # the late outcome is ignored


# --------------------------------------------------------------------------- runtime defaults


async def test_runtime_limits_apply_to_a_plain_coroutine() -> None:
    async def spin() -> None:
        x = 0
        while True:
            x += 1

    async with Runtime(limits=Limits(wall_clock=0.2), shutdown_grace=0) as rt:
        slow = await rt.wait_until(asyncio.sleep(30)).wait(5)
        assert slow.error is not None and slow.error.type == "WallClockLimitExceeded"
    async with Runtime(limits=Limits(cpu_time=0.2), shutdown_grace=0) as rt:
        busy = await bgtasks.wait_until(spin()).wait(5)
        assert busy.error is not None and busy.error.type == "CPULimitExceeded"


async def test_backoff_waits_grow_between_attempts() -> None:
    stamps: list[float] = []
    backoff = bgtasks.Backoff(initial=0.1, max=0.25, jitter=0)
    async with Runtime(backoff=backoff) as rt:

        @rt.background(retries=3)
        async def flaky() -> None:
            stamps.append(time.monotonic())
            raise ConnectionError("try again")

        record = await flaky().wait(10)
    assert record.status == "failed" and record.attempts == 4
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # exponential from 0.1, capped at 0.25: 0.1, 0.2, 0.25 (no jitter)
    for gap, least in zip(gaps, (0.1, 0.2, 0.25), strict=True):
        assert gap >= least * 0.95, gaps
    assert gaps[2] < 1.0, gaps  # capped


async def test_hung_rejection_handler_is_bounded() -> None:
    async with Runtime(shutdown_grace=0.3) as rt:

        @rt.on("unhandledrejection")
        async def hang(event: bgtasks.UnhandledRejectionEvent) -> None:
            await asyncio.sleep(30)

        async def boom() -> None:
            raise ValueError("x")

        t0 = time.monotonic()
        record = await rt.wait_until(boom()).wait(10)
        assert record.status == "failed"
        assert time.monotonic() - t0 < 5  # the handler got max(grace, 1 s), not 30 s
        assert await rt.drain(1)


async def test_shutdown_cuts_a_rejection_handler_off() -> None:
    started = asyncio.Event()
    rt = Runtime(shutdown_grace=0.2)
    async with rt:

        @rt.on("unhandledrejection")
        async def hang(event: bgtasks.UnhandledRejectionEvent) -> None:
            started.set()
            await asyncio.sleep(30)

        async def boom() -> None:
            raise ValueError("x")

        handle = rt.wait_until(boom())
        await asyncio.wait_for(started.wait(), 5)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3
    assert handle.status == "failed"
    assert rt._admission.unfinished == 0


async def test_raising_beforeunload_handlers_break_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []
    async with Runtime(shutdown_grace=1) as rt:

        @rt.on("beforeunload")
        def sync_boom(event: bgtasks.BeforeUnloadEvent) -> None:
            raise RuntimeError("sync handler failed")

        @rt.on("beforeunload")
        async def async_boom(event: bgtasks.BeforeUnloadEvent) -> None:
            raise RuntimeError("async handler failed")

        @rt.on("beforeunload")
        def last(event: bgtasks.BeforeUnloadEvent) -> None:
            seen.append(event.reason)

        async def work() -> str:
            await asyncio.sleep(0.05)
            return "ok"

        handle = rt.wait_until(work())
    assert seen == ["shutdown"]
    assert handle.status == "succeeded"
    assert "sync handler failed" in caplog.text and "async handler failed" in caplog.text


async def test_module_wait_until_none_inside_a_runtime() -> None:
    async with Runtime():
        with pytest.raises(TypeError, match=r"wait_until\(send_email, to\)"):
            bgtasks.wait_until(None)


async def test_drain_sees_direct_tasks_finishing_on_threads() -> None:
    # Many sync tasks submitted from a thread finish on worker threads while the
    # loop registers drain's waiter: drain must never miss the wake-up.
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        async with Runtime() as rt:
            for _ in range(30):
                await asyncio.to_thread(lambda: [rt.wait_until(int) for _ in range(20)])
                assert await rt.drain(5)
    finally:
        sys.setswitchinterval(old)


async def test_a_wait_that_times_out_leaves_no_callback_behind() -> None:
    async with Runtime(shutdown_grace=0) as rt:
        handle = rt.wait_until(asyncio.sleep(30))
        for _ in range(5):
            with pytest.raises(TimeoutError):
                await handle.wait(0.01)

        def wait_in_a_thread() -> None:
            with pytest.raises(TimeoutError):
                handle.wait_sync(0.01)

        await asyncio.to_thread(wait_in_a_thread)
        await asyncio.sleep(0)  # the thread's removal is posted to the loop
        assert handle._x is None or handle._x.callbacks == []
        handle.cancel()


async def test_cpu_limits_without_thread_cpu_clocks_are_refused_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bgtasks import _config

    monkeypatch.setattr(_config, "HAS_THREAD_CPU_CLOCKS", False)
    async with Runtime() as rt:
        with pytest.raises(ValueError, match=r'isolation="process"'):
            rt.wait_until(asyncio.sleep, 0, limits=Limits(cpu_time=1))
        rt.wait_until(asyncio.sleep, 0, limits=Limits(wall_clock=1))  # still fine
