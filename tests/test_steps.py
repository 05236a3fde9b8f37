"""Steps (bgtasks.step) on the memory store: kept results, retries, sleeps, delays."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from typing import Any

import pytest

import bgtasks
from bgtasks import Backoff, Limits, RegistryFull, Runtime, StepOutsideTask, step

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0, max=0, jitter=0)


async def test_step_outside_a_task_names_the_problem() -> None:
    with pytest.raises(StepOutsideTask, match=r"only inside a task"):
        await step.run("x", int)
    with pytest.raises(StepOutsideTask):
        await step.sleep("x", 0)


async def test_kept_steps_are_skipped_by_a_task_level_retry() -> None:
    calls: list[str] = []

    async def fetch() -> list[int]:
        calls.append("fetch")
        return [1, 2]

    def flaky(rows: list[int]) -> int:
        calls.append("send")
        if calls.count("send") == 1:
            raise ConnectionError("smtp down")
        return sum(rows)

    async with Runtime(backoff=FAST) as rt:

        @rt.background(retries=2)
        async def job() -> int:
            rows = await step.run("fetch", fetch)
            return await step.run("send", flaky, rows)

        record = await job.submit().wait(5)
    assert record.status == "succeeded", record.error
    assert record.result == 3
    assert record.attempts == 2
    assert calls == ["fetch", "send", "send"]  # fetch ran once across two task attempts
    assert [(s.name, s.status, s.attempts) for s in record.steps] == [
        ("fetch", "succeeded", 1),
        ("send", "succeeded", 2),
    ]
    send = record.steps[1]
    assert send.error is None and send.started_at is not None and send.finished_at is not None


async def test_step_retries_use_the_backoff_and_then_reach_the_task() -> None:
    attempts: list[float] = []

    def always() -> None:
        attempts.append(time.monotonic())
        raise ValueError("nope")

    async with Runtime(backoff=Backoff(initial=0.05, max=0.05, jitter=0)) as rt:

        async def job() -> None:
            await step.run("fail", always, retries=2)

        record = await rt.wait_until(job()).wait(5)
    assert record.status == "failed"
    assert record.error is not None and record.error.type == "ValueError"
    assert len(attempts) == 3
    assert attempts[2] - attempts[0] >= 0.09  # two waits of the task's backoff
    (st,) = record.steps
    assert (st.name, st.status, st.attempts) == ("fail", "failed", 3)
    assert st.error is not None and st.error.message == "nope"


async def test_repeated_names_count_and_parallel_steps_are_separate() -> None:
    async def echo(x: int) -> int:
        await asyncio.sleep(0.01)
        return x

    async with Runtime() as rt:

        async def job() -> list[int]:
            out = [await step.run("item", echo, i) for i in range(3)]
            out += await asyncio.gather(step.run("a", echo, 10), step.run("b", echo, 20))
            return out

        record = await rt.wait_until(job()).wait(5)
    assert record.result == [0, 1, 2, 10, 20]
    assert [s.name for s in record.steps] == ["item", "item#2", "item#3", "a", "b"]


async def test_a_sync_step_runs_in_a_worker_thread() -> None:
    async with Runtime() as rt:

        async def job() -> bool:
            loop_thread = threading.get_ident()
            other = await step.run("where", threading.get_ident)
            return other != loop_thread

        record = await rt.wait_until(job()).wait(5)
    assert record.result is True


async def test_sleeping_does_not_count_toward_wall_clock_and_shows_wake_at() -> None:
    async with Runtime() as rt:

        async def job() -> str:
            await step.run("before", asyncio.sleep, 0)
            await step.sleep("nap", dt.timedelta(seconds=0.6))
            return "awake"

        handle = rt.wait_until(job(), limits=Limits(wall_clock=0.4))
        for _ in range(200):
            rec = handle.record
            if rec.wake_at is not None:
                break
            await asyncio.sleep(0.01)
        assert rec.wake_at is not None and rec.status == "running"
        assert rec.steps[-1].status == "sleeping"
        record = await handle.wait(5)
    assert record.status == "succeeded", record.error
    assert record.wake_at is None
    assert record.steps[-1].status == "succeeded"


async def test_wall_clock_still_stops_work_around_a_sleep() -> None:
    async with Runtime() as rt:

        async def job() -> None:
            await step.sleep("nap", 0.05)
            await asyncio.sleep(10)

        record = await rt.wait_until(job(), limits=Limits(wall_clock=0.3)).wait(5)
    assert record.status == "failed"
    assert record.error is not None and record.error.type == "WallClockLimitExceeded"


async def test_naive_datetimes_are_refused_clearly() -> None:
    naive = dt.datetime.now() + dt.timedelta(hours=1)
    async with Runtime() as rt:

        async def job() -> None:
            await step.sleep_until("later", naive)

        record = await rt.wait_until(job()).wait(5)
        assert record.error is not None and "naive datetime" in record.error.message

        @rt.background
        async def later() -> None:
            pass

        with pytest.raises(ValueError, match=r"naive datetime.*timezone\.utc"):
            later.using(run_at=naive)
        with pytest.raises(TypeError, match="not both"):
            later.using(delay=1, run_at=dt.datetime.now(dt.timezone.utc))
        with pytest.raises(ValueError, match=">= 0"):
            later.using(delay=-1)


async def test_delayed_tasks_are_admitted_at_once_and_start_no_earlier() -> None:
    started: list[float] = []
    async with Runtime(max_pending=2) as rt:

        @rt.background
        async def ping() -> None:
            started.append(time.time())

        t0 = time.time()
        handle = ping.using(delay=dt.timedelta(seconds=0.3)).submit()
        at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=0.3)
        second = ping.using(run_at=at).submit()
        await asyncio.sleep(0.05)
        rec = handle.record
        assert rec.status == "pending" and rec.wake_at is not None
        assert rec.wake_at.timestamp() >= t0 + 0.29
        with pytest.raises(RegistryFull):  # the two delayed tasks count toward max_pending
            ping.submit()
        await handle.wait(5)
        await second.wait(5)
    assert len(started) == 2
    assert min(started) >= t0 + 0.29


async def test_a_cancelled_delayed_task_never_runs() -> None:
    ran: list[bool] = []
    async with Runtime() as rt:

        @rt.background
        def work() -> None:
            ran.append(True)

        handle = work.using(delay=5).submit()
        assert handle.cancel()
        record = await handle.wait(5)
    assert record.status == "cancelled" and not ran


async def test_records_carry_steps_as_json() -> None:
    async with Runtime() as rt:

        async def job() -> None:
            await step.run("one", int)

        record = await rt.wait_until(job()).wait(5)
    body: dict[str, Any] = record.model_dump(mode="json")
    assert body["wake_at"] is None
    assert body["steps"][0]["name"] == "one" and body["steps"][0]["status"] == "succeeded"
    assert set(body["steps"][0]) == {
        "name", "status", "attempts", "started_at", "finished_at", "error"
    }


async def test_a_step_in_a_process_isolated_task_says_it_is_not_supported() -> None:
    import process_funcs as pf

    async with Runtime(process_pool_size=1) as rt:
        fn = bgtasks.background(isolation="process", runtime=rt)(pf.uses_a_step)
        record = await fn.submit().wait(30)
    assert record.status == "failed"
    assert record.error is not None and 'isolation="process"' in record.error.message
