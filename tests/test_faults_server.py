"""Faults that need a real server: a task raising SystemExit must not stop uvicorn."""

from __future__ import annotations

import httpx
import pytest
from serverutil import Server, free_port, python_argv, wait_for

pytestmark = pytest.mark.server


def test_system_exit_and_keyboard_interrupt_in_tasks_do_not_stop_uvicorn() -> None:
    port = free_port()
    argv = python_argv(
        "-m", "uvicorn", "fault_apps:app", "--host", "127.0.0.1", "--port", str(port)
    )
    with Server(argv, port=port) as srv, httpx.Client(base_url=srv.url, timeout=5) as client:
        slow = client.post("/slow")
        assert slow.status_code == 202
        ids = [client.post(path).json()["id"] for path in ("/exit", "/interrupt")]
        records: dict[str, dict[str, object]] = {}

        def all_finished() -> bool:
            for task_id in [*ids, slow.json()["id"]]:
                records[task_id] = client.get(f"/_bgtasks/tasks/{task_id}").json()
            return all(r["status"] != "pending" and r["status"] != "running"
                       for r in records.values())

        wait_for(all_finished, 10, "the three tasks to finish")
        assert [records[i]["status"] for i in ids] == ["failed", "failed"]
        assert [records[i]["error"]["type"] for i in ids] == [  # type: ignore[index]
            "SystemExit",
            "KeyboardInterrupt",
        ]
        assert records[slow.json()["id"]]["status"] == "succeeded"
        assert srv.proc is not None and srv.proc.poll() is None  # uvicorn still serves
        assert client.post("/slow").status_code == 202
