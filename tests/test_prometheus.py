"""bgtasks.prometheus: the contract's metric names and labels, in process."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

import bgtasks
import bgtasks.prometheus
from bgtasks import Limits, Runtime

pytestmark = pytest.mark.anyio


def get(registry: CollectorRegistry, metric: str, /, **labels: str) -> float:
    return registry.get_sample_value(metric, labels) or 0.0


async def test_counts_after_known_outcomes() -> None:
    registry = CollectorRegistry()
    calls = 0
    started = asyncio.Event()
    async with Runtime(backoff=bgtasks.Backoff(initial=0, max=0, jitter=0)) as rt:
        bgtasks.prometheus.instrument(rt, registry)

        @rt.background(name="flaky", retries=3)
        async def flaky() -> None:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise ValueError("not yet")

        async def ok() -> None:
            pass

        async def fails() -> None:
            raise ValueError("no")

        async def hang() -> None:
            started.set()
            await asyncio.Event().wait()

        for _ in range(3):
            rt.wait_until(ok(), name="ok")
        rt.wait_until(fails(), name="fails")
        flaky()
        rt.wait_until(hang(), name="slow", limits=Limits(wall_clock=0.05))
        await rt.drain(5)
        h = rt.wait_until(hang(), name="cancelled")
        await asyncio.wait_for(started.wait(), 5)
        h.cancel()
        await rt.drain(5)

    assert get(registry, "bgtasks_tasks_submitted_total", name="ok") == 3
    assert get(registry, "bgtasks_tasks_finished_total", name="ok", status="succeeded") == 3
    assert get(registry, "bgtasks_tasks_finished_total", name="fails", status="failed") == 1
    assert get(registry, "bgtasks_tasks_finished_total", name="flaky", status="succeeded") == 1
    assert get(registry, "bgtasks_task_retries_total", name="flaky") == 2
    assert get(registry, "bgtasks_task_limit_exceeded_total", name="slow", limit="wall_clock") == 1
    assert get(registry, "bgtasks_tasks_finished_total", name="slow", status="failed") == 1
    assert get(registry, "bgtasks_tasks_finished_total", name="cancelled", status="cancelled") == 1
    assert get(registry, "bgtasks_task_duration_seconds_count", name="ok", status="succeeded") == 3
    assert get(registry, "bgtasks_task_queue_wait_seconds_count", name="flaky") == 1


async def test_the_gauge_is_read_from_the_runtime_at_scrape_time() -> None:
    registry = CollectorRegistry()
    gate = asyncio.Event()
    started = asyncio.Event()

    async def held() -> None:
        started.set()
        await gate.wait()

    async with Runtime(max_concurrency=1) as rt:
        bgtasks.prometheus.instrument(rt, registry)
        for _ in range(3):
            rt.wait_until(held, name="held")  # a callable: goes through the concurrency bound
        await asyncio.wait_for(started.wait(), 5)
        assert get(registry, "bgtasks_tasks", state="running") == 1
        assert get(registry, "bgtasks_tasks", state="pending") == 2
        gate.set()
        await rt.drain(5)
        assert get(registry, "bgtasks_tasks", state="running") == 0
        assert get(registry, "bgtasks_tasks", state="pending") == 0


async def test_rejections_by_reason_and_several_runtimes_in_one_registry() -> None:
    registry = CollectorRegistry()
    gate = asyncio.Event()
    first = Runtime(max_pending=1)
    bgtasks.prometheus.instrument(first, registry)
    async with first:
        first.wait_until(gate.wait(), name="held")
        with pytest.raises(bgtasks.RegistryFull):
            first.wait_until(gate.wait(), name="refused")
        # A second runtime (the next app lifetime, another test) shares the metrics.
        async with Runtime() as second:
            stop = bgtasks.prometheus.instrument(second, registry)
            second.wait_until(gate.wait(), name="held")
            await asyncio.sleep(0)
            assert get(registry, "bgtasks_tasks", state="running") == 2
            assert get(registry, "bgtasks_tasks_submitted_total", name="held") == 2
            stop()
            assert get(registry, "bgtasks_tasks", state="running") == 1
            gate.set()
        await first.drain(5)
    with pytest.raises(bgtasks.RegistryFull):
        first.wait_until(gate.wait(), name="late")
    assert get(registry, "bgtasks_tasks_rejected_total", reason="pending") == 1
    assert get(registry, "bgtasks_tasks_rejected_total", reason="shutdown") == 1
    assert get(registry, "bgtasks_tasks_submitted_total", name="held") == 2  # not after stop()
