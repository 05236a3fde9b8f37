"""The ASGI adapter under real servers (uvicorn, hypercorn) on 127.0.0.1."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serverutil import Server, free_port, python_argv, wait_for

pytestmark = pytest.mark.server

WAIT = 10.0


def uvicorn(port: int, evidence: Path, *options: str, **env: str) -> Server:
    argv = python_argv(
        "-m", "uvicorn", "asgi_apps:app", "--host", "127.0.0.1", "--port", str(port), *options
    )
    return Server(argv, port=port, env={"BGTASKS_EVIDENCE": str(evidence), **env})


def lines(evidence: Path) -> list[str]:
    return evidence.read_text().splitlines() if evidence.exists() else []


def has(evidence: Path, *wanted: str) -> bool:
    got = lines(evidence)
    return all(w in got for w in wanted)


def follow_until_finished(client: httpx.Client, location: str) -> dict[str, object]:
    record: dict[str, object] = {}

    def finished() -> bool:
        nonlocal record
        record = client.get(location).json()
        return record["status"] in ("succeeded", "failed", "cancelled")

    wait_for(finished, WAIT, f"{location} to finish")
    return record


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    evidence = tmp_path_factory.mktemp("asgi") / "evidence.txt"
    with uvicorn(free_port(), evidence, BGTASKS_MAX_PENDING="3") as srv:
        yield srv, evidence


@pytest.fixture(scope="module")
def behind_base_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """The app with a ``BaseHTTPMiddleware`` outside and another inside ours."""
    evidence = tmp_path_factory.mktemp("asgi") / "evidence.txt"
    with uvicorn(free_port(), evidence, BGTASKS_BASE_HTTP="1") as srv:
        yield srv, evidence


STACKS = ["shared", "behind_base_http"]


@pytest.mark.parametrize("stack", STACKS)
def test_202_then_location_reports_succeeded(stack: str, request: pytest.FixtureRequest) -> None:
    srv, evidence = request.getfixturevalue(stack)
    with httpx.Client(base_url=srv.url, timeout=WAIT) as client:
        r = client.post("/sleep", params={"seconds": 0.05, "tag": "flow"})
        assert r.status_code == 202
        assert r.headers["location"] == r.json()["status_url"]
        record = follow_until_finished(client, r.headers["location"])
        assert record["status"] == "succeeded"
        assert record["result"] == "flow"
        # A task far longer than the client's timeout: the 202 is not held back.
        r = client.post("/sleep", params={"seconds": 60, "tag": "held"})
        assert r.status_code == 202
        if stack == "behind_base_http":
            assert r.headers["x-outer"] == r.headers["x-inner"] == "1"
            assert has(evidence, "outer middleware flow", "inner middleware flow")
        assert client.delete(r.headers["location"]).status_code == 202
        assert follow_until_finished(client, r.headers["location"])["status"] == "cancelled"


def test_overload_answers_503_with_retry_after(shared: tuple[Server, Path]) -> None:
    srv, _ = shared
    with httpx.Client(base_url=srv.url, timeout=WAIT) as client:
        held = []
        try:
            for i in range(3):
                r = client.post("/sleep", params={"seconds": 60, "tag": f"hold{i}"})
                assert r.status_code == 202
                held.append(r.headers["location"])
            r = client.post("/sleep", params={"seconds": 0, "tag": "refused"})
            assert r.status_code == 503
            assert int(r.headers["retry-after"]) >= 1
            assert "max_pending" in r.json()["detail"]
        finally:
            for location in held:
                client.delete(location)
        for location in held:
            assert follow_until_finished(client, location)["status"] == "cancelled"
        assert client.post("/sleep", params={"seconds": 0, "tag": "again"}).status_code == 202


@pytest.mark.parametrize("stack", STACKS)
def test_a_client_that_disconnects_at_once_does_not_cancel_the_task(
    stack: str, request: pytest.FixtureRequest
) -> None:
    srv, evidence = request.getfixturevalue(stack)
    raw = (
        b"POST /sleep?seconds=0.2&tag=gone HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: has(evidence, "start gone", "done gone"), WAIT, "the task to finish")
    got = lines(evidence)
    assert "cancelled gone" not in got
    if stack == "behind_base_http":  # the request did go through both of them
        assert "outer middleware gone" in got and "inner middleware gone" in got
    with httpx.Client(base_url=srv.url, timeout=WAIT) as client:  # and the server is fine
        assert client.get("/_ready").json() == {"ready": True}


def test_sigterm_drains_within_grace_and_cancels_what_outlasts_it(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence.txt"
    grace = 2.0
    with uvicorn(free_port(), evidence, BGTASKS_GRACE=str(grace)) as srv:
        for seconds, tag in ((0.8, "short"), (60, "long")):
            r = httpx.post(f"{srv.url}/sleep", params={"seconds": seconds, "tag": tag})
            assert r.status_code == 202
        wait_for(lambda: has(evidence, "start short", "start long"), WAIT, "tasks to start")
        began = time.monotonic()
        srv.signal(signal.SIGTERM)
        code = srv.wait(grace + 6)
        took = time.monotonic() - began
        output = srv.output()
    got = lines(evidence)
    # uvicorn re-raises the signal after its graceful shutdown: -15 is a clean exit.
    assert code in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "beforeunload shutdown" in got, output
    assert got.index("beforeunload shutdown") < got.index("done short")  # ran during the drain
    assert "cancelled long" in got, output
    assert "done long" not in got
    assert grace - 0.5 < took < grace + 4, (took, output)


@pytest.mark.parametrize("worker", ["asyncio", "trio"])
def test_hypercorn_key_flow_and_drain(tmp_path: Path, worker: str) -> None:
    """Under trio workers the runtime runs on its own asyncio loop thread, which the
    lifespan starts and drains."""
    pytest.importorskip("hypercorn")
    pytest.importorskip(worker)
    evidence = tmp_path / "evidence.txt"
    port = free_port()
    argv = python_argv(
        "-m", "hypercorn", "asgi_apps:app", "--bind", f"127.0.0.1:{port}", "-k", worker
    )
    env = {"BGTASKS_EVIDENCE": str(evidence), "BGTASKS_GRACE": "5"}
    with Server(argv, port=port, env=env) as srv:
        with httpx.Client(base_url=srv.url, timeout=WAIT) as client:
            r = client.post("/sleep", params={"seconds": 0.05, "tag": "hyper"})
            assert r.status_code == 202
            assert follow_until_finished(client, r.headers["location"])["status"] == "succeeded"
            r = client.post("/sleep", params={"seconds": 0.5, "tag": "drained"})
            assert r.status_code == 202
        wait_for(lambda: has(evidence, "start drained"), WAIT, "the task to start")
        began = time.monotonic()
        srv.signal(signal.SIGTERM)
        code = srv.wait(WAIT)
        took = time.monotonic() - began
        output = srv.output()
    assert has(evidence, "done hyper", "beforeunload shutdown", "done drained"), output
    assert code == 0, output  # hypercorn exits 0 after a graceful shutdown
    assert "Traceback" not in output, output
    # The drain ends when the 0.5 s task does, not at the 5 s grace.
    assert took < 3.0, (took, output)


def test_uvicorn_lifespan_off_starts_on_first_use_and_drains_at_exit(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence.txt"
    with uvicorn(free_port(), evidence, "--lifespan", "off") as srv:
        with httpx.Client(base_url=srv.url, timeout=WAIT) as client:
            # A route that does not use bgtasks starts nothing.
            assert client.get("/_ready").json() == {"ready": False}
            locations = []
            for i in range(3):
                r = client.post("/sleep", params={"seconds": 0.05, "tag": f"off{i}"})
                assert r.status_code == 202
                locations.append(r.headers["location"])
            for i, location in enumerate(locations):
                record = follow_until_finished(client, location)
                assert (record["status"], record["result"]) == ("succeeded", f"off{i}")
            assert client.get("/_ready").json() == {"ready": True}
            # Still running when the server is told to stop: the exit drains it.
            assert client.post("/sleep", params={"seconds": 0.5, "tag": "last"}).status_code == 202
            wait_for(lambda: has(evidence, "start last"), WAIT, "the last task to start")
        srv.signal(signal.SIGINT)  # Ctrl-C (uvicorn re-raises SIGTERM: that cannot drain)
        code = srv.wait(WAIT)
        output = srv.output()
    assert code in (0, 1, -signal.SIGINT), output
    assert has(evidence, "done last", "beforeunload shutdown"), (lines(evidence), output)
    assert "Traceback" not in output, output
    assert output.count("no ASGI lifespan started the runtime") == 1, output
    assert "Waiting for application startup" not in output, output  # lifespan was off
