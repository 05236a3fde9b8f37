"""Durability against real servers: kill -9 a uvicorn process (and gunicorn
workers) holding accepted durable tasks, restart on the same SQLite file, and
every task completes; two processes answer for each other's tasks.

The app is tests/durable_apps.py: ``POST /work?n=`` (and ``POST /orders``,
whose body is a pydantic model) is a durable ``@background`` endpoint whose
task waits for a gate file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from serverutil import Server, free_port, wait_for

pytestmark = pytest.mark.server


def env(db: Path, gate: Path) -> dict[str, str]:
    return {
        "BGTASKS_STORE": f"sqlite:///{db}?poll=0.2",
        "BGTASKS_GATE": str(gate),
        "BGTASKS_GRACE": "1",
    }


def uvicorn(db: Path, gate: Path, **extra: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "durable_apps:app", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning"]
    return Server(argv, port=port, env={**env(db, gate), **extra})


def gunicorn(db: Path, gate: Path, workers: int = 2) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-w", str(workers)]
    argv += ["-k", "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{port}"]
    # --preload: the app (and its Runtime) is built in the master, before the fork.
    argv += ["--preload", "--log-level", "warning", "durable_apps:app"]
    return Server(argv, port=port, env=env(db, gate))


def submit(srv: Server, n: int, key: str | None = None) -> str:
    headers = {"Idempotency-Key": key} if key else {}
    r = httpx.post(f"{srv.url}/work", params={"n": n}, headers=headers, timeout=10)
    assert r.status_code == 202, r.text
    task_id: str = r.json()["id"]
    assert r.headers["location"] == f"/_bgtasks/tasks/{task_id}"
    return task_id


def record(srv: Server, task_id: str) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/_bgtasks/tasks/{task_id}", timeout=5)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def all_succeed(srv: Server, ids: list[str], timeout: float) -> list[dict[str, Any]]:
    def done() -> bool:
        return all(record(srv, task_id)["status"] == "succeeded" for task_id in ids)

    wait_for(done, timeout, f"{len(ids)} tasks to succeed", interval=0.1)
    return [record(srv, task_id) for task_id in ids]


def rows(db: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT id, status FROM tasks").fetchall())


def test_uvicorn_kill_9_then_restart_runs_every_accepted_task(tmp_path: Path) -> None:
    db, gate = tmp_path / "tasks.db", tmp_path / "gate"
    with uvicorn(db, gate) as srv:
        ids = [submit(srv, n) for n in range(6)]
        # A retried request with the same key is the same task, not a seventh.
        keyed = submit(srv, 6, key="order-6")
        assert submit(srv, 60, key="order-6") == keyed
        ids.append(keyed)
        # A durable endpoint whose body is a pydantic model.
        r = httpx.post(f"{srv.url}/orders", json={"sku": "s-7", "qty": 7}, timeout=10)
        assert r.status_code == 202, r.text
        order = r.json()["id"]
        # A 202 means "journaled": the rows are in the file before the crash.
        assert set(rows(db)) == {*ids, order}
        srv.kill()  # SIGKILL: no lifespan shutdown, no cleanup
    assert set(rows(db).values()) <= {"pending", "running"}

    gate.touch()
    with uvicorn(db, gate) as srv:
        records = all_succeed(srv, [*ids, order], 10)
        pid = httpx.get(f"{srv.url}/_ready", timeout=5).json()["pid"]
    *records, placed = records
    assert [r["result"]["n"] for r in records] == list(range(7))
    assert placed["result"] == {"sku": "s-7", "qty": 7, "pid": pid}
    assert {r["result"]["pid"] for r in records} == {pid}
    assert all(r["attempts"] in (1, 2) for r in [*records, placed])


def test_kill_9_during_the_second_step_skips_the_first_after_restart(tmp_path: Path) -> None:
    db, gate, log = tmp_path / "tasks.db", tmp_path / "gate", tmp_path / "steps.log"

    def noted() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    with uvicorn(db, gate, BGTASKS_STEPS_LOG=str(log)) as srv:
        r = httpx.post(f"{srv.url}/steps", params={"n": 4}, timeout=10)
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        wait_for(lambda: "second 5" in noted(), 10, "the second step to start")
        running = record(srv, task_id)
        assert [s["status"] for s in running["steps"]] == ["succeeded", "running"]
        srv.kill()  # SIGKILL while the second step runs

    gate.touch()
    with uvicorn(db, gate, BGTASKS_STEPS_LOG=str(log)) as srv:
        (done,) = all_succeed(srv, [task_id], 10)
    assert done["result"] == 50
    assert noted().count("first 4") == 1  # the kept first step was not run again
    assert noted().count("second 5") == 2  # at-least-once per step
    assert [(s["name"], s["status"]) for s in done["steps"]] == [
        ("first", "succeeded"),
        ("second", "succeeded"),
    ]


def test_two_processes_share_status_and_idempotency_keys(tmp_path: Path) -> None:
    db, gate = tmp_path / "tasks.db", tmp_path / "gate"
    with uvicorn(db, gate) as a, uvicorn(db, gate) as b:
        task_id = submit(a, 1)
        keyed = submit(a, 2, key="k")
        # b answers for a's tasks (from the file) and knows a's key.
        assert record(b, task_id)["status"] in ("pending", "running")
        assert submit(b, 3, key="k") == keyed
        # DELETE on b cancels a task a runs.
        victim = submit(a, 4)
        r = httpx.delete(f"{b.url}/_bgtasks/tasks/{victim}", timeout=5)
        assert r.status_code == 202, r.text
        wait_for(lambda: record(a, victim)["status"] == "cancelled", 5, "a to cancel it")
        assert httpx.delete(f"{b.url}/_bgtasks/tasks/{victim}", timeout=5).status_code == 409
        gate.touch()
        done = all_succeed(b, [task_id, keyed], 10)
        pid_a = httpx.get(f"{a.url}/_ready", timeout=5).json()["pid"]
        assert [r["result"] for r in done] == [{"n": 1, "pid": pid_a}, {"n": 2, "pid": pid_a}]
        assert httpx.get(f"{b.url}/_bgtasks/tasks/{'x' * 22}", timeout=5).status_code == 404


def test_gunicorn_workers_killed_with_9_are_replaced_and_finish_the_work(
    tmp_path: Path,
) -> None:
    db, gate = tmp_path / "tasks.db", tmp_path / "gate"
    with gunicorn(db, gate) as srv:
        assert srv.proc is not None
        master = psutil.Process(srv.proc.pid)
        ids = [submit(srv, n) for n in range(8)]
        old = {p.pid for p in master.children()}
        assert len(old) == 2
        for pid in old:
            os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            now = {p.pid for p in master.children()}
            return len(now) == 2 and not now & old

        wait_for(replaced, 10, "gunicorn to replace both workers")
        gate.touch()
        records = all_succeed(srv, ids, 10)
        assert [r["result"]["n"] for r in records] == list(range(8))
        assert not {r["result"]["pid"] for r in records} & old
