"""Runtime.observe: which observer events the runtime reports, where and when."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import durable_apps
import pytest

import bgtasks
from bgtasks import Limits, Runtime
from bgtasks._observe import ObservedTask, Observer, limit_name
from bgtasks.stores import MemoryStore

pytestmark = pytest.mark.anyio

#: What an observer made current in attempt_started; the task's code reads it.
marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="none")
#: Stands for the request's span: set where the task is submitted.
request: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()
        self.tokens: dict[tuple[str, int], contextvars.Token[str]] = {}
        self.origins: list[Any] = []

    def add(self, *event: Any) -> None:
        with self.lock:
            self.events.append(event)

    def carrier(self) -> dict[str, str]:
        return {"request": request.get()}

    def submitted(self, task: ObservedTask) -> None:
        self.origins.append(task.origin)
        self.add("submitted", task.name, request.get(), task.durable, task.replayed)

    def rejected(self, name: str, reason: str) -> None:
        self.add("rejected", name, reason)

    def attempt_started(self, task: ObservedTask, attempt: int, queued_for: float) -> None:
        assert queued_for >= 0
        self.tokens[task.id, attempt] = marker.set(f"{task.name}#{attempt}")
        self.add("started", task.name, attempt)

    def attempt_ended(
        self,
        task: ObservedTask,
        attempt: int,
        error: BaseException | None,
        *,
        will_retry: bool,
        duration: float,
    ) -> None:
        assert duration >= 0
        marker.reset(self.tokens.pop((task.id, attempt)))  # same context as attempt_started
        self.add("ended", task.name, attempt, type(error).__name__ if error else None, will_retry)

    def finished(self, task: ObservedTask, status: str, duration: float) -> None:
        assert duration >= 0
        self.add("finished", task.name, status)

    def of(self, name: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [e for e in self.events if e[1] == name]


async def test_a_coroutine_task_reports_each_event_in_its_context() -> None:
    rec = Recorder()
    seen: list[str] = []
    async with Runtime() as rt:
        rt.observe(rec)

        async def job() -> None:
            seen.append(marker.get())

        request.set("req-1")
        await rt.wait_until(job(), name="job").wait(5)
        await rt.drain(5)
    assert seen == ["job#1"]
    assert rec.of("job") == [
        ("submitted", "job", "req-1", False, False),
        ("started", "job", 1),
        ("ended", "job", 1, None, False),
        ("finished", "job", "succeeded"),
    ]
    assert marker.get() == "none"  # nothing leaked into the submitter


async def test_sync_tasks_see_the_attempt_context_in_their_thread() -> None:
    rec = Recorder()
    seen: list[tuple[str, str]] = []

    def job() -> None:
        seen.append((marker.get(), request.get()))

    async with Runtime() as rt:
        rt.observe(rec)
        request.set("req-loop")
        await rt.wait_until(job, name="on-loop").wait(5)

        # Submitted from a thread that is not the loop's: the direct path.
        def from_thread() -> None:
            request.set("req-thread")
            rt.wait_until(job, name="direct").wait_sync(5)

        await anyio.to_thread.run_sync(from_thread)
        await rt.drain(5)
    assert seen == [("on-loop#1", "req-loop"), ("direct#1", "req-thread")]
    for name, req in (("on-loop", "req-loop"), ("direct", "req-thread")):
        assert rec.of(name) == [
            ("submitted", name, req, False, False),
            ("started", name, 1),
            ("ended", name, 1, None, False),
            ("finished", name, "succeeded"),
        ]


async def test_retries_say_whether_another_attempt_follows() -> None:
    rec = Recorder()
    calls = 0
    async with Runtime(backoff=bgtasks.Backoff(initial=0, max=0, jitter=0)) as rt:
        rt.observe(rec)

        @rt.background(retries=2, name="flaky")
        async def flaky() -> str:
            nonlocal calls
            calls += 1
            if calls < 3:
                raise ValueError("not yet")
            return "ok"

        @rt.background(retries=1, name="broken")
        async def broken() -> None:
            raise ValueError("never")

        flaky()
        broken()
        await rt.drain(5)
    assert rec.of("flaky")[1:] == [
        ("started", "flaky", 1),
        ("ended", "flaky", 1, "ValueError", True),
        ("started", "flaky", 2),
        ("ended", "flaky", 2, "ValueError", True),
        ("started", "flaky", 3),
        ("ended", "flaky", 3, None, False),
        ("finished", "flaky", "succeeded"),
    ]
    assert [e[3:] for e in rec.of("broken") if e[0] == "ended"] == [
        ("ValueError", True),
        ("ValueError", False),
    ]
    assert rec.of("broken")[-1] == ("finished", "broken", "failed")


async def test_cancellation_and_limit_stops_are_told_apart() -> None:
    rec = Recorder()
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    async with Runtime() as rt:
        rt.observe(rec)
        h = rt.wait_until(hang(), name="cancelled")
        await asyncio.wait_for(started.wait(), 5)
        h.cancel()
        rt.wait_until(hang(), name="limited", limits=Limits(wall_clock=0.05))
        await rt.drain(5)
    assert rec.of("cancelled")[-2:] == [
        ("ended", "cancelled", 1, "CancelledError", False),
        ("finished", "cancelled", "cancelled"),
    ]
    assert rec.of("limited")[-2:] == [
        ("ended", "limited", 1, "WallClockLimitExceeded", False),
        ("finished", "limited", "failed"),
    ]


async def test_a_task_cancelled_before_it_ran_finishes_once_without_attempts() -> None:
    rec = Recorder()
    async with Runtime() as rt:
        rt.observe(rec)

        async def never() -> None:
            raise AssertionError("ran")

        rt.wait_until(never(), name="never").cancel()
        await rt.drain(5)
    assert rec.of("never") == [
        ("submitted", "never", "none", False, False),
        ("finished", "never", "cancelled"),
    ]


async def test_rejections_name_their_reason() -> None:
    rec = Recorder()
    gate = asyncio.Event()
    rt = Runtime(max_pending=1)
    rt.observe(rec)
    async with rt:
        rt.wait_until(gate.wait(), name="first")
        with pytest.raises(bgtasks.RegistryFull):
            rt.wait_until(gate.wait(), name="second")
        with pytest.raises(bgtasks.RegistryFull):
            await anyio.to_thread.run_sync(lambda: rt.wait_until(print, name="third"))
        gate.set()
        await rt.drain(5)
    with pytest.raises(bgtasks.RegistryFull):
        rt.wait_until(print, name="late")
    assert [e for e in rec.events if e[0] == "rejected"] == [
        ("rejected", "second", "pending"),
        ("rejected", "third", "pending"),
        ("rejected", "late", "shutdown"),
    ]


async def test_a_failing_observer_is_logged_and_breaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Observer):
        def __getattribute__(self, name: str) -> Any:
            if name in ("submitted", "attempt_started", "attempt_ended", "finished", "carrier"):
                raise RuntimeError(f"broken {name}")
            return object.__getattribute__(self, name)

    rec = Recorder()
    caplog.set_level(logging.ERROR, "bgtasks")
    async with Runtime() as rt:
        rt.observe(Broken())
        rt.observe(rec)

        async def job() -> int:
            return 7

        record = await rt.wait_until(job(), name="job").wait(5)
        await rt.drain(5)
    assert record.status == "succeeded" and record.result == 7
    assert [e[0] for e in rec.of("job")] == ["submitted", "started", "ended", "finished"]
    failed = {r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records}
    assert failed == {"submitted()", "attempt_started()", "attempt_ended()", "finished()"}


async def test_unsubscribe_stops_the_events_and_nothing_is_built_when_off() -> None:
    rec = Recorder()
    async with Runtime() as rt:
        stop = rt.observe(rec)
        stop()
        assert rt._observers == ()

        async def job() -> None:
            pass

        h = rt.wait_until(job(), name="job")
        rt.wait_until(lambda: None, name="sync")
        await rt.drain(5)
    assert rec.events == []
    assert h._x is None  # no per-task side object for observers that are off


async def test_observe_refuses_what_is_not_an_observer() -> None:
    with pytest.raises(TypeError, match="Observer"):
        Runtime().observe(object())  # type: ignore[arg-type]


def test_limit_name() -> None:
    assert limit_name(bgtasks.WallClockLimitExceeded("x")) == "wall_clock"
    assert limit_name(bgtasks.CPULimitExceeded("x")) == "cpu_time"
    assert limit_name(bgtasks.MemoryLimitExceeded("x")) == "memory"
    assert limit_name(ValueError("x")) is None
    assert limit_name(None) is None


async def test_a_durable_call_keeps_the_carrier_for_its_replay(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    first, second = Recorder(), Recorder()
    rt = Runtime(store=f"sqlite:///{db}", shutdown_grace=0.1)
    rt.observe(first)
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            request.set("req-d")
            handle = await durable_apps.forever.submit_async(1)
        finally:
            bgtasks._context.active_runtime.reset(token)
        await rt.drain(0.05)
    # Stopped by the shutdown: still journaled, with the submitter's carrier.
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (options,) = conn.execute("SELECT options FROM tasks WHERE id = ?", (handle.id,)).fetchone()
    assert json.loads(options)["context"] == {"request": "req-d"}
    name = handle.name
    assert first.of(name)[0] == ("submitted", name, "req-d", True, False)
    assert first.origins == [{"request": "req-d"}]

    request.set("none")
    rt2 = Runtime(store=f"sqlite:///{db}", shutdown_grace=0.1)
    rt2.observe(second)
    async with rt2:  # replays the journal as it starts
        again = rt2.handle(handle.id)
        assert again is not None
        with anyio.fail_after(5):
            while not any(e[0] == "started" for e in second.of(name)):
                await asyncio.sleep(0.01)
    assert second.of(name)[:2] == [
        ("submitted", name, "none", True, True),
        ("started", name, 2),
    ]
    assert second.origins == [{"request": "req-d"}]


async def test_a_call_the_store_cannot_journal_is_rejected_for_the_store() -> None:
    class Failing(MemoryStore):
        def journal(self, entry: Any) -> concurrent.futures.Future[Any]:
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            fut.set_exception(bgtasks.StoreError("disk full"))
            return fut

    rec = Recorder()
    rt = Runtime(store=Failing())
    rt.observe(rec)
    async with rt:

        @rt.background(name="keyed")
        async def keyed() -> None:
            pass

        with pytest.raises(bgtasks.RegistryFull, match="could not be journaled"):
            keyed.using(idempotency_key="k1").submit()
        await rt.drain(5)
    assert rec.events == [("rejected", "keyed", "store")]


async def test_a_call_refused_for_memory_is_rejected_for_memory() -> None:
    rec = Recorder()
    async with Runtime() as rt:
        rt.observe(rec)
        rt._admission.memory_high = True  # what the memory loop sets above 90% of memory_limit
        with pytest.raises(bgtasks.RegistryFull, match="memory_limit"):
            rt.wait_until(print, name="big")
        rt._admission.memory_high = False
    assert rec.events == [("rejected", "big", "memory")]


async def test_a_process_isolated_task_reports_its_attempts() -> None:
    import process_funcs

    rec = Recorder()
    async with Runtime(process_pool_size=1) as rt:
        rt.observe(rec)
        isolated = rt.background(isolation="process", name="isolated")(process_funcs.add)
        record = await isolated(2, 3).wait(30)
        await rt.drain(5)
    assert record.result == 5
    assert rec.of("isolated") == [
        ("submitted", "isolated", "none", False, False),
        ("started", "isolated", 1),
        ("ended", "isolated", 1, None, False),
        ("finished", "isolated", "succeeded"),
    ]
