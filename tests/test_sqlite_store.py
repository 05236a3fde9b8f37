"""SQLiteStore: URLs, shared records, retention, claims, and its errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import bgtasks
from bgtasks.stores import Store, open_store
from bgtasks.stores.memory import MemoryStore
from bgtasks.stores.sqlite import SCHEMA_VERSION, SQLiteStore

pytestmark = pytest.mark.anyio


def url(path: Path, query: str = "") -> str:
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def execute(db: Path, sql: str, *args: Any) -> None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(sql, args)
        conn.commit()


async def flush(rt: bgtasks.Runtime) -> None:
    store = rt.store
    assert isinstance(store, SQLiteStore)
    await store.flush()


async def make_db(db: Path) -> None:
    async with bgtasks.Runtime(store=url(db)):
        pass


# ---------------------------------------------------------------------- URLs
def test_from_url_paths_and_options(tmp_path: Path) -> None:
    rel = SQLiteStore.from_url("sqlite:///data/tasks.db")
    assert rel.path == "data/tasks.db"
    absolute = SQLiteStore.from_url(
        f"sqlite:///{tmp_path}/t.db?lease=2&poll=0.5&max_crashes=1&synchronous=FULL"
    )
    assert absolute.path == f"{tmp_path}/t.db"
    assert (absolute.lease, absolute.poll, absolute.max_crashes) == (2.0, 0.5, 1)
    assert absolute.synchronous == "full"
    assert isinstance(open_store(url(tmp_path / "x.db")), SQLiteStore)
    assert isinstance(SQLiteStore("x.db"), Store)
    assert isinstance(MemoryStore(), Store)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sqlite:///t.db?speed=3", "unknown SQLite store option 'speed'"),
        ("sqlite:///t.db?lease=soon", "lease='soon'"),
        ("sqlite:///t.db?lease=0", "lease must be a positive number"),
        ("sqlite:///t.db?synchronous=off", "'normal' or 'full'"),
        ("sqlite:///:memory:", "not an in-memory database"),
        ("sqlite://host/t.db", "no host part"),
    ],
)
def test_from_url_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SQLiteStore.from_url(spec)


def test_constructing_touches_no_file(tmp_path: Path) -> None:
    # An app builds its Runtime at import, before gunicorn forks: nothing opens yet.
    bgtasks.Runtime(store=url(tmp_path / "later.db"))
    assert not (tmp_path / "later.db").exists()


# ---------------------------------------------------------------------- records
async def test_wal_schema_and_records_of_every_task(tmp_path: Path) -> None:
    db = tmp_path / "t.db"

    async def job(x: int) -> int:
        bgtasks.current_task().report_progress(1, 2, "half")  # type: ignore[union-attr]
        return x + 1

    async with bgtasks.Runtime(store=url(db)) as rt:
        h = rt.wait_until(job, 41)
        await h.wait(5)
        await flush(rt)
        assert query(db, "PRAGMA journal_mode") == [("wal",)]
        assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        row = query(db, "SELECT status, result, attempts, progress, durable FROM tasks")
        assert row == [("succeeded", "42", 1, '{"done":1.0,"total":2.0,"message":"half"}', 0)]
        # The store's own reader gives the same record as the runtime's memory.
        assert rt.store.load(h.id) == h.record


async def test_another_runtime_reads_the_record(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db)) as a, bgtasks.Runtime(store=url(db)) as b:
        go = asyncio.Event()

        async def job() -> str:
            await go.wait()
            return "done"

        h = a.wait_until(job)
        await asyncio.sleep(0)  # let it start
        await flush(a)
        seen = b.get(h.id)
        assert seen is not None and seen.status == "running"
        assert b.handle(h.id) is None  # b only reads it
        go.set()
        await h.wait(5)
        await flush(a)
        done = b.get(h.id)
        assert done is not None
        assert (done.status, done.result, done.finished_at) == (
            "succeeded",
            "done",
            h.record.finished_at,
        )
        assert b.get("A" * 22) is None


async def test_retention_deletes_finished_rows(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db), retention=0.01) as rt:
        h = rt.wait_until(lambda: 1)
        await h.wait(5)
        await flush(rt)
        assert query(db, "SELECT count(*) FROM tasks") == [(1,)]
        time.sleep(0.02)
        rt.expire()
        await flush(rt)
        assert query(db, "SELECT count(*) FROM tasks") == [(0,)]
        assert rt.get(h.id) is None


async def test_orphaned_non_durable_task_fails_as_crashed(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    await make_db(db)
    now = time.time()
    execute(
        db,
        "INSERT INTO tasks (id, name, status, created_at, attempts, owner, updated_at) "
        "VALUES (?, 'job', 'running', ?, 1, 'ghost', ?)",
        "B" * 22,
        now,
        now,
    )
    async with bgtasks.Runtime(store=url(db)) as rt:
        record = rt.get("B" * 22)
        assert record is not None and record.status == "failed"
        assert record.error is not None and record.error.type == "WorkerCrashed"
        assert "not durable" in record.error.message


async def test_live_owner_keeps_its_tasks_until_its_lease_expires(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    await make_db(db)
    now = time.time()
    for task_id, owner, expires in (("C" * 22, "alive", now + 60), ("D" * 22, "gone", now - 1)):
        execute(
            db,
            "INSERT INTO owners (id, host, pid, proc_started, expires_at) "
            "VALUES (?, 'another-host', 1, 0, ?)",
            owner,
            expires,
        )
        execute(
            db,
            "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
            "target, payload, options) VALUES (?, 'double', 'pending', ?, ?, ?, 1, "
            "'durable_apps:double', '{\"n\": 21}', '{}')",
            task_id,
            now,
            owner,
            now,
        )
    async with bgtasks.Runtime(store=url(db)) as rt:
        assert rt.handle("C" * 22) is None  # its owner's lease holds
        h = rt.handle("D" * 22)
        assert h is not None
        assert (await h.wait(5)).result == 42
    assert query(db, "SELECT status FROM tasks WHERE id = ?", "C" * 22) == [("pending",)]


async def test_max_crashes_fails_a_task_that_keeps_killing_its_process(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    await make_db(db)
    now = time.time()
    execute(
        db,
        "INSERT INTO tasks (id, name, status, created_at, attempts, owner, updated_at, "
        "durable, target, payload, options, crashes) VALUES (?, 'double', 'running', ?, 2, "
        "'ghost', ?, 1, 'durable_apps:double', '{\"n\": 1}', '{}', 1)",
        "E" * 22,
        now,
        now,
    )
    async with bgtasks.Runtime(store=url(db, "max_crashes=1")) as rt:
        record = rt.get("E" * 22)
        assert record is not None and record.status == "failed"
        assert record.error is not None and record.error.type == "WorkerCrashed"
        assert "died 2 times" in record.error.message


async def test_a_renewed_lease_keeps_a_long_task_and_orphans_are_claimed_each_poll(
    tmp_path: Path,
) -> None:
    import durable_apps

    db, gate = tmp_path / "t.db", tmp_path / "gate"
    lease, poll = 0.25, 0.05
    options = f"lease={lease}&poll={poll}"
    durable_apps.GATE = gate
    try:
        a, b = (bgtasks.Runtime(store=url(db, options), shutdown_grace=1) for _ in "ab")
        async with a, b:
            token = bgtasks._context.active_runtime.set(a)
            try:
                h = await durable_apps.gated.submit_async(1)
            finally:
                bgtasks._context.active_runtime.reset(token)
            # Three lease periods: without renewal a's lease would expire after the
            # first, and b, looking every poll, would claim the task.
            await asyncio.sleep(3 * lease)
            await flush(a)
            assert b.handle(h.id) is None
            assert query(db, "SELECT status, owner, attempts FROM tasks WHERE id = ?", h.id) == [
                ("running", a.store.owner, 1)  # type: ignore[attr-defined]
            ]

            # An orphan that appears while both run is claimed at the next look.
            now = time.time()
            execute(
                db,
                "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
                "target, payload, options) VALUES (?, 'double', 'pending', ?, NULL, ?, 1, "
                "'durable_apps:double', '{\"n\": 4}', '{}')",
                "K" * 22,
                now,
                now,
            )
            t0 = time.monotonic()
            while (orphan := a.handle("K" * 22) or b.handle("K" * 22)) is None:
                assert time.monotonic() - t0 < 2, "the orphan was not claimed"
                await asyncio.sleep(0.01)
            claimed_after = time.monotonic() - t0
            assert claimed_after < 10 * poll, claimed_after
            assert (await orphan.wait(5)).result == 8

            gate.touch()
            record = await h.wait(5)
            assert (record.status, record.attempts) == ("succeeded", 1)  # ran once, on a
            assert b.handle(h.id) is None
    finally:
        durable_apps.GATE = Path("/nonexistent/bgtasks-gate")


# ---------------------------------------------------------------------- errors
async def test_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "t.db"
    with pytest.raises(bgtasks.StoreError, match="does not exist") as info:
        async with bgtasks.Runtime(store=url(path)):
            pass
    assert str(path.parent) in str(info.value)


async def test_unwritable_path(tmp_path: Path) -> None:
    # A directory where the file should be: SQLite cannot open it (even as root).
    path = tmp_path / "t.db"
    path.mkdir()
    with pytest.raises(bgtasks.StoreError, match="cannot open the task store") as info:
        async with bgtasks.Runtime(store=url(path)):
            pass
    assert "writable" in str(info.value)


async def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    path.write_bytes(b"this is not a database, just text " * 200)
    with pytest.raises(bgtasks.StoreError, match="not a SQLite database or is corrupt"):
        async with bgtasks.Runtime(store=url(path)):
            pass


async def test_schema_from_a_newer_version(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    execute(db, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(bgtasks.StoreError, match="newer bgtasks") as info:
        async with bgtasks.Runtime(store=url(db)):
            pass
    assert "upgrade bgtasks" in str(info.value)


async def test_locked_database(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    await make_db(db)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        t0 = time.monotonic()
        with pytest.raises(bgtasks.StoreError, match="stayed locked") as info:
            async with bgtasks.Runtime(store=url(db, "busy_timeout=0.2")):
                pass
        assert time.monotonic() - t0 < 5
        other.execute("ROLLBACK")
    assert "busy_timeout" in str(info.value)


async def test_store_outlives_a_runtime_that_failed_to_open(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    db.write_text("garbage " * 100)
    with pytest.raises(bgtasks.StoreError):
        async with bgtasks.Runtime(store=url(db)):
            pass
    db.unlink()
    async with bgtasks.Runtime(store=url(db)) as rt:
        assert json.loads(json.dumps(rt.stats()))["pending"] == 0


async def test_cancel_a_task_another_process_runs(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    import durable_apps

    a = bgtasks.Runtime(store=url(db, "poll=0.05"))
    b = bgtasks.Runtime(store=url(db, "poll=0.05"))
    async with a, b:
        h = durable_apps.forever(1)  # on b, the innermost runtime
        await flush(b)
        assert a.cancel(h.id) is True
        assert (await h.wait(5)).status == "cancelled"
        await flush(b)
        seen = a.get(h.id)
        assert seen is not None and seen.status == "cancelled"
        assert a.cancel(h.id) is False  # finished
        assert a.cancel("H" * 22) is False  # unknown


async def test_cancel_a_task_whose_process_died(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    await make_db(db)
    now = time.time()
    execute(
        db,
        "INSERT INTO owners (id, host, pid, proc_started, expires_at) "
        "VALUES ('alive', 'another-host', 1, 0, ?)",
        now + 60,
    )
    for task_id, owner in (("I" * 22, "ghost"), ("J" * 22, "alive")):
        execute(
            db,
            "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
            "target, payload, options) VALUES (?, 'double', 'running', ?, ?, ?, 1, "
            "'durable_apps:double', '{\"n\": 1}', '{}')",
            task_id,
            now,
            owner,
            now,
        )
    rt = bgtasks.Runtime(store=url(db))
    await rt.start()  # the orphan is claimed and runs at start: cancel before that
    try:
        assert rt.get("J" * 22) is not None
        assert rt.cancel("J" * 22) is True  # flagged for its (live) owner
        await flush(rt)
        assert query(db, "SELECT status, cancel_requested FROM tasks WHERE id = ?", "J" * 22) == [
            ("running", 1)
        ]
    finally:
        await rt.shutdown()


async def test_a_caller_that_stops_waiting_does_not_stop_the_writer(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    async with bgtasks.Runtime(store=url(db)) as rt:
        store = rt.store
        assert isinstance(store, SQLiteStore)
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(conn: sqlite3.Connection) -> int:
            asyncio.run_coroutine_threadsafe(_set(gate), loop)
            time.sleep(0.1)  # the caller gives up meanwhile
            return 1

        waiter = asyncio.ensure_future(asyncio.wrap_future(store.submit(slow)))
        await asyncio.wait_for(gate.wait(), 5)
        waiter.cancel()  # cancels the concurrent future the writer will settle
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        # The writer thread lives on: the next write goes through.
        assert await asyncio.wait_for(asyncio.wrap_future(store.submit(lambda conn: 2)), 5) == 2


async def _set(event: asyncio.Event) -> None:
    event.set()
