"""Push for one task in-process: notifications, long-poll, SSE frames, bounds, no leaks."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from werkzeug.test import Client

import bgtasks
from bgtasks import wsgi
from bgtasks._watch import (
    ANY,
    AsyncWaiter,
    Hub,
    Slots,
    ThreadWaiter,
    WatchConfig,
    event_stream,
    event_stream_sync,
    long_poll,
    long_poll_sync,
    parse_wait,
    sse_comment,
    sse_record,
)
from bgtasks.asgi import BackgroundMiddleware

pytestmark = pytest.mark.anyio
PREFIX = "/_bgtasks/tasks"
FAST = WatchConfig(coalesce=0.05, heartbeat=0.3, poll=0.1)


def frames(chunks: Iterable[bytes]) -> list[dict[str, Any]]:
    """The records in a list of SSE chunks (comments and the preamble skipped)."""
    found = []
    for chunk in chunks:
        text = chunk.decode()
        if text.startswith("event: record\n"):
            found.append(json.loads(text.split("data: ", 1)[1]))
    return found


# --------------------------------------------------------------------------- pieces
def test_parse_wait() -> None:
    assert parse_wait(["2.5"]) == 2.5
    assert parse_wait(["0"]) == 0.0
    assert parse_wait(["60"]) == 60.0
    for bad in (["61"], ["-1"], ["nan"], ["soon"], ["1", "2"]):
        message = parse_wait(bad)
        assert isinstance(message, str) and "wait" in message


def test_sse_framing() -> None:
    assert sse_record('{"a":1}') == b'event: record\ndata: {"a":1}\n\n'
    assert sse_comment() == b": keep-alive\n\n"


def test_watch_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_watchers must be >= 0"):
        WatchConfig(max_watchers=-1)
    with pytest.raises(TypeError, match="max_watchers must be an int"):
        WatchConfig(max_watchers=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="heartbeat must be a number of seconds > 0"):
        WatchConfig(heartbeat=0)


def test_slots_bound() -> None:
    slots = Slots(2)
    assert slots.try_take() and slots.try_take()
    assert not slots.try_take()
    slots.give_back()
    assert slots.try_take()


def test_hub_wakes_a_thread_and_forgets_it() -> None:
    hub = Hub()
    waiter = ThreadWaiter()
    assert not hub.active
    with hub.watching("t1", waiter):
        assert hub.active and hub.count() == 1
        threading.Timer(0.05, hub.notify, ("t1",)).start()
        assert waiter.wait(5.0)
        hub.notify("other")
        assert not waiter.wait(0.05)
    assert not hub.active and hub.count() == 0


async def test_hub_wakes_an_async_waiter_from_another_thread() -> None:
    hub = Hub()
    waiter = AsyncWaiter()
    with hub.watching(ANY, waiter):
        threading.Timer(0.05, hub.notify, ("any-task",)).start()
        started = time.monotonic()
        assert await waiter.wait(5.0)
        assert time.monotonic() - started < 4.0
        assert not await waiter.wait(0.05)
    assert hub.count() == 0


# --------------------------------------------------------------------------- with a runtime
async def steered(rt: bgtasks.Runtime) -> tuple[bgtasks.TaskHandle, asyncio.Queue[Any]]:
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    async def work() -> str:
        task = bgtasks.current_task()
        assert task is not None
        while True:
            what = await inbox.get()
            if what == "finish":
                return "done"
            if isinstance(what, list):  # a burst: many reports in one go
                for done in what:
                    task.report_progress(done, 100)
            else:
                task.report_progress(what, 100)

    handle = rt.wait_until(work(), name="steered")
    while handle.status == "pending":
        await asyncio.sleep(0.005)
    return handle, inbox


async def test_event_stream_sends_at_once_coalesces_and_ends_after_the_finish() -> None:
    async with bgtasks.Runtime(shutdown_grace=1) as rt:
        handle, inbox = await steered(rt)

        async def read() -> bgtasks.TaskRecord | None:
            return rt.get(handle.id)

        got: list[bytes] = []
        stream = event_stream(
            read,
            rt._hub,
            handle.id,
            local=lambda: True,
            include_result=True,
            config=FAST,
        )

        async def consume() -> None:
            async for chunk in stream:
                got.append(chunk)

        consumer = asyncio.ensure_future(consume())
        while not frames(got):
            await asyncio.sleep(0.01)
        inbox.put_nowait(list(range(1, 101)))  # 100 reports at once
        inbox.put_nowait("finish")
        await asyncio.wait_for(consumer, 5)
        records = frames(got)
        assert records[0]["status"] in ("pending", "running")
        assert records[-1]["status"] == "succeeded"
        assert records[-1]["result"] == "done"
        # The burst was coalesced: nowhere near one frame per report.
        assert len(records) <= 4
        assert rt._hub.count() == 0


async def test_event_stream_heartbeat_while_idle() -> None:
    async with bgtasks.Runtime(shutdown_grace=1) as rt:
        handle, inbox = await steered(rt)

        async def read() -> bgtasks.TaskRecord | None:
            return rt.get(handle.id)

        stream = event_stream(
            read, rt._hub, handle.id, local=lambda: True, include_result=False, config=FAST
        )
        chunks = [await stream.__anext__() for _ in range(3)]  # preamble, record, heartbeat
        assert chunks[0].startswith(b"retry:")
        assert chunks[2] == sse_comment()
        assert '"result"' not in chunks[1].decode()
        await stream.aclose()  # the client left
        assert rt._hub.count() == 0
        inbox.put_nowait("finish")


async def test_long_poll_answers_when_the_task_finishes_and_after_the_time() -> None:
    async with bgtasks.Runtime(shutdown_grace=1) as rt:
        handle, inbox = await steered(rt)

        async def read() -> bgtasks.TaskRecord | None:
            return rt.get(handle.id)

        started = time.monotonic()
        record = await long_poll(read, rt._hub, handle.id, 0.2, local=lambda: True, config=FAST)
        assert record is not None and record.status == "running"
        assert 0.15 < time.monotonic() - started < 3
        asyncio.get_running_loop().call_later(0.1, inbox.put_nowait, "finish")
        started = time.monotonic()
        record = await long_poll(read, rt._hub, handle.id, 30, local=lambda: True, config=FAST)
        assert record is not None and record.status == "succeeded"
        assert time.monotonic() - started < 5
        assert rt._hub.count() == 0


async def test_a_task_of_another_process_is_read_again_every_poll() -> None:
    """No notification comes for it: the stream re-reads at ``poll``."""
    hub = Hub()
    state = {"status": "running"}
    created = bgtasks.TaskRecord(id="x" * 24, name="remote", status="running", created_at=0)

    async def read() -> bgtasks.TaskRecord | None:
        return created.model_copy(update={"status": state["status"]})

    asyncio.get_running_loop().call_later(0.2, state.update, {"status": "failed"})
    chunks = [
        c
        async for c in event_stream(
            read, hub, "x" * 24, local=lambda: False, include_result=True, config=FAST
        )
    ]
    assert [r["status"] for r in frames(chunks)] == ["running", "failed"]


def test_thread_side_stream_and_long_poll() -> None:
    """The WSGI flavour: a server thread waits, the runtime runs on its loop thread."""
    mw = wsgi.BackgroundMiddleware(lambda e, s: [])
    try:
        rt = mw._host.ensure_started()
        release = threading.Event()

        def work() -> str:
            task = bgtasks.current_task()
            assert task is not None
            for i in range(50):
                task.report_progress(i, 50)
            release.wait(10)
            return "ok"

        handle = rt.wait_until(work, name="sync")

        def read() -> bgtasks.TaskRecord | None:
            return rt.get(handle.id)

        record = long_poll_sync(read, rt._hub, handle.id, 0.1, local=lambda: True, config=FAST)
        assert record is not None and record.status == "running"
        threading.Timer(0.2, release.set).start()
        chunks = list(
            event_stream_sync(
                read, rt._hub, handle.id, local=lambda: True, include_result=True, config=FAST
            )
        )
        records = frames(chunks)
        assert records[-1]["status"] == "succeeded"
        assert len(records) <= 5
        assert rt._hub.count() == 0
    finally:
        assert mw.stop(10)


# --------------------------------------------------------------------------- over HTTP, in-process
@pytest.fixture
async def asgi_client() -> AsyncIterator[tuple[httpx.AsyncClient, BackgroundMiddleware]]:
    from asgi_lifespan import LifespanManager

    mw = BackgroundMiddleware(Starlette(), watch=WatchConfig(max_watchers=1, poll=0.1))
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, mw


async def test_asgi_long_poll_over_http(
    asgi_client: tuple[httpx.AsyncClient, BackgroundMiddleware],
) -> None:
    client, mw = asgi_client
    rt = mw.runtime
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 7

    handle = rt.wait_until(work(), name="gated")
    asyncio.get_running_loop().call_later(0.1, gate.set)
    r = await client.get(f"{PREFIX}/{handle.id}", params={"wait": "10"})
    assert r.status_code == 200
    assert r.json()["status"] == "succeeded" and r.json()["result"] == 7
    assert r.headers["cache-control"] == "no-store"
    # Wrong input and unknown ids.
    r = await client.get(f"{PREFIX}/{handle.id}", params={"nowait": "1"})  # not ours
    assert r.status_code == 200 and r.json()["id"] == handle.id
    r = await client.get(f"{PREFIX}/{handle.id}", params={"wait": "61"})
    assert r.status_code == 400 and "wait must be" in r.json()["detail"]
    assert (await client.get(f"{PREFIX}/{'a' * 24}", params={"wait": "1"})).status_code == 404
    assert (await client.get(f"{PREFIX}/nope/events")).status_code == 404
    assert (await client.delete(f"{PREFIX}/{handle.id}/events")).status_code == 405
    assert rt._hub.count() == 0


async def test_asgi_long_polls_past_the_bound_get_503(
    asgi_client: tuple[httpx.AsyncClient, BackgroundMiddleware],
) -> None:
    client, mw = asgi_client
    gate = asyncio.Event()

    async def work() -> None:
        await gate.wait()

    handle = mw.runtime.wait_until(work(), name="gated")
    first = asyncio.ensure_future(client.get(f"{PREFIX}/{handle.id}", params={"wait": "10"}))
    while mw.watch.slots.taken == 0:
        await asyncio.sleep(0.01)
    second = await client.get(f"{PREFIX}/{handle.id}", params={"wait": "10"})
    assert second.status_code == 503
    assert second.headers["retry-after"] == "5"
    assert "max_watchers=1" in second.json()["detail"]
    gate.set()
    assert (await first).json()["status"] == "succeeded"
    assert mw.watch.slots.taken == 0 and mw.runtime._hub.count() == 0


async def test_asgi_push_follows_authorize(asgi_client: Any) -> None:
    seen: list[str] = []

    async def authorize(request: Any, record: bgtasks.TaskRecord, action: str) -> bool:
        seen.append(action)
        return record.name != "secret"

    from asgi_lifespan import LifespanManager

    mw = BackgroundMiddleware(Starlette(), authorize=authorize)
    async with LifespanManager(mw) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            rt = mw.runtime

            async def nothing() -> None:
                pass

            handle = rt.wait_until(nothing(), name="secret")
            await handle.wait(5)
            r = await client.get(f"{PREFIX}/{handle.id}", params={"wait": "1"})
            assert r.status_code == 404
            r = await client.get(f"{PREFIX}/{handle.id}/events")
            assert r.status_code == 404
            assert seen == ["read", "read"]


def test_wsgi_long_poll_and_events_over_http() -> None:
    mw = wsgi.BackgroundMiddleware(lambda e, s: [], watch=WatchConfig(max_watchers=1, poll=0.1))
    try:
        rt = mw._host.ensure_started()
        release = threading.Event()
        handle = rt.wait_until(release.wait, 10, name="gated")
        client = Client(mw)
        r = client.get(f"{PREFIX}/{handle.id}?wait=0.1")
        assert r.status_code == 200 and r.get_json()["status"] == "running"
        threading.Timer(0.2, release.set).start()
        r = client.get(f"{PREFIX}/{handle.id}/events")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        statuses = [f["status"] for f in frames(r.response)]  # type: ignore[arg-type]
        assert statuses[-1] == "succeeded"
        r.close()
        assert mw.watch.slots.taken == 0 and rt._hub.count() == 0
        assert client.get(f"{PREFIX}/{handle.id}?wait=x").status_code == 400
    finally:
        assert mw.stop(10)


def test_wsgi_stream_past_the_bound_is_503_and_a_closed_unread_body_gives_its_slot_back() -> None:
    mw = wsgi.BackgroundMiddleware(lambda e, s: [], watch=WatchConfig(max_watchers=1))
    try:
        rt = mw._host.ensure_started()
        release = threading.Event()
        handle = rt.wait_until(release.wait, 10, name="gated")
        client = Client(mw)
        held = client.get(f"{PREFIX}/{handle.id}/events", buffered=False)
        assert held.status_code == 200
        refused = client.get(f"{PREFIX}/{handle.id}/events")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        held.close()  # the server closes the body without reading it
        assert mw.watch.slots.taken == 0
        release.set()
    finally:
        assert mw.stop(10)


async def test_asgi_push_without_a_lifespan_runtime_on_its_own_thread() -> None:
    """No lifespan: the runtime runs on its own loop thread; waiters on the server's
    loop are woken across threads."""
    import anyio.to_thread

    mw = BackgroundMiddleware(Starlette(), watch=WatchConfig(coalesce=0.05))
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/")  # starts the runtime on its thread
        release = threading.Event()

        def work() -> str:
            task = bgtasks.current_task()
            assert task is not None
            task.report_progress(1, 2)
            release.wait(10)
            return "done"

        handle = await anyio.to_thread.run_sync(lambda: mw.runtime.wait_until(work, name="t"))
        threading.Timer(0.2, release.set).start()
        r = await client.get(f"{PREFIX}/{handle.id}/events")
        statuses = [
            f["status"] for f in frames([c.encode() + b"\n\n" for c in r.text.split("\n\n")])
        ]
        assert statuses[-1] == "succeeded"
        r = await client.get(f"{PREFIX}/{handle.id}", params={"wait": "5"})
        assert r.json()["result"] == "done"
        assert mw.runtime._hub.count() == 0
    assert mw.stop(10)


async def test_a_stream_ends_after_max_stream_and_the_client_reconnects() -> None:
    async with bgtasks.Runtime(shutdown_grace=1) as rt:
        handle, inbox = await steered(rt)

        async def read() -> bgtasks.TaskRecord | None:
            return rt.get(handle.id)

        config = WatchConfig(max_stream=0.3, heartbeat=0.1)
        started = time.monotonic()
        chunks = [
            c
            async for c in event_stream(
                read, rt._hub, handle.id, local=lambda: True, include_result=True, config=config
            )
        ]
        assert 0.25 < time.monotonic() - started < 3
        assert frames(chunks)[0]["status"] == "running"  # ended while still running
        assert rt._hub.count() == 0
        inbox.put_nowait("finish")


def test_a_stopping_server_ends_thread_streams_and_long_polls_early() -> None:
    hub = Hub()
    record = bgtasks.TaskRecord(id="y" * 24, name="t", status="running", created_at=0)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    chunks = list(
        event_stream_sync(
            lambda: record,
            hub,
            record.id,
            local=lambda: True,
            include_result=True,
            config=WatchConfig(),
            stopping=stop.is_set,
        )
    )
    assert time.monotonic() - started < 3 and len(frames(chunks)) == 1
    started = time.monotonic()
    found = long_poll_sync(
        lambda: record,
        hub,
        record.id,
        30,
        local=lambda: True,
        config=WatchConfig(),
        stopping=stop.is_set,
    )
    assert found is record and time.monotonic() - started < 1
    assert hub.count() == 0
