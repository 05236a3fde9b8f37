"""HTTP throughput of five ways to keep work running after the response.

    python -m bench.http                 # from the repository root
    python -m bench.http --duration 2 --runs 5 --connections 32

Starts uvicorn (1 worker, ``--no-access-log``) on one FastAPI app that has
``BackgroundMiddleware`` installed and five routes whose background work is
the same small coroutine:

- ``/plain``       no background work (the ceiling);
- ``/bgtasks``     FastAPI ``BackgroundTasks`` (runs after the response, in the request's task);
- ``/create_task`` a raw ``asyncio.create_task`` kept in a set (no id, no status, no limits);
- ``/wait_until``  ``bgtasks.wait_until(coro)``, returning the task id;
- ``/background``  a ``@bgtasks.background`` endpoint answering 202 + Location.

A second server of the same app, its runtime instrumented with
``bgtasks.prometheus`` and ``bgtasks.otel`` (OpenTelemetry SDK, every span
sampled and handed to a batch processor whose exporter discards it), serves
``/wait_until`` and ``/background`` in the same runs: the cost of
instrumentation (skipped when the extras are missing).

Each route is loaded with ``wrk`` (Debian package ``wrk``; a small asyncio
load generator stands in when it is missing) for ``--duration`` seconds,
routes interleaved, ``--runs`` times. Printed per route: the median and the
best requests/s, and the server's median CPU time per request; then the
ratios the project targets (``@background`` >= 1.15x ``BackgroundTasks`` and
>= 0.95x ``create_task``) by each measure. On a machine shared with other
work, req/s swings with the neighbours' load; the best run and the CPU time
per request (whose inverse ratio is the throughput ratio the server would have
alone) move far less.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder would come first on sys.path, and this
# file's name would hide the standard library's ``http`` package.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

# BENCH_BGTASKS_SRC=DIR measures the bgtasks package in DIR (another checkout,
# e.g. an older commit) with this script, for a before/after of the same bench.
if os.environ.get("BENCH_BGTASKS_SRC"):
    sys.path.insert(0, os.environ["BENCH_BGTASKS_SRC"])

import argparse  # noqa: E402
import asyncio  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from fastapi import BackgroundTasks, FastAPI  # noqa: E402

import bgtasks  # noqa: E402
from bgtasks.asgi import BackgroundMiddleware  # noqa: E402

ROUTES = ("plain", "bgtasks", "create_task", "wait_until", "background")
INSTRUMENTED = ("wait_until", "background")  # also measured on the instrumented server
ROOT = os.path.dirname(_HERE)


async def work(n: int) -> int:
    """The background work of every route: a little arithmetic and one await."""
    await asyncio.sleep(0)
    return sum(range(n))


def instrument(rt: bgtasks.Runtime) -> None:
    """Prometheus metrics and OpenTelemetry spans, as a deployment would have them
    (but for the exporter, which drops the spans instead of sending them)."""
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    import bgtasks.otel
    import bgtasks.prometheus

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    bgtasks.otel.instrument(rt, tracer_provider=provider)
    bgtasks.prometheus.instrument(rt)


def make_app() -> FastAPI:
    """The benchmarked app (``uvicorn --factory bench.http:make_app``);
    ``BGTASKS_BENCH_INSTRUMENTED=1`` instruments its runtime."""
    app = FastAPI()
    rt = bgtasks.Runtime()
    if os.environ.get("BGTASKS_BENCH_INSTRUMENTED") == "1":
        instrument(rt)
    app.add_middleware(BackgroundMiddleware, runtime=rt)
    keep: set[asyncio.Task[Any]] = set()

    @app.get("/plain")
    async def plain() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/bgtasks")
    async def with_background_tasks(tasks: BackgroundTasks) -> dict[str, bool]:
        tasks.add_task(work, 20)
        return {"ok": True}

    @app.get("/create_task")
    async def with_create_task() -> dict[str, bool]:
        task = asyncio.create_task(work(20))
        keep.add(task)
        task.add_done_callback(keep.discard)
        return {"ok": True}

    @app.get("/wait_until")
    async def with_wait_until() -> dict[str, str]:
        return {"id": bgtasks.wait_until(work(20)).id}

    @app.get("/background")
    @bgtasks.background
    async def with_background() -> int:
        return await work(20)

    return app


# ---------------------------------------------------------------------- load
_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
SERVER_CPUS = set(_CPUS[:1]) if len(_CPUS) >= 2 else set()
LOAD_CPUS = set(_CPUS[1:]) if len(_CPUS) >= 2 else set()


def _pin(cpus: set[int]) -> Any:
    """A ``preexec_fn`` that pins the child to ``cpus`` (no-op when empty)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def run_wrk(url: str, duration: float, connections: int) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", url],
        preexec_fn=_pin(LOAD_CPUS),
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors on {url}:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    if rate is None or count is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return float(rate.group(1)), int(count.group(1))


def run_python_load(url: str, duration: float, connections: int) -> tuple[float, int]:
    """A keep-alive HTTP/1.1 GET loop over ``connections`` sockets (no wrk)."""
    host_port, path = url.removeprefix("http://").split("/", 1)
    host, port = host_port.split(":")
    request = f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\n\r\n".encode()

    async def client(deadline: float) -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        n = 0
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 202")):
                    raise SystemExit(f"unexpected answer from {url}: {head[:40]!r}")
                length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                n += 1
        finally:
            writer.close()
        return n

    async def main() -> tuple[float, int]:
        began = time.monotonic()
        counts = await asyncio.gather(*(client(began + duration) for _ in range(connections)))
        return sum(counts) / (time.monotonic() - began), sum(counts)

    return asyncio.run(main())


# ---------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def can_instrument() -> bool:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
        import prometheus_client  # noqa: F401

        import bgtasks.otel  # absent from older checkouts
        import bgtasks.prometheus  # noqa: F401
    except ImportError:
        return False
    return True


def start_server(port: int, *, instrumented: bool = False) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "bench.http:make_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    # One CPU for the server, the others for the load generator: a 1-worker
    # server is CPU-bound on one core, and must not share it with wrk.
    env = {**os.environ, "BGTASKS_BENCH_INSTRUMENTED": "1" if instrumented else "0"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, preexec_fn=_pin(SERVER_CPUS))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/plain", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("uvicorn exited before serving") from None
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("uvicorn did not start within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--runs", type=int, default=3, help="rounds over the five routes")
    parser.add_argument(
        "--no-obs", action="store_true", help="skip the instrumented server (before/after runs)"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--python-load", action="store_true", help="do not use wrk")
    args = parser.parse_args()

    use_wrk = shutil.which("wrk") is not None and not args.python_load
    load = run_wrk if use_wrk else run_python_load
    tool = "wrk -t1" if use_wrk else "asyncio load generator"
    if not use_wrk and LOAD_CPUS:
        os.sched_setaffinity(0, LOAD_CPUS)  # the load generator is this process
    port = free_port()
    procs = [start_server(port)]
    # (label, port, path) of every measurement; the instrumented server's labels end in "+obs".
    targets = [(route, port, route) for route in ROUTES]
    print(f"bgtasks from {os.path.dirname(bgtasks.__file__)}", flush=True)
    if not args.no_obs and can_instrument():
        port2 = free_port()
        procs.append(start_server(port2, instrumented=True))
        targets += [(f"{route}+obs", port2, route) for route in INSTRUMENTED]
    else:
        print(
            "(--no-obs, or opentelemetry-sdk or prometheus-client missing: no instrumented figures)"
        )
    servers = {port: psutil.Process(procs[0].pid)}
    if len(procs) == 2:
        servers[port2] = psutil.Process(procs[1].pid)

    def cpu(p: int) -> float:
        times = servers[p].cpu_times()
        return float(times.user + times.system)

    rates: dict[str, list[float]] = {label: [] for label, _, _ in targets}
    costs: dict[str, list[float]] = {label: [] for label, _, _ in targets}
    try:
        for _, p, route in targets:  # warm up every route once
            load(f"http://127.0.0.1:{p}/{route}", 1.0, args.connections)
        for _ in range(args.runs):
            for label, p, route in targets:
                before = cpu(p)
                rps, count = load(f"http://127.0.0.1:{p}/{route}", args.duration, args.connections)
                rates[label].append(rps)
                costs[label].append((cpu(p) - before) / count * 1e6)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    rate = {route: statistics.median(values) for route, values in rates.items()}
    best = {route: max(values) for route, values in rates.items()}
    cost = {route: statistics.median(values) for route, values in costs.items()}
    print(
        f"uvicorn, 1 worker, --no-access-log; {tool}, {args.connections} connections, "
        f"{args.duration:g} s per run, {args.runs} interleaved runs"
    )
    print(f"{'route':<14}{'median req/s':>13}{'best req/s':>12}{'CPU µs/req':>12}   all runs")
    for route in rates:
        runs = ", ".join(f"{v:.0f}" for v in rates[route])
        print(f"/{route:<13}{rate[route]:>13.0f}{best[route]:>12.0f}{cost[route]:>12.1f}   {runs}")
    print(f"{'ratio':<30}{'median':>8}{'best':>8}{'CPU':>8}")
    for label, a, b, target in (
        ("@background / BackgroundTasks", "background", "bgtasks", 1.15),
        ("@background / create_task", "background", "create_task", 0.95),
        ("wait_until / create_task", "wait_until", "create_task", None),
    ):
        goal = f"   (target >= {target:.2f}x)" if target else ""
        print(
            f"{label:<30}{rate[a] / rate[b]:>7.2f}x{best[a] / best[b]:>7.2f}x"
            f"{cost[b] / cost[a]:>7.2f}x{goal}"
        )
    for route in INSTRUMENTED:
        on = f"{route}+obs"
        if on in rate:
            print(
                f"{'instrumented / off, /' + route:<30}{rate[on] / rate[route]:>7.2f}x"
                f"{best[on] / best[route]:>7.2f}x{cost[route] / cost[on]:>7.2f}x"
                f"   (+{cost[on] - cost[route]:.1f} µs CPU per request)"
            )


if __name__ == "__main__":
    main()
