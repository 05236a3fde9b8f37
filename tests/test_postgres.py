"""The PostgreSQL store (procrastinate as the engine), against a real server.

Each test gets a fresh database on one server started for the module; hosts
are Runtime objects (in this process) or ``bgtasks worker`` processes on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pgserver import PgServer, find_bin_dir
from serverutil import Server, free_port, wait_for

import bgtasks
from bgtasks._http import DEFAULT_PREFIX as PREFIX
from bgtasks.asgi import BackgroundMiddleware
from bgtasks.stores import ListQuery

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        find_bin_dir() is None,
        reason="no PostgreSQL binaries (initdb, pg_ctl) here: apt-get install postgresql",
    ),
]

psycopg = pytest.importorskip("psycopg", reason="the postgres extra: pip install bgtasks[postgres]")
import pg_apps  # noqa: E402 - needs the postgres extra, checked above

TESTS = Path(__file__).resolve().parent
_db_names = itertools.count(1)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh database for one test, with the tables made by ``bgtasks migrate``."""
    url = pg_server.create_database(f"bgtasks_test_{next(_db_names)}")
    made = asyncio.run(pg_apps.store(url).migrate())
    assert made == ["procrastinate", "bgtasks_tasks"]
    return url


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[no-any-return]


def status_of(url: str, task_id: str) -> str | None:
    rows = query(url, "SELECT status FROM bgtasks_tasks WHERE id = %s", task_id)
    return rows[0][0] if rows else None


def web(url: str, **options: float) -> bgtasks.Runtime:
    """A web host that only enqueues."""
    return bgtasks.Runtime(store=pg_apps.store(url, **options), consume=False, shutdown_grace=1)


def consumer(url: str) -> bgtasks.Runtime:
    return bgtasks.Runtime(store=pg_apps.store(url), shutdown_grace=1)


# ---------------------------------------------------------------------- in this process
@pytest.mark.anyio
async def test_migrate_is_idempotent_and_the_store_needs_it(pg_server: PgServer) -> None:
    url = pg_server.create_database(f"bgtasks_test_{next(_db_names)}")
    with pytest.raises(bgtasks.StoreError, match="bgtasks migrate MODULE:RUNTIME"):
        async with web(url):
            pass
    assert await pg_apps.store(url).migrate() == ["procrastinate", "bgtasks_tasks"]
    assert await pg_apps.store(url).migrate() == []
    assert isinstance(bgtasks.Runtime(store=url).store, pg_apps.PostgresStore)


@pytest.mark.anyio
async def test_a_durable_call_commits_its_record_and_its_job_together(pg_url: str) -> None:
    async with web(pg_url) as rt:
        handle = await pg_apps.add.submit_async(2, 3)
        # Committed before the call returned: another connection sees both.
        rows = query(
            pg_url,
            "SELECT t.status, t.target, t.payload, j.status, j.args->>'task_id' "
            "FROM bgtasks_tasks t JOIN procrastinate_jobs j ON j.id = t.job_id WHERE t.id = %s",
            handle.id,
        )
        assert rows == [("pending", "pg_apps:add", '{"a":2,"b":3}', "todo", handle.id)]
        # An enqueue-only host does not run it; another host's runtime does.
        assert rt.handle(handle.id) is None
        async with consumer(pg_url) as other:
            record = await handle.wait(10)
            assert record.status == "succeeded" and record.result == 5
            assert record.attempts == 1
            assert other.get(handle.id) == record
        # Any host answers for any task.
        fresh = rt.get(handle.id)
        assert fresh is not None and fresh.status == "succeeded" and fresh.result == 5


@pytest.mark.anyio
async def test_cancel_from_another_host(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGTASKS_TEST_MARKS", str(tmp_path))
    async with web(pg_url) as front, consumer(pg_url) as back:
        queued_elsewhere = await pg_apps.hold.submit_async("queued", 5)
        running = await pg_apps.hold.submit_async("running", 5)
        await asyncio.to_thread(
            wait_for, lambda: (tmp_path / "running").exists(), 10, "the task to start"
        )
        # Running on `back`: the abort reaches its worker, which cancels the task.
        assert front.cancel(running.id) is True, front.get(running.id)
        record = await running.wait(10)
        assert record.status == "cancelled", record
        local = back.get(running.id)
        assert local is not None and local.status == "cancelled", local
        # Finished: nothing to cancel.
        assert front.cancel(running.id) is False, front.get(running.id)
        await asyncio.to_thread(
            wait_for, lambda: (tmp_path / "queued").exists(), 10, "the other task to start"
        )
        assert front.cancel(queued_elsewhere.id) is True, front.get(queued_elsewhere.id)
        record = await queued_elsewhere.wait(10)
        assert record.status == "cancelled", record
    # A job still in the queue is cancelled at once, without any worker.
    async with web(pg_url) as front:
        queued = await pg_apps.add.submit_async(1, 1)
        assert front.cancel(queued.id) is True, front.get(queued.id)
        assert status_of(pg_url, queued.id) == "cancelled", front.get(queued.id)
        jobs = query(pg_url, "SELECT j.status FROM procrastinate_jobs j "
                     "JOIN bgtasks_tasks t ON t.job_id = j.id WHERE t.id = %s", queued.id)
        assert jobs == [("cancelled",)]


@pytest.mark.anyio
async def test_limits_and_hooks_apply_on_the_host_that_runs_the_task(pg_url: str) -> None:
    async with web(pg_url), consumer(pg_url) as back:
        failures: list[bgtasks.UnhandledRejectionEvent] = []
        back.on("unhandledrejection", failures.append)
        handle = await pg_apps.too_slow.submit_async()
        record = await handle.wait(10)
        assert record.status == "failed"
        assert record.error is not None and record.error.type == "WallClockLimitExceeded"
        assert [e.task.id for e in failures] == [handle.id]


@pytest.mark.anyio
async def test_a_task_that_is_not_durable_is_read_and_cancelled_from_another_host(
    pg_url: str,
) -> None:
    async with web(pg_url) as there, web(pg_url) as here:  # `here` is the active one
        handle = await pg_apps.idle.submit_async()
        assert here.handle(handle.id) is not None  # runs where it was called

        def running_there() -> bool:
            record = there.get(handle.id)
            return record is not None and record.status == "running"

        await asyncio.to_thread(wait_for, running_there, 10, "its record in the shared table")
        page = await asyncio.to_thread(there.store.list, ListQuery(statuses=("running",)))
        assert [r.id for r in page.items] == [handle.id]
        stats = await asyncio.to_thread(there.store.stats)
        assert stats["by_status"] == {"running": 1}
        assert await asyncio.to_thread(there.cancel, handle.id) is True
        assert (await handle.wait(10)).status == "cancelled"


@pytest.mark.anyio
async def test_a_parked_task_wakes_on_a_consuming_host(pg_url: str) -> None:
    async with web(pg_url) as front, consumer(pg_url):
        handle = await pg_apps.nap.submit_async(1.0)

        def parked() -> bool:
            record = front.get(handle.id)
            return record is not None and record.wake_at is not None

        await asyncio.to_thread(wait_for, parked, 10, "the task to park")
        assert status_of(pg_url, handle.id) == "pending"
        record = await handle.wait(15)
        assert record.status == "succeeded" and record.result == "woke", record
        assert [(s.name, s.status) for s in record.steps] == [("nap", "succeeded")]


@pytest.mark.anyio
async def test_kept_steps_are_shared_and_expire_with_their_task(pg_url: str) -> None:
    async with web(pg_url) as one, web(pg_url) as two:
        handle = await pg_apps.add.submit_async(1, 2)
        kept = one.store.keep_step(handle.id, "fetch", '{"rows": 3}')
        await asyncio.wrap_future(kept)
        await asyncio.wrap_future(one.store.keep_step(handle.id, "fetch", '{"rows": 4}'))
        steps = await asyncio.wrap_future(two.store.kept_steps(handle.id))
        assert steps == {"fetch": '{"rows": 4}'}
        assert await asyncio.wrap_future(two.store.kept_steps("unknown")) == {}
        assert one.cancel(handle.id) is True  # finished (cancelled while queued)
        one.store.expire(time.time() + 1)

        def gone() -> bool:
            return query(pg_url, "SELECT count(*) FROM bgtasks_steps") == [(0,)]

        await asyncio.to_thread(wait_for, gone, 10, "the expired task's steps to go")
        assert two.get(handle.id) is None


@pytest.mark.anyio
async def test_one_idempotency_key_from_two_hosts_at_once_gives_one_task(pg_url: str) -> None:
    async with web(pg_url) as one, web(pg_url) as two:
        barrier = threading.Barrier(8)

        def call(rt: bgtasks.Runtime, n: int) -> str:
            barrier.wait(10)
            with _active(rt):
                return pg_apps.add.using(idempotency_key="order-17")(n, n).id

        hosts = [one, two] * 4
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
            ids = await asyncio.gather(
                *(loop.run_in_executor(pool, call, rt, n) for n, rt in enumerate(hosts))
            )
        assert len(set(ids)) == 1
        assert query(pg_url, "SELECT count(*) FROM bgtasks_tasks") == [(1,)]
        assert query(pg_url, "SELECT count(*) FROM procrastinate_jobs") == [(1,)]


class _active:
    """Make ``rt`` the active runtime in this thread (as an adapter does per request)."""

    def __init__(self, rt: bgtasks.Runtime) -> None:
        self.rt = rt

    def __enter__(self) -> None:
        from bgtasks import _context

        self.token = _context.active_runtime.set(self.rt)

    def __exit__(self, *exc_info: object) -> None:
        from bgtasks import _context

        _context.active_runtime.reset(self.token)


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of its own, for a test that stops it."""
    with PgServer() as server:
        yield server


@pytest.fixture
async def client_of(own_server: PgServer) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    url = own_server.create_database("down")
    await pg_apps.store(url).migrate()
    rt = web(url, journal_timeout=1.0, connect_timeout=1.0)
    app = FastAPI()
    app.add_middleware(BackgroundMiddleware, runtime=rt)

    @app.post("/add")
    async def enqueue(a: int) -> dict[str, str]:
        handle = await pg_apps.add.submit_async(a, a)
        return {"id": handle.id}

    async with (
        LifespanManager(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client,
    ):
        yield client, url


@pytest.mark.anyio
async def test_postgres_down_refuses_durable_calls_with_503_and_writes_nothing(
    own_server: PgServer, client_of: tuple[httpx.AsyncClient, str]
) -> None:
    client, url = client_of
    ok = await client.post("/add", params={"a": 1})
    assert ok.status_code == 200, ok.text
    task_id = ok.json()["id"]
    assert (await client.get(f"{PREFIX}/{task_id}")).status_code == 200
    await asyncio.to_thread(own_server.pause)
    try:
        refused = await client.post("/add", params={"a": 2})
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "could not be journaled" in refused.json()["detail"]
        status = await client.get(f"{PREFIX}/{task_id}")
        assert status.status_code == 503, status.text
        assert status.headers["retry-after"] == "1"
    finally:
        await asyncio.to_thread(own_server.resume)
    # Nothing half-written: one record, one job, both from the accepted call.
    assert query(url, "SELECT count(*) FROM bgtasks_tasks") == [(1,)]
    assert query(url, "SELECT count(*) FROM procrastinate_jobs") == [(1,)]

    # Service resumes with the database, once the pool has reconnected (it backs
    # off between attempts while the server is away: a few seconds at most here).
    for _ in range(150):
        again = await client.post("/add", params={"a": 3})
        if again.status_code == 200:
            break
        assert again.status_code == 503, again.text
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("durable calls were still refused 15s after PostgreSQL returned")
    assert (await client.get(f"{PREFIX}/{task_id}")).status_code == 200


# ---------------------------------------------------------------------- worker processes
class Worker:
    """``bgtasks worker pg_apps:worker`` in a process of its own."""

    def __init__(self, url: str, marks: Path, grace: float = 1.0) -> None:
        env = dict(os.environ)
        env.update(
            BGTASKS_TEST_PG=url,
            BGTASKS_TEST_MARKS=str(marks),
            BGTASKS_TEST_GRACE=str(grace),
            PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
        )
        self.log = marks / f"worker-{id(self)}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bgtasks", "worker", "pg_apps:worker", "--concurrency", "2"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def workers_registered(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM procrastinate_workers")[0][0])


def runs(marks: Path, mark: str) -> list[str]:
    path = marks / mark
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.anyio
async def test_worker_sigterm_puts_its_unfinished_durable_task_back(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGTASKS_TEST_MARKS", str(tmp_path))
    first = Worker(pg_url, tmp_path, grace=0.5)
    second: Worker | None = None
    try:
        async with web(pg_url):
            handle = await pg_apps.stepped.submit_async("t")  # its first run never ends
            await asyncio.to_thread(
                wait_for, lambda: len(runs(tmp_path, "t")) == 2, 20, "the first worker's run"
            )
            first.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(first.proc.wait, 15)
            assert code == 0, first.output()
            # Back in the queue, not cancelled: pending, its job todo again.
            assert status_of(pg_url, handle.id) == "pending"
            jobs = query(pg_url, "SELECT status FROM procrastinate_jobs")
            assert jobs == [("todo",)], first.output()
            second = Worker(pg_url, tmp_path)
            record = await handle.wait(20)
            assert record.status == "succeeded", second.output()
            assert record.result == 2 and record.attempts == 2
            # The kept step was not run again; the unfinished one was, elsewhere.
            lines = [line.split() for line in runs(tmp_path, "t")]
            assert [what for what, _ in lines] == ["prepare", "work", "work"]
            assert lines[1][1] != lines[2][1]
            assert [s.name for s in record.steps] == ["prepare", "work"]
    finally:
        first.close()
        if second is not None:
            second.close()


@pytest.mark.anyio
async def test_worker_killed_runs_again_elsewhere_then_fails_after_max_crashes(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGTASKS_TEST_MARKS", str(tmp_path))
    procs = [Worker(pg_url, tmp_path), Worker(pg_url, tmp_path)]

    def kill_the_runner(run: int) -> None:
        wait_for(lambda: len(runs(tmp_path, "k")) == run, 20, f"run {run} of the task")
        pid = int(runs(tmp_path, "k")[-1])
        (runner,) = [p for p in procs if p.proc.pid == pid]
        runner.proc.kill()  # kill -9 while it runs the task
        runner.proc.wait(10)

    try:
        await asyncio.to_thread(
            wait_for, lambda: workers_registered(pg_url) == 2, 20, "two workers"
        )
        async with web(pg_url):
            handle = await pg_apps.hold.submit_async("k", 99)  # every run hangs
            await asyncio.to_thread(kill_the_runner, 1)
            procs.append(Worker(pg_url, tmp_path))  # two live workers again
            # The dead worker stops beating: its job runs again on another one.
            await asyncio.to_thread(kill_the_runner, 2)
            record = await handle.wait(20)
            assert record.status == "failed"
            assert record.error is not None and record.error.type == "WorkerCrashed"
            assert "died 2 times" in record.error.message
            assert "max_crashes=1" in record.error.message
            assert len(runs(tmp_path, "k")) == 2
    finally:
        for p in procs:
            p.close()


def test_the_docs_example_runs(pg_server: PgServer, tmp_path: Path) -> None:
    page = (TESTS.parent / "docs" / "postgres.md").read_text()
    match = re.search(r"```python\n(# postgres-example\n.*?)```", page, re.S)
    assert match is not None, "docs/postgres.md lost its runnable example"
    script = tmp_path / "tasks.py"
    script.write_text(match.group(1))
    url = pg_server.create_database(f"bgtasks_test_{next(_db_names)}")
    proc = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=45,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "succeeded image 7 at 640px 1"


@pytest.mark.server
def test_two_uvicorn_hosts_and_a_worker_share_tasks(pg_url: str, tmp_path: Path) -> None:
    env = {"BGTASKS_TEST_PG": pg_url, "BGTASKS_TEST_MARKS": str(tmp_path)}

    def host() -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "uvicorn", "pg_apps:app", "--port", str(port)]
        return Server([*argv, "--log-level", "warning"], port=port, env=env)

    worker = Worker(pg_url, tmp_path)
    try:
        with host() as a, host() as b:
            # One key sent to both hosts at once: one task.
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                replies = list(
                    pool.map(
                        lambda srv: httpx.post(
                            srv.url + "/hold",
                            params={"mark": "u", "hang_runs": 5},
                            headers={"Idempotency-Key": "same"},
                            timeout=10,
                        ),
                        [a, b, a, b],
                    )
                )
            assert [r.status_code for r in replies] == [202] * 4, [r.text for r in replies]
            (task_id,) = {r.json()["id"] for r in replies}
            status_path = f"{PREFIX}/{task_id}"
            # Run by the worker, seen from either host.
            wait_for(lambda: runs(tmp_path, "u") != [], 20, "the worker to start the task")
            seen = httpx.get(b.url + status_path, timeout=5).json()
            assert seen["status"] == "running" and seen["attempts"] == 1
            # DELETE on one host cancels it on the worker; the other host sees it.
            assert httpx.delete(a.url + status_path, timeout=5).status_code == 202
            wait_for(
                lambda: httpx.get(b.url + status_path, timeout=5).json()["status"]
                == "cancelled",
                10,
                "the cancel to reach the worker",
            )
    finally:
        worker.close()
    assert len(runs(tmp_path, "u")) == 1


def test_the_migrate_command(pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.create_database(f"bgtasks_test_{next(_db_names)}")
    env = {
        **os.environ,
        "BGTASKS_TEST_PG": url,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }

    def bgtasks_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bgtasks", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )

    first = bgtasks_cli("migrate", "pg_apps:worker")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "bgtasks: created procrastinate, bgtasks_tasks"
    again = bgtasks_cli("migrate", "pg_apps:worker")
    assert again.stdout.strip() == "bgtasks: tables are up to date"
    # A runtime whose store is not shared: the command says what it needs.
    local = bgtasks_cli("worker", "durable_apps:runtime")
    assert local.returncode == 2
    assert "store='postgresql://...'" in local.stderr and "MemoryStore" in local.stderr
    bad = bgtasks_cli("worker", "pg_apps")
    assert bad.returncode == 2 and "expected MODULE:RUNTIME" in bad.stderr
