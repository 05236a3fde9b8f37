"""@background(durable=True): checks at decoration and call, the journal, replay
after a crash or a graceful shutdown, and idempotency keys."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from bgtasks._http import idempotency_key_from_header
from bgtasks.asgi import BackgroundMiddleware
from bgtasks.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from decimal import Decimal as CheckersOnly

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


async def make_db(db: Path) -> None:
    async with bgtasks.Runtime(store=url(db)):
        pass


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    """A gate file for ``durable_apps.gated`` and the endpoints: closed until touched."""
    path = tmp_path / "gate"
    durable_apps.GATE = path
    try:
        yield path
    finally:
        durable_apps.GATE = Path("/nonexistent/bgtasks-gate")


@contextlib.contextmanager
def active(rt: bgtasks.Runtime) -> Iterator[None]:
    token = bgtasks._context.active_runtime.set(rt)
    try:
        yield
    finally:
        bgtasks._context.active_runtime.reset(token)


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


def takes_checkers_only(n: int, amount: CheckersOnly) -> CheckersOnly: ...


def returns_checkers_only(n: int) -> CheckersOnly: ...


async def test_a_type_imported_only_under_type_checking_is_refused_by_parameter() -> None:
    # At decoration the name may still be defined further down the module; by
    # the first call it must exist, and the refusal names the parameter.
    fn = bgtasks.background(durable=True)(takes_checkers_only)
    async with bgtasks.Runtime() as rt:
        with pytest.raises(TypeError, match="parameter 'amount' \\(CheckersOnly\\)") as info:
            fn(1, 2)  # type: ignore[arg-type]
        assert "not only under `if TYPE_CHECKING:`" in str(info.value)
        assert "CheckersOnly" in str(info.value) and "takes_checkers_only" in str(info.value)
        assert sum(rt.stats().values()) == 0
        # The return annotation is not stored, so it need not resolve.
        ok = bgtasks.background(durable=True)(returns_checkers_only)
        assert (await ok.submit(3).wait(5)).status == "succeeded"


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
    # Nothing to wait for in memory: a call on the loop thread does not block it.
    assert not [r for r in caplog.records if "submit_async" in r.getMessage()]


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


async def test_submit_async_awaits_the_commit_without_blocking_the_loop(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db)) as rt:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")  # the journal write waits for this lock
            try:
                call = asyncio.ensure_future(durable_apps.double.submit_async(21))
                await asyncio.sleep(0)  # the call runs up to its first suspension
                # A call that blocked the loop would have ended by now (refused
                # after busy_timeout); this one is still waiting, off the loop.
                assert not call.done()
                assert rt.stats()["pending"] == 1
            finally:
                other.execute("ROLLBACK")
        handle = await asyncio.wait_for(call, 10)
        # Returned after the commit: another connection sees the row.
        assert query(db, "SELECT durable, payload FROM tasks WHERE id = ?", handle.id) == [
            (1, '{"n":21}')
        ]
        assert (await handle.wait(5)).result == 42
        # Not durable: it schedules as submit does.
        plain = await durable_apps.not_durable.submit_async(5)
        assert (await plain.wait(5)).result == 5


async def test_a_durable_call_on_the_loop_thread_warns_once_and_still_commits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "t.db"
    with caplog.at_level(logging.WARNING, "bgtasks"):
        async with bgtasks.Runtime(store=url(db)):
            handles = [durable_apps.double(1), durable_apps.double.submit(2)]
            for h in handles:  # committed before the call returned, as the contract says
                assert status_of(db, h.id) is not None
            off_loop = await anyio.to_thread.run_sync(durable_apps.double.submit, 3)
            assert [(await h.wait(5)).result for h in [*handles, off_loop]] == [2, 4, 6]
    warnings = [r for r in caplog.records if "submit_async" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "double(...) was called on the event loop's thread" in message
    assert "`await double.submit_async(...)`" in message


@contextlib.asynccontextmanager
async def _work_client(rt: bgtasks.Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a FastAPI app serving ``durable_apps.work`` at POST /work on ``rt``."""
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    app.add_api_route("/work", durable_apps.work, methods=["POST"])
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
    ):
        yield client


async def test_endpoint_answers_202_once_journaled(tmp_path: Path) -> None:
    # The async endpoint awaits the write off the loop; its 202 means "we have it".
    db = tmp_path / "t.db"
    rt = bgtasks.Runtime(store=url(db), shutdown_grace=0.1)
    async with _work_client(rt) as client:
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


async def test_endpoint_with_a_pydantic_body_is_journaled_and_replayed(
    tmp_path: Path, gate: Path
) -> None:
    db = tmp_path / "t.db"
    rt = bgtasks.Runtime(store=url(db), shutdown_grace=0.1)
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    app.add_api_route("/orders", durable_apps.order, methods=["POST"])
    long_key = "k" * 300
    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
    ):
        # FastAPI still reads the body as the model: a bad one is its 422, and no task.
        bad = await client.post("/orders", json={"qty": 2})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "sku"]
        r = await client.post("/orders", json={"sku": "s-1", "qty": "3"})
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        assert query(db, "SELECT target, payload FROM tasks WHERE id = ?", task_id) == [
            ("durable_apps:order", '{"order":{"sku":"s-1","qty":3}}')
        ]
        # A key longer than the store's bound is hashed: the retry finds the same task.
        keyed = [
            await client.post("/orders", json={"sku": "k"}, headers={"Idempotency-Key": long_key})
            for _ in range(2)
        ]
        assert keyed[0].json()["id"] == keyed[1].json()["id"]
        stored = query(db, "SELECT idempotency_key FROM tasks WHERE id = ?", keyed[0].json()["id"])
        assert stored == [(idempotency_key_from_header(long_key.encode()),)]
        assert query(db, "SELECT count(*) FROM tasks") == [(2,)]
    # Shutdown left both queued; the next runtime rebuilds the models and runs them.
    await anyio.Path(gate).touch()
    async with bgtasks.Runtime(store=url(db)) as again:
        handle = again.handle(task_id)
        assert handle is not None
        record = await handle.wait(5)
    assert record.result == {"sku": "s-1", "qty": 3, "pid": os.getpid()}


async def test_a_failed_journal_write_refuses_the_call_and_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bgtasks.Runtime(store=url(tmp_path / "t.db")) as rt:
        store = rt.store
        assert isinstance(store, SQLiteStore)

        def broken(entry: Any) -> concurrent.futures.Future[Any]:
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


async def test_a_locked_database_at_journal_time_refuses_the_call(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    rt = bgtasks.Runtime(store=url(db, "busy_timeout=0.1"))
    async with _work_client(rt) as client:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")
            try:
                with active(rt):  # outside a request: the lifespan's runtime
                    outcomes = await asyncio.gather(
                        durable_apps.double.submit_async(1),
                        anyio.to_thread.run_sync(durable_apps.double.submit, 2),
                        client.post("/work", params={"n": 3}),
                        return_exceptions=True,
                    )
            finally:
                other.execute("ROLLBACK")
        *errors, response = outcomes
        for error in errors:
            assert isinstance(error, bgtasks.RegistryFull), error
            assert isinstance(error.__cause__, bgtasks.StoreError)
            message = str(error)
            assert message.startswith("the call was not accepted: it could not be journaled")
            # The detail (with the file's path) is in the cause and the log, not the message.
            assert "stayed locked by another connection" in str(error.__cause__)
            assert ".db" not in message
        assert isinstance(response, httpx.Response)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "could not be journaled" in response.json()["detail"]
        assert ".db" not in response.text
        # Refused means refused: no row, no task in memory.
        store = rt.store
        assert isinstance(store, SQLiteStore)
        await store.flush()
        assert query(db, "SELECT count(*) FROM tasks") == [(0,)]
        assert sum(rt.stats().values()) == 0


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


CLAIMER = textwrap.dedent(
    """
    import asyncio, contextlib, sqlite3, sys, time
    import bgtasks, process_funcs

    async def main():
        print("ready", flush=True)
        sys.stdin.readline()  # the parent starts both processes' runtimes at once
        # Room for 4 at a time: each claims a few orphans, again every poll, so
        # the two processes' claims interleave until the journal is empty.
        async with bgtasks.Runtime(store=sys.argv[1], max_pending=4):
            deadline = time.monotonic() + 20
            with contextlib.closing(sqlite3.connect(sys.argv[2])) as conn:
                sql = "SELECT count(*) FROM tasks WHERE status IN ('pending', 'running')"
                while conn.execute(sql).fetchone()[0]:
                    if time.monotonic() > deadline:
                        sys.exit("timed out waiting for the journal to empty")
                    await asyncio.sleep(0.02)

    asyncio.run(main())
    """
)


async def test_two_processes_starting_together_run_each_orphan_once(tmp_path: Path) -> None:
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    await make_db(db)
    now = time.time()
    ids = [f"{n:022d}" for n in range(60)]
    payload = json.dumps({"path": str(log)})
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executemany(
            "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
            "target, payload, options) VALUES (?, 'append_id', ?, ?, ?, ?, 1, "
            "'process_funcs:append_id', ?, '{}')",
            [
                # Half never started, half were running when their process vanished.
                (task_id, status, now, owner, now, payload)
                for n, task_id in enumerate(ids)
                for status, owner in [("pending", None) if n % 2 else ("running", "ghost")]
            ],
        )
        conn.commit()

    def run_two() -> list[int]:
        env = {**os.environ, "PYTHONPATH": f"{TESTS}:{TESTS.parent}"}
        argv = [sys.executable, "-c", CLAIMER, url(db, "poll=0.02"), str(db)]
        with contextlib.ExitStack() as stack:  # closes the pipes
            procs = [
                stack.enter_context(
                    subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                )
                for _ in range(2)
            ]
            try:
                for proc in procs:
                    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
                for proc in procs:
                    assert proc.stdin is not None
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
                return [proc.wait(30) for proc in procs]
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)

    assert await anyio.to_thread.run_sync(run_two) == [0, 0]
    lines = [line.split() for line in log.read_text().splitlines()]
    runs = collections.Counter(task_id for task_id, _ in lines)
    assert set(runs) == set(ids)
    assert [task_id for task_id, count in runs.items() if count != 1] == []
    assert len({pid for _, pid in lines}) == 2  # both claimed: they did compete
    assert query(db, "SELECT DISTINCT status FROM tasks") == [("succeeded",)]


async def test_durable_process_task_is_journaled_and_replayed_in_a_worker(
    tmp_path: Path,
) -> None:
    import process_funcs

    db, gate = tmp_path / "t.db", tmp_path / "gate"
    async with bgtasks.Runtime(store=url(db), shutdown_grace=0.1):
        h = await process_funcs.durable_wait_for.submit_async(str(gate))
        rows = query(db, "SELECT target, payload, options FROM tasks WHERE id = ?", h.id)
        target, payload, options = rows[0]
        assert (target, payload) == (
            "process_funcs:durable_wait_for",
            json.dumps({"gate": str(gate)}, separators=(",", ":")),
        )
        assert json.loads(options)["isolation"] == "process"
        with anyio.fail_after(10):  # no event says "running": look until it is
            while h.status != "running":
                await asyncio.sleep(0.01)
    # Shutdown stopped the worker and left the task queued.
    assert query(db, "SELECT status, owner, attempts FROM tasks WHERE id = ?", h.id) == [
        ("pending", None, 1)
    ]
    gate.touch()
    async with bgtasks.Runtime(store=url(db)) as rt:
        again = rt.handle(h.id)
        assert again is not None
        record = await again.wait(10)
    assert (record.status, record.attempts) == ("succeeded", 2)
    assert isinstance(record.result, int) and record.result != os.getpid()  # in a worker


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
        assert await durable_apps.double.using(idempotency_key="k1").submit_async(9) is first
        # Keys are scoped by task name; non-durable tasks take keys too.
        other = durable_apps.not_durable.using(idempotency_key="k1").submit(5)
        assert other is not first
        assert durable_apps.not_durable.using(idempotency_key="k1").submit(6) is other
        await rt.drain(5)
        assert rt.stats()["succeeded"] == 2


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_an_expired_task_frees_its_key(store: str, tmp_path: Path) -> None:
    spec = "memory" if store == "memory" else url(tmp_path / "t.db")
    async with bgtasks.Runtime(store=spec, retention=0.01) as rt:
        first = durable_apps.double.using(idempotency_key="k")(1)
        await first.wait(5)
        time.sleep(0.02)
        rt.expire()
        if isinstance(rt.store, SQLiteStore):
            await rt.store.flush()
        second = durable_apps.double.using(idempotency_key="k")(2)
        assert second.id != first.id
        assert (await second.wait(5)).result == 4
        assert durable_apps.double.using(idempotency_key="k")(3) is second


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (None, None),
        ("", None),
        (b"", None),
        (" \t ", None),
        (b"  ", None),
        (" order-7\t", "order-7"),
        (b"order-7 ", "order-7"),
        ("k" * 255, "k" * 255),
        (b"\xe9t\xe9", "\xe9t\xe9"),  # latin-1, as ASGI servers and WSGI environs give it
    ],
)
def test_idempotency_key_from_header(value: str | bytes | None, key: str | None) -> None:
    assert idempotency_key_from_header(value) == key


def test_a_long_idempotency_key_is_hashed_alike_from_bytes_and_text() -> None:
    long = "k" * 256
    hashed = "sha256:" + hashlib.sha256(long.encode()).hexdigest()
    assert idempotency_key_from_header(long) == idempotency_key_from_header(long.encode()) == hashed
    assert len(hashed) <= 255
    # WSGI gives the header as latin-1 text, ASGI as bytes: the same key either way.
    accented = "\xe9" * 300
    assert idempotency_key_from_header(accented) == idempotency_key_from_header(
        accented.encode("latin-1")
    )
    assert idempotency_key_from_header("k" * 257) != hashed


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
