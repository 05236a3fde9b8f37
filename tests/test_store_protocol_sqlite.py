"""The SQLite store under the protocol: an old file migrated, a bad journal row,
the file removed under it, bounded readers, the listing plan; and replay
driven through the protocol alone, with a store that is not SQLite."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import bgtasks
from bgtasks._task import TaskSnapshot
from bgtasks.stores import ClaimedTask, JournalEntry, ListQuery, MemoryStore
from bgtasks.stores.sqlite import SCHEMA_VERSION, SQLiteStore
from bgtasks.stores.sqlite.schema import _V1

pytestmark = pytest.mark.anyio


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


async def test_a_version_1_file_is_migrated_and_its_rows_still_work(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executescript(_V1)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO tasks (id, name, status, created_at, finished_at, attempts, result, "
            "owner, updated_at) VALUES ('done', 'job', 'succeeded', ?, ?, 1, '7', 'gone', ?)",
            (now - 1, now, now),
        )
        conn.execute(
            "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
            "target, payload, options) VALUES ('queued', 'double', 'pending', ?, NULL, ?, 1, "
            "'durable_apps:double', '{\"n\": 21}', '{\"retries\": 0}')",
            (now, now),
        )
        conn.commit()
    async with bgtasks.Runtime(store=f"sqlite:///{db}") as rt:
        assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        record = rt.get("done")
        assert record is not None and (record.result, record.steps, record.wake_at) == (7, [], None)
        h = rt.handle("queued")  # the journaled row of the old version runs
        assert h is not None and (await h.wait(5)).result == 42
        page = rt.store.list(ListQuery(limit=1))
        assert [r.id for r in page.items] == ["queued"] and page.next_cursor is not None
    names = {row[1] for row in query(db, "PRAGMA index_list(tasks)")}
    assert {"tasks_newest", "tasks_status_newest", "tasks_name_newest", "tasks_open_owner"} <= names
    assert "tasks_open" not in names  # replaced by tasks_open_owner


async def test_a_malformed_journal_row_fails_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "t.db"
    store = SQLiteStore(db)
    await store.open()
    await store.close()
    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        for task_id, options in (("bad", "{not json"), ("good", "{}")):
            conn.execute(
                "INSERT INTO tasks (id, name, status, created_at, owner, updated_at, durable, "
                "target, payload, options) VALUES (?, 'double', 'pending', ?, NULL, ?, 1, "
                "'durable_apps:double', '{\"n\": 2}', ?)",
                (task_id, now, now, options),
            )
        conn.commit()
    with caplog.at_level(logging.ERROR, "bgtasks"):
        async with bgtasks.Runtime(store=f"sqlite:///{db}") as rt:
            h = rt.handle("good")
            assert h is not None and (await h.wait(5)).result == 4
            bad = rt.get("bad")
    assert bad is not None and bad.status == "failed" and bad.error is not None
    assert "cannot be run again: its options are not JSON" in bad.error.message
    assert "task bad (double)" in caplog.text


async def test_a_removed_file_refuses_durable_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "t.db"
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.flush()
        db.unlink()
        with caplog.at_level(logging.ERROR, "bgtasks"):
            entry = JournalEntry(id="x", name="job", created_at=time.time(), target="m:f")
            with pytest.raises(bgtasks.StoreError, match="was removed or replaced"):
                await asyncio.wrap_future(store.journal(entry))
            with pytest.raises(bgtasks.StoreError, match="was removed or replaced"):
                store.load("x")
        assert caplog.text.count("was removed or replaced") == 1  # told once
        assert store.broken is not None
    finally:
        await store.close()


async def test_readers_are_bounded_whatever_the_threads(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    await store.open()
    try:
        store.save(TaskSnapshot(id="a", name="job", status="running", created_at=time.time()))
        await store.flush()
        barrier = threading.Barrier(32)

        def read() -> str | None:
            barrier.wait(5)
            record = store.load("a")
            return None if record is None else record.status

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda _: read(), range(32)))
        assert results == ["running"] * 32
        readers = store._readers
        assert readers is not None and len(readers._all) <= SQLiteStore.max_readers
    finally:
        await store.close()


async def test_listing_reads_an_index_not_the_table(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    await store.open()
    await store.close()
    plans = []
    with contextlib.closing(sqlite3.connect(tmp_path / "t.db")) as conn:
        keyset = "created_at <= 5 AND (created_at < 5 OR id < 'x')"
        for where in (
            "",
            f"WHERE {keyset}",
            f"WHERE status = 'failed' AND {keyset}",
            "WHERE name = 'job'",
        ):
            rows = conn.execute(
                f"EXPLAIN QUERY PLAN SELECT * FROM tasks {where} "
                "ORDER BY created_at DESC, id DESC LIMIT 51"
            ).fetchall()
            plans.append(" ".join(str(row[-1]) for row in rows))
    for plan in plans:
        assert "INDEX tasks_" in plan and "TEMP B-TREE" not in plan, plan


class _OneClaimStore(MemoryStore):
    """A durable store that is not SQLite: replay runs through the protocol alone."""

    durable = True
    poll = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.claims: list[ClaimedTask] = [
            ClaimedTask(
                entry=JournalEntry(
                    id="Z" * 22,
                    name="double",
                    created_at=time.time(),
                    target="durable_apps:double",
                    payload='{"n": 5}',
                ),
                attempts=1,
                progress='{"done": 1}',
            )
        ]
        self.cancels: list[str] = []
        self.saved: list[TaskSnapshot] = []

    def save(self, snapshot: TaskSnapshot) -> None:
        self.saved.append(snapshot)

    def claim(self, limit: int) -> concurrent.futures.Future[list[ClaimedTask]]:
        fut: concurrent.futures.Future[list[ClaimedTask]] = concurrent.futures.Future()
        claims, self.claims = self.claims[:limit], self.claims[limit:]
        fut.set_result(claims)
        return fut

    def cancel_requests(self) -> concurrent.futures.Future[list[str]]:
        fut: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
        fut.set_result(self.cancels)
        return fut


async def test_replay_and_cancel_polling_through_the_protocol() -> None:
    import durable_apps

    store = _OneClaimStore()
    async with bgtasks.Runtime(store=store) as rt:
        h = rt.handle("Z" * 22)
        assert h is not None
        record = await h.wait(5)
        assert (record.result, record.attempts) == (10, 2)
        assert store.saved[-1].status == "succeeded"
        # A cancel request for a task of ours is acted on at the next look.
        token = bgtasks._context.active_runtime.set(rt)
        try:
            forever = await durable_apps.forever.submit_async(1)
        finally:
            bgtasks._context.active_runtime.reset(token)
        store.cancels = [forever.id, "unknown"]
        assert (await forever.wait(5)).status == "cancelled"


class _BrokenClaims(MemoryStore):
    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def claim(self, limit: int) -> concurrent.futures.Future[list[ClaimedTask]]:
        fut: concurrent.futures.Future[list[ClaimedTask]] = concurrent.futures.Future()
        fut.set_exception(bgtasks.StoreError("the first look failed"))
        return fut

    async def close(self) -> None:
        self.closed = True


async def test_a_start_whose_first_replay_fails_leaves_nothing_running() -> None:
    store = _BrokenClaims()
    rt = bgtasks.Runtime(store=store)
    with pytest.raises(bgtasks.StoreError, match="the first look failed"):
        await rt.start()
    assert store.closed and not rt.started
    assert all(task.done() or task.cancelled() for task in rt._side_tasks)
    await rt.shutdown()  # nothing to do, no error


async def test_a_row_with_unreadable_columns_still_reads(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.flush()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(
                "INSERT INTO tasks (id, name, status, created_at, updated_at, error, result, "
                "progress, steps) VALUES ('odd', 'job', 'failed', 1, 1, '{oops', '[1,', "
                "'nope', '{}')"
            )
            conn.commit()
        record = store.load("odd")
        assert record is not None
        assert (record.result, record.progress, record.steps) == (None, None, [])
        assert record.error is not None and "cannot be read" in record.error.message
        assert [r.id for r in store.list(ListQuery()).items] == ["odd"]
    finally:
        await store.close()
