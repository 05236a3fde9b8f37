"""Observability against real servers: a trace from the client's request to the
task's span under uvicorn, and Prometheus scrapes under uvicorn and under
gunicorn with several workers (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import concurrent.futures
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serverutil import Server, free_port, python_argv, wait_for

pytestmark = pytest.mark.server

TESTS = Path(__file__).resolve().parent


def uvicorn(**env: str) -> Server:
    port = free_port()
    argv = python_argv("-m", "uvicorn", "observed_apps:app", "--host", "127.0.0.1")
    argv += ["--port", str(port), "--log-level", "warning"]
    return Server(argv, port=port, env=env)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("bgtasks_"):
                samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def submit(client: httpx.Client, kind: str, **params: str) -> dict[str, Any]:
    r = client.post(f"/submit/{kind}", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.fixture
def server() -> Iterator[Server]:
    with uvicorn(BGTASKS_MAX_PENDING="2") as srv:
        yield srv


def test_a_trace_runs_from_the_clients_request_to_the_tasks_span(server: Server) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    headers = {"traceparent": f"00-{trace_id}-{client_span}-01"}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        task_id = client.post("/submit/ok", headers=headers).json()["id"]
        assert client.get("/idle").json() == {"idle": True}
        spans = client.get("/spans").json()
    (request,) = [s for s in spans if s["name"] == "POST /submit/ok"]
    (task,) = [s for s in spans if s["name"] == "process ok"]
    assert (request["kind"], request["trace_id"], request["parent_id"]) == (
        "SERVER",
        trace_id,
        client_span,
    )
    assert task["kind"] == "CONSUMER"
    assert task["trace_id"] == trace_id
    assert task["parent_id"] == request["span_id"]
    assert task["links"] == [request["span_id"]]
    assert task["attributes"]["messaging.message.id"] == task_id
    assert task["attributes"]["messaging.destination.name"] == "ok"
    assert task["attributes"]["messaging.system"] == "bgtasks"
    assert task["status"] == "UNSET"


def test_prometheus_counts_known_outcomes_on_a_real_server(server: Server) -> None:
    ids: list[str] = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for kind in ("ok", "ok", "ok", "fails", "fails", "slow"):
            ids.append(submit(client, kind)["id"])
            assert client.get("/idle").json() == {"idle": True}  # max_pending=2
        ids.append(submit(client, "flaky", key="a")["id"])  # two retries, then success
        assert client.get("/idle").json() == {"idle": True}
        # Two held tasks fill max_pending=2: the next call is refused with 503.
        ids += [client.post("/hold").json()["id"] for _ in range(2)]
        wait_for(
            lambda: value(scrape(client), "bgtasks_tasks", state="running") == 2,
            10,
            "both held tasks to be running",
        )
        assert client.post("/submit/ok").status_code == 503
        client.post("/release")
        assert client.get("/idle").json() == {"idle": True}
        m = scrape(client)

    submitted = {n: value(m, "bgtasks_tasks_submitted_total", name=n) for n in ("ok", "fails")}
    assert submitted == {"ok": 3, "fails": 2}
    assert value(m, "bgtasks_tasks_submitted_total", name="held") == 2
    for name, status, count in [
        ("ok", "succeeded", 3),
        ("fails", "failed", 2),
        ("slow", "failed", 1),
        ("flaky", "succeeded", 1),
        ("held", "succeeded", 2),
    ]:
        assert value(m, "bgtasks_tasks_finished_total", name=name, status=status) == count
        assert value(m, "bgtasks_task_duration_seconds_count", name=name, status=status) == count
    assert value(m, "bgtasks_task_retries_total", name="flaky") == 2
    assert value(m, "bgtasks_task_retries_total", name="fails") == 0  # no retries configured
    assert value(m, "bgtasks_task_limit_exceeded_total", name="slow", limit="wall_clock") == 1
    assert value(m, "bgtasks_tasks_rejected_total", reason="pending") == 1
    assert value(m, "bgtasks_task_queue_wait_seconds_count", name="ok") == 3
    assert value(m, "bgtasks_tasks", state="pending") == 0
    assert value(m, "bgtasks_tasks", state="running") == 0
    # Never a task id as a label.
    labels = {v for _, pairs in m for _, v in pairs}
    assert not labels & set(ids)


def test_gunicorn_workers_share_their_metrics_in_multiprocess_mode(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-w", "2"]
    argv += ["-k", "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{port}"]
    argv += ["-c", str(TESTS / "gunicorn_prometheus.py"), "--log-level", "warning"]
    argv += ["observed_apps:app"]
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    # No keep-alive: each call is a new connection, which either worker may accept.
    fresh = httpx.Limits(max_keepalive_connections=0)
    with (
        Server(argv, port=port, env=env) as srv,
        httpx.Client(base_url=srv.url, timeout=10, limits=fresh) as c,
    ):
        # Concurrent calls until both workers (the second may still be booting) took some.
        pids: set[int] = set()
        submitted = 0
        deadline = time.monotonic() + 20
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            while len(pids) < 2 and time.monotonic() < deadline:
                for body in pool.map(lambda _: submit(c, "ok"), range(16)):
                    pids.add(body["pid"])
                    submitted += 1
        assert len(pids) == 2, "one worker took every request"

        def counted() -> bool:
            m = scrape(c)  # whichever worker answers reads every worker's files
            return value(m, "bgtasks_tasks_finished_total", name="ok", status="succeeded") == (
                submitted
            )

        wait_for(counted, 10, "every worker's tasks to be counted")
        m = scrape(c)
        assert value(m, "bgtasks_tasks_submitted_total", name="ok") == submitted

        # The gauge is a livesum of the workers' own counts.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            held = list(pool.map(lambda _: c.post("/hold").json()["pid"], range(8)))
        wait_for(
            lambda: value(scrape(c), "bgtasks_tasks", state="running") == len(held),
            10,
            "the held tasks to show as running",
        )

        def released() -> bool:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:  # to reach both workers
                list(pool.map(lambda _: c.post("/release"), range(8)))
            return value(scrape(c), "bgtasks_tasks", state="running") == 0

        wait_for(released, 10, "the held tasks to finish in every worker")
        assert value(scrape(c), "bgtasks_tasks", state="pending") == 0
