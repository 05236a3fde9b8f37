"""Durable steps on the SQLite store: kept in the store, parked sleeps, restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import durable_apps
import pytest

import bgtasks
from bgtasks import Backoff, Runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
def steps_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "steps.log"
    monkeypatch.setenv("BGTASKS_STEPS_LOG", str(log))
    return log


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []



async def test_kept_steps_are_in_the_store_and_survive_a_task_retry(
    tmp_path: Path, steps_log: Path
) -> None:
    rt = Runtime(store=f"sqlite:///{tmp_path}/t.db", backoff=Backoff(0, 0, 0))
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            handle = await durable_apps.stepped_retry.submit_async(4)
        finally:
            bgtasks._context.active_runtime.reset(token)
        record = await handle.wait(10)
        kept = await asyncio.wrap_future(rt.store.kept_steps(handle.id))
    assert record.status == "succeeded", record.error
    assert record.result == 5
    assert lines(steps_log) == ["first 4"]  # once, across two task attempts
    assert kept == {"first": "5", "flaky": "5"}
    assert [(s.name, s.status) for s in record.steps] == [
        ("first", "succeeded"),
        ("flaky", "succeeded"),
    ]


async def test_a_step_result_that_is_not_json_names_the_step(tmp_path: Path) -> None:
    rt = Runtime(store=f"sqlite:///{tmp_path}/t.db")
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            handle = await durable_apps.unstorable.submit_async()
        finally:
            bgtasks._context.active_runtime.reset(token)
        record = await handle.wait(10)
    assert record.status == "failed"
    assert record.error is not None and record.error.type == "TypeError"
    assert "'returns an object'" in record.error.message and "JSON" in record.error.message
    assert record.steps[0].status == "failed"


async def test_a_parked_task_holds_no_slot_and_wakes_up(tmp_path: Path, steps_log: Path) -> None:
    rt = Runtime(store=f"sqlite:///{tmp_path}/t.db?poll=5", max_concurrency=1)
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            t0 = time.time()
            napping = await durable_apps.napper.submit_async(1, 0.6)
            for _ in range(200):
                rec = rt.get(napping.id)
                if rec is not None and rec.wake_at is not None and rec.status == "pending":
                    break
                await asyncio.sleep(0.01)
            assert rec is not None and rec.status == "pending" and rec.wake_at is not None
            assert rec.steps[-1].name == "nap" and rec.steps[-1].status == "sleeping"
            assert rt.handle(napping.id) is None  # nothing of it left in memory
            # max_concurrency=1, and another task runs to the end meanwhile.
            other = await durable_apps.double.submit_async(21)
            assert (await other.wait(5)).result == 42
            assert time.time() - t0 < 0.6
            record = await napping.wait(10)  # the waiter follows it through the park
        finally:
            bgtasks._context.active_runtime.reset(token)
    assert record.status == "succeeded", record.error
    assert record.result == 2
    assert time.time() - t0 >= 0.6
    assert time.time() - t0 < 3  # woken by its timer, not by the 5 s poll
    assert lines(steps_log) == ["first 1", "after 1"]
    assert record.wake_at is None
    assert [(s.name, s.status) for s in record.steps] == [
        ("before", "succeeded"),
        ("nap", "succeeded"),
    ]


async def test_a_restart_during_a_sleep_resumes_after_wake_at(
    tmp_path: Path, steps_log: Path
) -> None:
    db = f"sqlite:///{tmp_path}/t.db?poll=0.1"
    rt = Runtime(store=db)
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            handle = await durable_apps.napper.submit_async(7, 0.8)
        finally:
            bgtasks._context.active_runtime.reset(token)
        for _ in range(200):
            rec = rt.get(handle.id)
            if rec is not None and rec.status == "pending" and rec.wake_at is not None:
                break
            await asyncio.sleep(0.01)
    parked_until = rec.wake_at  # type: ignore[union-attr]
    assert parked_until is not None
    rt2 = Runtime(store=db)
    async with rt2:
        for _ in range(500):
            rec = rt2.get(handle.id)
            if rec is not None and rec.status == "succeeded":
                break
            await asyncio.sleep(0.01)
    assert rec is not None and rec.status == "succeeded", rec
    assert rec.finished_at is not None and rec.finished_at >= parked_until
    assert lines(steps_log) == ["first 7", "after 7"]


async def test_a_cancelled_parked_task_never_wakes(tmp_path: Path, steps_log: Path) -> None:
    rt = Runtime(store=f"sqlite:///{tmp_path}/t.db?poll=0.1")
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            handle = await durable_apps.napper.submit_async(3, 0.5)
        finally:
            bgtasks._context.active_runtime.reset(token)
        for _ in range(200):
            rec = rt.get(handle.id)
            if rec is not None and rec.status == "pending" and rec.wake_at is not None:
                break
            await asyncio.sleep(0.01)
        assert rt.cancel(handle.id)
        await asyncio.sleep(0.8)
        rec = rt.get(handle.id)
    assert rec is not None and rec.status == "cancelled"
    assert lines(steps_log) == ["first 3"]


def test_the_fastapi_example_onboards_in_steps(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib
    import sys
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette asks for httpx2
        from starlette.testclient import TestClient

    monkeypatch.setenv("BGTASKS_STORE", f"sqlite:///{tmp_path}/example.db?poll=0.2")
    monkeypatch.setenv("BGTASKS_EXAMPLE_COOL_OFF", "0.3")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    monkeypatch.delitem(sys.modules, "examples.fastapi_app.app", raising=False)
    example = importlib.import_module("examples.fastapi_app.app")
    with TestClient(example.app) as client:
        assert client.post("/onboard", json={"email": "nope"}).status_code == 422
        r = client.post("/onboard", json={"email": "ada@example.com"})
        assert r.status_code == 202, r.text
        url = r.headers["location"]
        seen: set[str] = set()
        body: dict[str, object] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            body = client.get(url).json()
            seen.add(f"{body['status']}:{'wake' if body['wake_at'] else '-'}")
            if body["status"] == "succeeded":
                break
            time.sleep(0.02)
        assert body["status"] == "succeeded", body
        assert "pending:wake" in seen  # parked during the cool-off
        steps = [(s["name"], s["status"]) for s in body["steps"]]  # type: ignore[union-attr]
        assert steps == [
            ("create account", "succeeded"),
            ("make invite code", "succeeded"),
            ("cool off", "succeeded"),
            ("send welcome", "succeeded"),
        ]
        assert client.get("/_bgtasks/").status_code == 200  # the dashboard, locally


async def test_a_durable_delayed_task_survives_a_restart_and_starts_no_earlier(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path}/t.db?poll=0.1"
    rt = Runtime(store=db, shutdown_grace=0.1)
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            t0 = time.time()
            handle = await durable_apps.double.using(delay=1.0).submit_async(4)
        finally:
            bgtasks._context.active_runtime.reset(token)
        rec = rt.get(handle.id)
        assert rec is not None and rec.status == "pending" and rec.wake_at is not None
    # Shut down before it was due: it stays queued, with its wake-up time.
    rt2 = Runtime(store=db)
    async with rt2:
        rec = rt2.get(handle.id)
        assert rec is not None and rec.status == "pending", rec
        for _ in range(300):
            rec = rt2.get(handle.id)
            if rec is not None and rec.status == "succeeded":
                break
            await asyncio.sleep(0.01)
    assert rec is not None and rec.status == "succeeded", rec
    assert rec.result == 8
    assert rec.started_at is not None and rec.started_at.timestamp() >= t0 + 0.99
