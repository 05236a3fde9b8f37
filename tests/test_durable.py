"""@background(durable=True): checks at decoration and call, the journal, replay
after a crash or a graceful shutdown, and idempotency keys."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import durable_apps
import httpx
import pytest
from asgi_lifespan import LifespanManager
from durable_apps import Order
from fastapi import FastAPI
from starlette.requests import Request

import bgtasks
from bgtasks._durable import Codec, RemoteHandle
from bgtasks.asgi import BackgroundMiddleware
from bgtasks.stores.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent


def url(path: Path, query: str = "") -> str:
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def status_of(db: Path, task_id: str) -> str | None:
    rows = query(db, "SELECT status FROM tasks WHERE id = ?", task_id)
    return rows[0][0] if rows else None


# ---------------------------------------------------------------------- decoration
class Session:
    """Stands for a database session: an object that is not data."""


def takes_request(request: Request, n: int) -> None: ...


def takes_session(db: Session) -> None: ...


def takes_callback(done: Any, cb: Any = None, *, then: Any = print) -> None: ...


@pytest.mark.parametrize(("fn", "param"), [(takes_request, "request"), (takes_session, "db")])
def test_unstorable_parameter_is_refused_by_name(fn: Any, param: str) -> None:
    with pytest.raises(TypeError, match=f"parameter {param!r}") as info:
        bgtasks.background(durable=True)(fn)
    message = str(info.value)
    assert "cannot be stored as JSON" in message
    assert "an id, a URL, a pydantic model" in message  # the fix


def test_a_function_another_process_cannot_import_is_refused() -> None:
    def nested(n: int) -> None: ...

    with pytest.raises(TypeError, match="at module level") as info:
        bgtasks.background(durable=True)(nested)
    assert "nested" in str(info.value)
    with pytest.raises(TypeError, match="at module level"):
        bgtasks.background(durable=True)(lambda n: n)

    class Job:
        def __call__(self, n: int) -> None: ...

    with pytest.raises(TypeError, match="plain function"):
        bgtasks.background(durable=True)(Job())


def test_codec_round_trip_keeps_the_call_shape() -> None:
    def fn(
        a: int, /, b: Order, c: str = "c", *rest: int, k: bool = False, **extra: float
    ) -> None: ...

    codec = Codec.build(fn)
    assert codec is not None
    args, kwargs, payload = codec.dump("fn", (1, {"sku": "x"}, "cc", 7, 8), {"k": True, "z": 1})
    assert args == (1, Order(sku="x"), "cc", 7, 8)
    assert kwargs == {"k": True, "z": 1.0}
    assert codec.load(payload) == (args, kwargs)
    # A default left out stays out: the function's own default applies on replay.
    args, kwargs, payload = codec.dump("fn", ("5", Order(sku="y")), {})
    assert (args, kwargs) == ((5, Order(sku="y")), {})
    assert codec.load(payload) == (args, kwargs)


def test_unannotated_parameters_take_json_values_only() -> None:
    codec = Codec.build(takes_callback)
    assert codec is not None
    args, kwargs, payload = codec.dump("f", ({"a": [1, None]},), {})
    assert codec.load(payload) == (args, kwargs)
    with pytest.raises(TypeError, match="argument 'done'") as info:
        codec.dump("f", (datetime.datetime.now(),), {})
    assert "annotate the parameter" in str(info.value)
    with pytest.raises(TypeError, match="missing a required argument"):
        codec.dump("f", (), {})


async def test_memory_store_runs_durable_tasks_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "bgtasks"):
        async with bgtasks.Runtime():
            a = durable_apps.double("21")  # type: ignore[arg-type]
            b = durable_apps.double.submit(1)
            assert (await a.wait(5)).result == 42  # validated: "21" -> 21
            assert (await b.wait(5)).result == 2
    warnings = [r for r in caplog.records if "nothing survives a crash" in r.getMessage()]
    assert len(warnings) == 1


async def test_bad_argument_is_refused_at_call_time_and_admits_nothing(tmp_path: Path) -> None:
    async with bgtasks.Runtime(store=url(tmp_path / "t.db")) as rt:
        with pytest.raises(TypeError, match="argument 'n'"):
            durable_apps.double("twenty")  # type: ignore[arg-type]
        assert rt.stats()["pending"] == 0
        assert await rt.drain(0.5)


# ---------------------------------------------------------------------- the journal
async def test_journaled_before_the_call_returns(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db)):
        # A call on the loop thread (a short blocking write, documented) and a
        # sync call from a worker thread (waits for the commit).
        handles = [
            durable_apps.gated(1),
            durable_apps.gated.submit(2),
            await anyio.to_thread.run_sync(durable_apps.place, Order(sku="s"), "n"),
        ]
        for h in handles:
            rows = query(db, "SELECT durable, target, payload FROM tasks WHERE id = ?", h.id)
            assert len(rows) == 1 and rows[0][0] == 1
        assert query(db, "SELECT target, payload FROM tasks WHERE id = ?", handles[2].id) == [
            ("durable_apps:place", '{"order":{"sku":"s","qty":1},"note":"n"}')
        ]
        assert (await handles[2].wait(5)).result == {
            "sku": "s",
            "qty": 1,
            "note": "n",
            "urgent": False,
        }
        for h in handles[:2]:
            h.cancel()


async def test_endpoint_answers_202_once_journaled(tmp_path: Path) -> None:
    # The async endpoint awaits the write off the loop; its 202 means "we have it".
    db = tmp_path / "t.db"
    rt = bgtasks.Runtime(store=url(db), shutdown_grace=0.1)
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    app.add_api_route("/work", durable_apps.work, methods=["POST"])
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
    ):
        r = await client.post("/work", params={"n": 5})
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        assert status_of(db, task_id) in ("pending", "running")
        again = [
            await client.post("/work", params={"n": 6}, headers={"Idempotency-Key": "abc"})
            for _ in range(2)
        ]
        assert [x.status_code for x in again] == [202, 202]
        assert again[0].json()["id"] == again[1].json()["id"] != task_id
    # Shutdown left them queued, as journaled.
    assert query(db, "SELECT count(*) FROM tasks WHERE status = 'pending'") == [(2,)]


async def test_a_failed_journal_write_refuses_the_call_and_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bgtasks.Runtime(store=url(tmp_path / "t.db")) as rt:
        store = rt.store
        assert isinstance(store, SQLiteStore)

        def broken(runtime: Any, entry: Any) -> concurrent.futures.Future[Any]:
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            fut.set_exception(bgtasks.StoreError("disk I/O error"))
            return fut

        monkeypatch.setattr(store, "journal", broken)
        with pytest.raises(bgtasks.RegistryFull, match="could not be journaled") as info:
            durable_apps.double(1)
        assert isinstance(info.value.__cause__, bgtasks.StoreError)
        with pytest.raises(bgtasks.RegistryFull):
            await anyio.to_thread.run_sync(durable_apps.double.submit, 1)
        assert sum(rt.stats().values()) == 0
        assert await rt.drain(1)


# ---------------------------------------------------------------------- replay
CRASHER = textwrap.dedent(
    """
    import asyncio, sys
    import bgtasks, durable_apps

    async def main():
        async with bgtasks.Runtime(store=sys.argv[1], max_concurrency=2):
            ids = [durable_apps.gated(n).id for n in range(5)]
            await asyncio.sleep(0.2)  # two start; their records reach the file
            print(" ".join(ids), flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
    """
)


def accept_then_die(db: Path, gate: Path) -> list[str]:
    """Run CRASHER in a subprocess; kill -9 it once it has accepted its tasks."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}:{TESTS.parent}", "BGTASKS_GATE": str(gate)}
    with subprocess.Popen(
        [sys.executable, "-c", CRASHER, url(db)], stdout=subprocess.PIPE, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    ids = line.decode().split()
    assert len(ids) == 5, line
    return ids


async def test_replay_after_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    gate = tmp_path / "gate"
    ids = await anyio.to_thread.run_sync(accept_then_die, db, gate)
    statuses = dict(query(db, "SELECT id, status FROM tasks"))
    assert sorted(statuses.values()) == ["pending"] * 3 + ["running"] * 2

    gate.touch()
    durable_apps.GATE = gate  # the replayed tasks run here, in this process
    try:
        async with bgtasks.Runtime(store=url(db)) as rt:
            # Claimed at start: the dead process is noticed at once, no lease to wait out.
            handles = [rt.handle(task_id) for task_id in ids]
            assert all(h is not None for h in handles)
            records = [await h.wait(5) for h in handles if h is not None]
    finally:
        durable_apps.GATE = Path("/nonexistent/bgtasks-gate")
    assert [r.result for r in records] == [{"n": n, "pid": os.getpid()} for n in range(5)]
    # Attempts count across processes: the two that were running start their second.
    assert sorted(r.attempts for r in records) == [1, 1, 1, 2, 2]
    assert query(db, "SELECT count(*) FROM owners") == [(0,)]


async def test_graceful_shutdown_leaves_durable_tasks_queued(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    go = asyncio.Event()

    async def plain() -> None:
        await go.wait()

    async with bgtasks.Runtime(store=url(db), shutdown_grace=0.1) as rt:
        durable = [durable_apps.forever(n) for n in range(2)]
        other = rt.wait_until(plain)
        await asyncio.sleep(0.05)
    assert other.status == "cancelled"
    await asyncio.sleep(0)
    assert status_of(db, other.id) == "cancelled"
    for h in durable:
        assert query(db, "SELECT status, owner FROM tasks WHERE id = ?", h.id) == [
            ("pending", None)
        ]
    async with bgtasks.Runtime(store=url(db), shutdown_grace=0.1) as rt2:
        again = rt2.handle(durable[0].id)
        assert again is not None and again.status in ("pending", "running")
    # Stopped again by the second shutdown: still queued, attempts counted.
    rows = query(db, "SELECT status, attempts FROM tasks WHERE id = ?", durable[0].id)
    assert rows == [("pending", 2)]


async def test_retries_are_counted_across_processes(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db)):
        pass
    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        # A process died during the first of its three attempts.
        conn.execute(
            "INSERT INTO tasks (id, name, status, created_at, attempts, owner, updated_at, "
            "durable, target, payload, options) VALUES (?, 'always_fails', 'running', ?, 1, "
            "'ghost', ?, 1, 'durable_apps:always_fails', '{}', '{\"retries\": 2}')",
            ("F" * 22, now, now),
        )
        conn.commit()
    rt = bgtasks.Runtime(store=url(db), backoff=bgtasks.Backoff(0, 0, 0))
    rt.on("unhandledrejection", lambda event: event.prevent_default())
    async with rt:
        h = rt.handle("F" * 22)
        assert h is not None
        record = await h.wait(5)
    assert (record.status, record.attempts) == ("failed", 3)
    assert record.error is not None and record.error.message == "always fails"


async def test_a_function_that_is_gone_fails_its_task_clearly(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db)):
        pass
    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
            "target, payload, options) VALUES (?, 'gone', 'pending', ?, NULL, ?, 1, "
            "'durable_apps:renamed_since', '{}', '{}')",
            ("G" * 22, now, now),
        )
        conn.commit()
    rt = bgtasks.Runtime(store=url(db))
    rt.on("unhandledrejection", lambda event: event.prevent_default())
    async with rt:
        h = rt.handle("G" * 22)
        assert h is not None
        record = await h.wait(5)
    assert record.status == "failed" and record.error is not None
    assert "durable_apps:renamed_since cannot be imported" in record.error.message
    assert "Keep durable functions importable" in record.error.message


# ---------------------------------------------------------------------- idempotency
@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_idempotency_key_returns_the_existing_task(store: str, tmp_path: Path) -> None:
    spec = "memory" if store == "memory" else url(tmp_path / "t.db")
    async with bgtasks.Runtime(store=spec) as rt:
        first = durable_apps.double.using(idempotency_key="k1")(1)
        again = durable_apps.double.using(idempotency_key="k1")(2)
        sync_again = await anyio.to_thread.run_sync(
            durable_apps.double.using(idempotency_key="k1").submit, 3
        )
        assert first is again is sync_again
        assert (await first.wait(5)).result == 2
        # Finished tasks keep their key until they expire.
        assert durable_apps.double.using(idempotency_key="k1")(4) is first
        # Keys are scoped by task name; non-durable tasks take keys too.
        other = durable_apps.not_durable.using(idempotency_key="k1").submit(5)
        assert other is not first
        assert durable_apps.not_durable.using(idempotency_key="k1").submit(6) is other
        await rt.drain(5)
        assert rt.stats()["succeeded"] == 2


async def test_idempotency_under_concurrent_callers(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db)):
        fn = durable_apps.double.using(idempotency_key="same")
        barrier = threading.Barrier(8)

        def call() -> str:
            barrier.wait(5)
            return fn.submit(1).id

        ids = set()
        async with anyio.create_task_group() as tg:

            async def one() -> None:
                ids.add(await anyio.to_thread.run_sync(call))

            for _ in range(8):
                tg.start_soon(one)
        assert len(ids) == 1
    assert query(db, "SELECT count(*) FROM tasks") == [(1,)]


async def test_idempotency_key_held_by_another_runtime(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    gate = tmp_path / "gate"
    durable_apps.GATE = gate
    try:
        a, b = (bgtasks.Runtime(store=url(db), shutdown_grace=1) for _ in "ab")
        async with a, b:
            with_key = durable_apps.gated.using(idempotency_key="order-7")
            owner: bgtasks.TaskHandle = with_key(7)  # on b, the innermost runtime
            assert b.handle(owner.id) is owner
            token = bgtasks._context.active_runtime.set(a)
            try:
                seen = with_key(8)
            finally:
                bgtasks._context.active_runtime.reset(token)
            assert isinstance(seen, RemoteHandle)
            assert seen.id == owner.id and a.handle(owner.id) is None
            assert seen.status in ("pending", "running")
            gate.touch()
            record = await seen.wait(5)  # read from the store
            assert record.result == {"n": 7, "pid": os.getpid()}
            assert seen.record.status == "succeeded"
    finally:
        durable_apps.GATE = Path("/nonexistent/bgtasks-gate")
