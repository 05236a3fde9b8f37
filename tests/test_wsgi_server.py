"""The WSGI adapter's lifecycle against real servers: gunicorn (sync and gthread
workers) and ``flask run``, started on 127.0.0.1 by the tests.

The app (tests/wsgi_apps.py) writes what happens in its workers to an
evidence file, read once the worker has exited.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from serverutil import ROOT, Server, free_port, wait_for

pytestmark = pytest.mark.server

GUNICORN = [sys.executable, "-m", "gunicorn", "--no-control-socket", "--log-level", "info"]
WORKERS = {"sync": ["-k", "sync"], "gthread": ["-k", "gthread", "--threads", "4"]}


@pytest.fixture
def evidence(tmp_path: Path) -> Path:
    return tmp_path / "evidence.txt"


def lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


def noted(path: Path, what: str, task_id: str | None = None) -> bool:
    return any(w[0] == what and (task_id is None or w[1] == task_id) for w in lines(path))


def gunicorn(evidence: Path, *args: str, worker: str = "sync", grace: float = 10.0) -> Server:
    port = free_port()
    argv = [*GUNICORN, *WORKERS[worker], "-w", "1", "-b", f"127.0.0.1:{port}", *args]
    env = {"BGTASKS_EVIDENCE": str(evidence), "BGTASKS_TEST_GRACE": str(grace)}
    return Server([*argv, "wsgi_apps:app"], port=port, env=env)


def start_task(srv: Server, path: str, seconds: float) -> str:
    # "Connection: close": the server closes the connection itself. Otherwise the
    # client's close wakes gthread's main thread, which may be starting a pool
    # thread (in ThreadPoolExecutor.submit) just when a test's SIGINT arrives:
    # gthread's SIGQUIT handler then waits forever for the lock submit holds.
    r = httpx.post(
        f"{srv.url}{path}?seconds={seconds}",
        json={"n": 1},
        headers={"Connection": "close"},
        timeout=5,
    )
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    assert r.headers["location"] == f"/_bgtasks/tasks/{task_id}"
    return task_id


def stopped_within(srv: Server, sig: int, timeout: float) -> float:
    t0 = time.monotonic()
    srv.signal(sig)
    srv.wait(timeout)
    return time.monotonic() - t0


@pytest.mark.parametrize(
    ("worker", "sig"),
    [("sync", signal.SIGTERM), ("gthread", signal.SIGTERM), ("gthread", signal.SIGINT)],
)
def test_202_status_then_signal_drains(evidence: Path, worker: str, sig: int) -> None:
    with gunicorn(evidence, worker=worker) as srv:
        # 202 -> follow Location -> succeeded, with the result of the view.
        quick = start_task(srv, "/work", 0.05)

        def succeeded() -> bool:
            r = httpx.get(f"{srv.url}/_bgtasks/tasks/{quick}", timeout=5)
            assert r.status_code == 200, r.text
            return r.json()["status"] == "succeeded"

        wait_for(succeeded, 10, "the quick task to succeed")
        record = httpx.get(f"{srv.url}/_bgtasks/tasks/{quick}", timeout=5).json()
        assert record["result"]["echo"] == {"n": 1}

        # Tasks still running when the master is told to stop: all finish.
        slow = [start_task(srv, "/work", 1.5), start_task(srv, "/async_work", 1.5)]
        wait_for(lambda: all(noted(evidence, "started", t) for t in slow), 5, "tasks to start")
        signalled = time.time()
        stopped_within(srv, sig, 15)
        events = lines(evidence)
        for task_id in slow:
            done = [w for w in events if w[:2] == ["done", task_id]]
            assert done, (events, srv.output())
            assert float(done[0][3]) > signalled  # it was in flight when the stop began
        assert ["beforeunload", "shutdown"] in [w[:2] for w in events], events


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_max_requests_recycling_drains_the_task_in_flight(evidence: Path, worker: str) -> None:
    with gunicorn(evidence, "--max-requests", "1", worker=worker) as srv:
        task_id = start_task(srv, "/work", 1.0)  # this worker exits after this request
        wait_for(lambda: noted(evidence, "done", task_id), 10, "the task to finish")
        events = lines(evidence)
        done = next(w for w in events if w[:2] == ["done", task_id])
        task_pid = int(done[2])
        # The worker that ran the task drained: beforeunload first, then the task
        # finished. (The worker that served the /_ready probe drained too, earlier.)
        unloads = [w for w in events if w[0] == "beforeunload" and int(w[2]) == task_pid]
        assert unloads, events
        assert float(unloads[0][3]) < float(done[3]), events
        # A fresh worker serves the next request.
        new_pid = httpx.get(f"{srv.url}/pid", timeout=5).json()["pid"]
        assert new_pid != task_pid


def test_preload_starts_the_runtime_in_each_worker(evidence: Path) -> None:
    with gunicorn(evidence, "--preload", "-w", "2") as srv:
        seen = set()
        for _ in range(4):
            body = httpx.get(f"{srv.url}/run_and_wait", timeout=10).json()
            # The app was imported in the master; the task ran in the forked worker.
            assert body["status"] == "succeeded"
            assert body["task_pid"] == body["pid"]
            seen.add(body["pid"])
        info = httpx.get(f"{srv.url}/pid", timeout=5).json()
        assert info["import_pid"] != info["pid"]
        assert srv.proc is not None and info["import_pid"] == srv.proc.pid
        stopped_within(srv, signal.SIGTERM, 15)
    # Every worker that served drained on its way out.
    unloaded = {int(w[2]) for w in lines(evidence) if w[0] == "beforeunload"}
    assert seen <= unloaded


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_task_longer_than_the_grace_is_cancelled_and_the_worker_exits(
    evidence: Path, worker: str
) -> None:
    with gunicorn(evidence, grace=1.0, worker=worker) as srv:
        task_id = start_task(srv, "/async_work", 60)
        start_task(srv, "/work", 60)  # a thread stuck in time.sleep cannot be interrupted
        wait_for(lambda: len(lines(evidence)) >= 2, 5, "tasks to start")
        elapsed = stopped_within(srv, signal.SIGTERM, 15)
    assert noted(evidence, "cancelled", task_id), lines(evidence)
    assert noted(evidence, "beforeunload")
    assert elapsed < 1.0 + 5.0  # the grace, the unwinding, gunicorn's own exit


def test_grace_is_fitted_into_gunicorns_graceful_timeout(evidence: Path) -> None:
    with gunicorn(evidence, "--graceful-timeout", "5", worker="gthread", grace=30.0) as srv:
        task_id = start_task(srv, "/async_work", 60)
        assert httpx.get(f"{srv.url}/pid", timeout=5).json()["grace"] == 2.0
        wait_for(lambda: noted(evidence, "started", task_id), 5, "the task to start")
        elapsed = stopped_within(srv, signal.SIGTERM, 15)
        assert "does not fit in gunicorn's graceful_timeout=5s" in srv.output()
    # Cancelled by the drain, not killed by gunicorn: the evidence was written.
    assert noted(evidence, "cancelled", task_id), lines(evidence)
    assert elapsed < 5.0


def test_flask_dev_server_ctrl_c_drains(evidence: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "flask", "--app", "wsgi_apps:app", "run", "--port", str(port)]
    env = {"BGTASKS_EVIDENCE": str(evidence), "BGTASKS_TEST_GRACE": "10"}
    with Server(argv, port=port, env=env) as srv:
        task_id = start_task(srv, "/work", 1.0)
        wait_for(lambda: noted(evidence, "started", task_id), 5, "the task to start")
        stopped_within(srv, signal.SIGINT, 15)
    assert noted(evidence, "done", task_id), lines(evidence)
    assert noted(evidence, "beforeunload")


def test_a_recycled_worker_outlives_gunicorns_timeout_while_it_drains(evidence: Path) -> None:
    # Out of its run loop, a worker no longer heartbeats by itself: bgtasks does
    # it for the drain, or the master's --timeout check would kill it mid-task.
    with gunicorn(evidence, "--timeout", "2", "--max-requests", "1") as srv:
        task_id = start_task(srv, "/work", 3.5)

        def over() -> bool:
            return noted(evidence, "done", task_id) or "WORKER TIMEOUT" in srv.output()

        wait_for(over, 10, "the task to finish or the worker to be killed")
        assert "WORKER TIMEOUT" not in srv.output(), srv.output()
        assert noted(evidence, "done", task_id)


def test_the_example_app_under_gunicorn(tmp_path: Path) -> None:
    # As its README runs it (two workers, from the repository root), with its
    # default SQLite store moved out of the working tree.
    port = free_port()
    argv = [*GUNICORN, *WORKERS["gthread"], "-w", "2", "-b", f"127.0.0.1:{port}"]
    env = {"BGTASKS_STORE": f"sqlite:///{tmp_path}/example.db"}
    app = "examples.flask_app.app:app"
    with Server([*argv, app], port=port, env=env, ready_path="/", cwd=ROOT) as srv:
        r = httpx.post(f"{srv.url}/reports", json={"rows": 1}, timeout=5)
        assert r.status_code == 202, r.text
        location = r.headers["location"]
        assert location == r.json()["status_url"]

        def succeeded() -> bool:
            status = httpx.get(srv.url + location, timeout=5)
            assert status.status_code == 200, status.text  # either worker knows the task
            return status.json()["status"] == "succeeded"

        wait_for(succeeded, 10, "the report to succeed")
        assert httpx.get(srv.url + location, timeout=5).json()["result"]["rows"] == 1
        stopped_within(srv, signal.SIGTERM, 15)
