"""Push against real servers: uvicorn (ASGI) and gunicorn gthread (Flask).

The app is tests/watch_apps.py; ``/_watchers`` reports how many waiters and
bounded slots are held, so a test sees a stream's resources come back.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from serverutil import Server, free_port, python_argv, wait_for

pytestmark = pytest.mark.server
WAIT = 10.0


def uvicorn(**env: str) -> Server:
    port = free_port()
    argv = python_argv(
        "-m", "uvicorn", "watch_apps:app", "--host", "127.0.0.1", "--port", str(port)
    )
    return Server(argv, port=port, env={"BGTASKS_WATCH_APP": "asgi", **env})


def gunicorn(**env: str) -> Server:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--no-control-socket",
        "-k",
        "gthread",
        "--threads",
        "4",
        "-w",
        "1",
        "-b",
        f"127.0.0.1:{port}",
        "watch_apps:app",
    ]
    return Server(argv, port=port, env={"BGTASKS_WATCH_APP": "flask", **env})


SERVERS = {"uvicorn": uvicorn, "gunicorn": gunicorn}


@pytest.fixture(params=["uvicorn", "gunicorn"], scope="module")
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    # One stream at most: the bound is part of what is tested. A short heartbeat
    # lets gunicorn notice a client that left (it only learns when a write fails).
    with SERVERS[request.param](BGTASKS_MAX_WATCHERS="1", BGTASKS_HEARTBEAT="0.3") as srv:
        yield srv


def spawn(srv: Server, kind: str, name: str | None = None) -> str:
    params = {"kind": kind, **({"name": name} if name else {})}
    r = httpx.post(f"{srv.url}/spawn", params=params, timeout=5)
    assert r.status_code == 200, r.text
    task_id: str = r.json()["id"]
    return task_id


def steer(srv: Server, task_id: str, **params: str) -> None:
    r = httpx.post(f"{srv.url}/steer/{task_id}", params=params, timeout=5)
    assert r.status_code == 200


def held(srv: Server) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(f"{srv.url}/_watchers", timeout=5).json()
    return counts


def released(srv: Server) -> None:
    wait_for(lambda: held(srv) == {"waiters": 0, "taken": 0}, WAIT, "waiters and slots to go")


def records(lines: Iterator[str]) -> Iterator[dict[str, object]]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[len("data: ") :])


def test_events_stream_progress_then_the_finish_and_close(server: Server) -> None:
    task_id = spawn(server, "hold")
    seen: list[dict[str, object]] = []
    url = f"{server.url}/_bgtasks/tasks/{task_id}/events"
    with httpx.stream("GET", url, timeout=WAIT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store"
        stream = records(r.iter_lines())
        seen.append(next(stream))  # at once
        assert seen[0]["status"] in ("pending", "running")
        steer(server, task_id, done="3", total="10")
        while True:
            record = next(stream)
            seen.append(record)
            if record["progress"] is not None:
                break
        assert record["progress"] == {"done": 3.0, "total": 10.0, "message": "step 3"}
        steer(server, task_id, do="finish")
        seen.extend(stream)  # ends: the server closes the stream after the finish
    assert seen[-1]["status"] == "succeeded" and seen[-1]["result"] == "finished"
    released(server)


def test_long_poll_answers_at_the_finish(server: Server) -> None:
    task_id = spawn(server, "hold")
    url = f"{server.url}/_bgtasks/tasks/{task_id}"
    r = httpx.get(url, params={"wait": "0.2"}, timeout=WAIT)
    assert r.status_code == 200 and r.json()["status"] == "running"
    with httpx.Client(timeout=WAIT) as client:
        import threading

        threading.Timer(0.3, steer, (server, task_id), {"do": "fail"}).start()
        r = client.get(url, params={"wait": "30"})
    assert r.json()["status"] == "failed"
    assert r.json()["error"] == {"type": "RuntimeError", "message": "told to fail"}
    assert httpx.get(url, params={"wait": "61"}, timeout=5).status_code == 400
    released(server)


def test_a_client_that_leaves_frees_its_stream_and_the_bound_holds(server: Server) -> None:
    task_id = spawn(server, "hold")
    url = f"{server.url}/_bgtasks/tasks/{task_id}/events"
    with httpx.stream("GET", url, timeout=WAIT) as r:
        stream = records(r.iter_lines())  # kept: dropping it would close the connection
        next(stream)
        assert held(server) == {"waiters": 1, "taken": 1}
        # A second stream, or a long-poll, past max_watchers=1: 503 + Retry-After.
        refused = httpx.get(url, timeout=5)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        assert "max_watchers=1" in refused.json()["detail"]
        polled = httpx.get(f"{server.url}/_bgtasks/tasks/{task_id}?wait=5", timeout=5)
        assert polled.status_code == 503
    # The client closed its connection mid-stream: the waiter and the slot come back
    # (uvicorn at once, from http.disconnect; gunicorn at the next heartbeat's write).
    released(server)
    steer(server, task_id, do="finish")


def test_an_open_stream_does_not_hold_a_stopping_server() -> None:
    """SIGTERM with a stream open on a running task: gunicorn's worker ends the
    stream at once and drains; uvicorn waits for open responses, at most
    ``max_stream``, then runs the lifespan shutdown."""
    for make, env in ((gunicorn, {}), (uvicorn, {"BGTASKS_MAX_STREAM": "2"})):
        with make(**env) as srv:
            task_id = spawn(srv, "hold")
            url = f"{srv.url}/_bgtasks/tasks/{task_id}/events"
            with httpx.stream("GET", url, timeout=WAIT) as r:
                stream = records(r.iter_lines())
                next(stream)
                started = time.monotonic()
                srv.signal(signal.SIGTERM)
                with contextlib.suppress(httpx.HTTPError):
                    for _ in stream:
                        pass
                srv.wait(WAIT)
            # The app's runtime drained: its 2 s grace, then the held task cancelled.
            assert time.monotonic() - started < 8, srv.output()
            assert "still unfinished after shutdown_grace" in srv.output()
