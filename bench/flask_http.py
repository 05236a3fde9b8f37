"""A ``@background`` Flask route against what Flask users write instead, under gunicorn.

Run:  .venv/bin/python -m bench.flask_http [--duration 3] [--rounds 3]

One gunicorn master with 1 gthread worker (4 threads) serves this module's
``app``. ``wrk`` loads, interleaved, ``--rounds`` times each:

- ``GET /background``: a ``@bgtasks.background`` view (answers 202 + a status
  URL; the runtime runs the view in a worker thread inside a copy of the
  request context);
- ``GET /executor``: Flask-Executor's ``executor.submit(work)`` from a plain
  view, answering 202 (its default thread pool; the task gets a copy of the
  request context and an app context, as with ``@background``);
- ``GET /thread``: a ``threading.Thread`` per request running
  ``copy_current_request_context(work)``, answering 202;
- ``GET /plain``: the same work done in the request (reference only).

The median requests/s of each, the worker's CPU per request and the ratios
are printed; the target is ``@background`` >= 1.0x Flask-Executor.
``--detail`` adds routes that show where the cost goes: two schedule through
the runtime without Flask's context, two hand work to a bare daemon thread.
``--inline-tasks`` (a diagnostic) runs sync tasks on the request thread, to
show what the work costs without a second thread. Needs ``wrk``
(``apt-get install -y wrk``) and ``flask-executor`` (in the ``dev`` extra).
``BENCH_BGTASKS_SRC=DIR`` measures the bgtasks package in DIR instead (a
before/after of two checkouts with the same bench).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

if os.environ.get("BENCH_BGTASKS_SRC"):
    sys.path.insert(0, os.environ["BENCH_BGTASKS_SRC"])

import psutil
from flask import Flask, copy_current_request_context
from flask_executor import Executor

import bgtasks
from bgtasks.flask import BgTasks

if os.environ.get("BENCH_INLINE_TASKS"):
    # --inline-tasks (a diagnostic, not a mode bgtasks offers): sync tasks run on
    # the thread that submits them, so no work is handed to another thread.
    from bgtasks import _threads

    _threads.ThreadPool.submit = lambda self, fn: fn()  # type: ignore[method-assign]

app = Flask(__name__)
BgTasks(app)
executor = Executor(app)


@app.get("/plain")
def plain() -> dict[str, bool]:
    return {"ok": True}


@app.get("/background")
@bgtasks.background
def background() -> dict[str, bool]:
    return {"ok": True}


def work() -> dict[str, bool]:
    return {"ok": True}


@app.get("/executor")
def with_executor() -> tuple[dict[str, bool], int]:
    executor.submit(work)  # copies the request context and pushes an app context
    return {"ok": True}, 202


@app.get("/thread")
def with_thread() -> tuple[dict[str, bool], int]:
    threading.Thread(target=copy_current_request_context(work), daemon=True).start()
    return {"ok": True}, 202


# --detail: where the cost of /background goes. Both schedule through the
# runtime directly (no Flask context carried into the task) and answer 202.
def _sync_noop() -> dict[str, bool]:
    return {"ok": True}


async def _async_noop() -> dict[str, bool]:
    return {"ok": True}


@app.get("/runtime_sync")
def runtime_sync() -> tuple[dict[str, bool], int]:
    app.extensions["bgtasks"].runtime.wait_until(_sync_noop)  # a worker thread
    return {"ok": True}, 202


@app.get("/runtime_async")
def runtime_async() -> tuple[dict[str, bool], int]:
    app.extensions["bgtasks"].runtime.wait_until(_async_noop)  # the event loop
    return {"ok": True}, 202


_hop: queue.SimpleQueue[object] = queue.SimpleQueue()


def _hop_worker() -> None:
    while True:
        fn = _hop.get()
        fn()  # type: ignore[operator]


_hop_started = threading.Lock()
_hop_thread: list[threading.Thread] = []


def _hop_put(fn: object) -> None:
    """Hand ``fn`` to the one daemon thread that reads ``_hop`` (started on first use)."""
    if not _hop_thread:
        with _hop_started:
            if not _hop_thread:
                _hop_thread.append(threading.Thread(target=_hop_worker, daemon=True))
                _hop_thread[0].start()
    _hop.put(fn)


def _busy() -> None:
    x = 0
    for i in range(300):  # about 11 us of Python on this machine
        x += i


@app.get("/hop_busy")
def hop_busy() -> tuple[dict[str, bool], int]:
    # A hand-off whose thread then runs ~11 us of Python (about what a task's
    # Flask context costs alone): the price of the GIL being shared.
    _hop_put(_busy)
    return {"ok": True}, 202


@app.get("/hop")
def hop() -> tuple[dict[str, bool], int]:
    # The floor of any thread hand-off: a no-op put on a queue one daemon thread reads.
    _hop_put(_sync_noop)
    return {"ok": True}, 202


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"gunicorn did not answer {url} within {timeout}s")


def _wrk(url: str, duration: float, threads: int, connections: int) -> tuple[float, str]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return float(m.group(1)), non2xx.group(1) if non2xx else "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each route")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument(
        "--detail",
        action="store_true",
        help="also load /runtime_sync, /runtime_async (the runtime without Flask's context) "
        "and /hop, /hop_busy (a bare queue hand-off to one thread, of a no-op and of ~11 us "
        "of Python)",
    )
    parser.add_argument(
        "--inline-tasks",
        action="store_true",
        help="diagnostic: run sync tasks on the request thread, during the request, to "
        "show what the work costs without a second thread",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")

    port = _free_port()
    here = Path(__file__).resolve().parent
    argv = [
        sys.executable, "-m", "gunicorn", "--no-control-socket", "-k", "gthread",
        "--threads", "4", "-w", "1", "-b", f"127.0.0.1:{port}", "--chdir", str(here.parent),
        "--log-level", "warning", "bench.flask_http:app",
    ]  # fmt: skip
    path = [str(here.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    if args.inline_tasks:
        env["BENCH_INLINE_TASKS"] = "1"
    server = subprocess.Popen(argv, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base + "/plain")
        _wrk(base + "/background", 1, args.threads, args.connections)  # warm up
        _wrk(base + "/plain", 1, args.threads, args.connections)
        print(f"bgtasks from {os.path.dirname(bgtasks.__file__)}", flush=True)
        routes = ["background", "executor", "thread", "plain"]
        if args.detail:
            routes += ["runtime_sync", "runtime_async", "hop", "hop_busy"]
        (worker,) = psutil.Process(server.pid).children()
        results: dict[str, list[float]] = {route: [] for route in routes}
        cpu: dict[str, list[float]] = {route: [] for route in routes}
        for round_no in range(args.rounds):
            for route in routes:
                before = worker.cpu_times()
                rps, non2xx = _wrk(f"{base}/{route}", args.duration, args.threads, args.connections)
                after = worker.cpu_times()
                used = (after.user + after.system) - (before.user + before.system)
                per_req = used / max(1.0, rps * args.duration) * 1e6
                results[route].append(rps)
                cpu[route].append(per_req)
                print(
                    f"round {round_no + 1} {route:>13}: {rps:9.0f} req/s  "
                    f"{per_req:6.1f} CPU us/req  (non-2xx: {non2xx})"
                )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
    plain_rps = statistics.median(results["plain"])
    for route in routes:
        rps = statistics.median(results[route])
        us = statistics.median(cpu[route])
        print(
            f"median {route:>13}: {rps:9.0f} req/s  {rps / plain_rps:5.2f}x plain  "
            f"{us:6.1f} worker CPU us/req"
        )
    bg = statistics.median(results["background"])
    bg_cpu = statistics.median(cpu["background"])
    notes = {"executor": "  (target >= 1.00x)", "thread": "", "plain": "  (reference)"}
    for other, note in notes.items():
        # Per round (the routes ran back to back), then the median of those ratios.
        paired = statistics.median(
            b / o for b, o in zip(results["background"], results[other], strict=True)
        )
        print(
            f"@background / {other:8}: {bg / statistics.median(results[other]):.2f}x req/s "
            f"(paired by round {paired:.2f}x), "
            f"{statistics.median(cpu[other]) / bg_cpu:.2f}x by worker CPU per request{note}"
        )


if __name__ == "__main__":
    main()
