"""The Store protocol, against every store: the same calls, each store's answers.

Each test runs on the SQLite store and on the memory store. Where the memory
store answers "nothing" by design (it keeps no records: the runtime's registry
answers for them), the test says so with ``durable``.
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import time
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bgtasks._task import ErrorInfo, Progress, StepRecord, TaskSnapshot
from bgtasks.stores import MemoryStore, Store
from bgtasks.stores.base import (
    MAX_LIMIT,
    JournalEntry,
    ListQuery,
    Page,
    decode_cursor,
    encode_cursor,
    page_of,
    stats_of,
)
from bgtasks.stores.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio

T = TypeVar("T")


async def done(fut: concurrent.futures.Future[T]) -> T:
    return await asyncio.wait_for(asyncio.wrap_future(fut), 10)


@pytest.fixture(params=["sqlite", "memory"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> collections.abc.AsyncIterator[Store]:
    s: Store = SQLiteStore(tmp_path / "t.db") if request.param == "sqlite" else MemoryStore()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def flush(store: Store) -> None:
    if isinstance(store, SQLiteStore):
        await store.flush()


def snap(task_id: str, created: float, **kw: Any) -> TaskSnapshot:
    kw.setdefault("name", "job")
    kw.setdefault("status", "succeeded")
    return TaskSnapshot(id=task_id, created_at=created, **kw)


def entry(task_id: str, *, key: str | None = None, **kw: Any) -> JournalEntry:
    kw.setdefault("name", "double")
    kw.setdefault("target", "durable_apps:double")
    kw.setdefault("payload", '{"n": 1}')
    return JournalEntry(id=task_id, created_at=time.time(), idempotency_key=key, **kw)


# ---------------------------------------------------------------------- values
def test_cursor_round_trip_and_bad_cursors() -> None:
    cursor = encode_cursor(1_700_000_000.123456, "abc")
    assert decode_cursor(cursor) == (1_700_000_000.123456, "abc")
    for bad in ("", "!!", "bm90IGpzb24", encode_cursor(1.0, "x")[:-2] + "zz"):
        with pytest.raises(ValueError, match=r"invalid cursor .* next_cursor of the page before"):
            decode_cursor(bad)
    with pytest.raises(ValueError, match="invalid cursor"):
        ListQuery(cursor="nope")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"limit": 0}, "limit must be from 1"),
        ({"limit": MAX_LIMIT + 1}, "limit must be from 1"),
        ({"limit": True}, "limit must be an int"),
        ({"statuses": ("done",)}, "unknown status 'done'"),
    ],
)
def test_list_query_refuses_bad_values(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ListQuery(**kw)


def test_snapshot_builds_the_record() -> None:
    step = StepRecord(name="fetch", status="succeeded", attempts=1)
    s = snap("a", 1.0, result=[1], progress=Progress(done=1), wake_at=2.0, steps=(step,))
    record = s.record()
    assert (record.result, record.steps, record.wake_at is not None) == ([1], [step], True)
    assert s.record(include_result=False).result is None
    assert record.model_dump(mode="json")["steps"][0]["name"] == "fetch"


# ---------------------------------------------------------------------- records
async def test_save_then_load(store: Store) -> None:
    step = StepRecord(name="fetch", status="failed", error=ErrorInfo(type="E", message="m"))
    s = snap(
        "a" * 22,
        time.time(),
        status="failed",
        result={"x": [1, 2]},
        error=ErrorInfo(type="ValueError", message="bad"),
        progress=Progress(done=1, total=2, message="half"),
        steps=(step,),
        wake_at=None,
        attempts=2,
    )
    store.save(s)
    await flush(store)
    loaded = store.load(s.id)
    if store.durable:
        assert loaded == s.record()
    else:
        assert loaded is None  # the runtime's registry holds it
    assert store.load("missing") is None


class _InMemory:
    """What a runtime over the memory store answers: its registry, listed."""

    def __init__(self, snapshots: list[TaskSnapshot]) -> None:
        self.snapshots = snapshots

    def list(self, query: ListQuery) -> Page:
        return page_of(self.snapshots, query)

    def stats(self) -> dict[str, dict[str, int]]:
        return stats_of(self.snapshots)


async def test_listing_newest_first_each_record_once(store: Store) -> None:
    now = time.time()
    statuses = ("succeeded", "failed", "running")
    saved = []
    for i in range(23):
        # Two records per creation time: the id breaks the tie.
        s = snap(f"t{i:02d}", now + i // 2, name=f"n{i % 2}", status=statuses[i % 3], result=i)
        store.save(s)
        saved.append(s)
    await flush(store)
    if not store.durable:
        assert store.list(ListQuery()) == Page(items=[], next_cursor=None)
        assert store.stats() == {"by_status": {}, "by_name": {}}
        store = _InMemory(saved)  # type: ignore[assignment]
    seen: list[str] = []
    cursor = None
    while True:
        page = store.list(ListQuery(limit=5, cursor=cursor))
        assert all(r.result is None for r in page.items)
        seen += [r.id for r in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    expected = sorted((f"t{i:02d}" for i in range(23)), key=lambda i: (int(i[1:]) // 2, i))
    assert seen == expected[::-1]

    def walk(**kw: Any) -> list[str]:
        out: list[str] = []
        cursor = None
        while True:
            page = store.list(ListQuery(limit=2, cursor=cursor, **kw))
            out += [r.id for r in page.items]
            if (cursor := page.next_cursor) is None:
                return out

    failed_or_running = walk(statuses=("failed", "running", "failed"))
    assert failed_or_running == [i for i in seen if int(i[1:]) % 3 != 0]
    assert walk(names=("n1",)) == [i for i in seen if int(i[1:]) % 2 == 1]
    both = walk(statuses=("succeeded",), names=("n0", "nobody"))
    assert both == [i for i in seen if int(i[1:]) % 6 == 0]
    assert store.stats() == {
        "by_status": {"succeeded": 8, "failed": 8, "running": 7},
        "by_name": {"n0": 12, "n1": 11},
    }


async def test_expire_forgets_finished_records_and_their_kept_steps(store: Store) -> None:
    now = time.time()
    store.save(snap("old", now, finished_at=now - 10))
    store.save(snap("open", now, status="running"))
    await done(store.keep_step("old", "a", "1"))
    store.expire(now - 5)
    await flush(store)
    assert store.load("old") is None
    assert await done(store.kept_steps("old")) == {}
    assert (store.load("open") is not None) is store.durable


# ---------------------------------------------------------------------- journal
async def test_idempotency_keys(store: Store) -> None:
    assert await done(store.journal(entry("first", key="k"))) is None
    holder = await done(store.journal(entry("second", key="k")))
    assert holder is not None and holder.id == "first"
    assert await done(store.journal(entry("other", key="k", name="another"))) is None
    store.forget("second")  # a loser forgets: the key stays with its holder
    again = await done(store.journal(entry("third", key="k")))
    assert again is not None and again.id == "first"
    if not store.durable:
        store.forget("first")  # the runtime no longer has it: the key is free
        assert await done(store.journal(entry("fourth", key="k"))) is None


async def test_kept_steps(store: Store) -> None:
    await asyncio.gather(*(done(store.keep_step("t", f"s{i}", str(i))) for i in range(50)))
    await done(store.keep_step("t", "s1", '"again"'))
    kept = await done(store.kept_steps("t"))
    if store.durable:
        assert kept == {**{f"s{i}": str(i) for i in range(50)}, "s1": '"again"'}
    else:
        assert kept == {}  # kept by the runtime, with the task


async def test_claim_release_park_and_cancel(store: Store, tmp_path: Path) -> None:
    if not store.durable:
        assert await done(store.claim(10)) == []
        await done(store.release(["x"]))
        await done(store.park("x", time.time()))
        assert store.request_cancel("x") is False
        assert await done(store.cancel_requests()) == []
        return
    other = SQLiteStore(tmp_path / "t.db")
    await other.open()
    try:
        ctx = {"traceparent": "00-abc-def-01"}
        await done(store.journal(entry("a", context=ctx, retries=2, limits={"wall_clock": 5})))
        await done(store.journal(entry("b")))
        await done(store.journal(entry("c", wake_at=time.time() + 3600)))  # delayed
        assert await done(other.claim(10)) == []  # store's lease holds
        # Released at shutdown: another process claims them; non-durable ids are ignored.
        await done(store.release(["a", "b", "c"]))
        store.save(snap("a", 0.0, status="cancelled"))  # dropped: not ours any more
        claimed = await done(other.claim(10))
        assert [c.entry.id for c in claimed] == ["a", "b"]  # c is not due yet
        first = claimed[0].entry
        assert (first.context, first.retries, first.limits) == (ctx, 2, {"wall_clock": 5})
        assert first.target == "durable_apps:double" and first.durable
        await flush(store)
        assert (other.load("a") or pytest.fail()).status == "pending"

        # Parked: pending with wake_at, owned by nobody, claimed once it is due.
        wake = time.time() + 0.2
        await done(other.park("b", wake))
        record = other.load("b")
        assert record is not None and record.status == "pending" and record.wake_at is not None
        assert await done(store.claim(10)) == []
        await asyncio.sleep(0.25)
        assert [c.entry.id for c in await done(store.claim(10))] == ["b"]

        # Cancel: b is store's (flagged for it); a parked task is cancelled at once.
        assert other.request_cancel("b") is True
        await flush(other)
        assert await done(store.cancel_requests()) == ["b"]
        await done(store.park("b", time.time() + 60))
        assert other.request_cancel("b") is True
        await flush(other)
        assert (other.load("b") or pytest.fail()).status == "cancelled"
        assert other.request_cancel("b") is False  # finished
        assert other.request_cancel("nobody") is False
    finally:
        await other.close()


def test_an_incomplete_store_is_refused_naming_what_it_lacks() -> None:
    from bgtasks.stores import open_store

    class Partial(MemoryStore):
        pass

    partial: Any = object.__new__(type("Partial", (), dict(vars(MemoryStore))))
    del type(partial).keep_step, type(partial).kept_steps
    with pytest.raises(TypeError, match="missing keep_step, kept_steps of the Store protocol"):
        open_store(partial)
    assert isinstance(open_store(Partial()), Partial)
    with pytest.raises(TypeError, match="must be 'memory'"):
        open_store(3)
