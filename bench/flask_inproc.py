"""Where a ``@background`` Flask request's cost goes, without a server.

Run:  .venv/bin/python -m bench.flask_inproc [--requests 3000] [--rounds 3]

Calls ``bench.flask_http``'s app directly as a WSGI callable, one request at
a time on this thread, and prints the process CPU time per request for each
route (the background work included: the loop waits until the runtime is
idle), then the Python function calls per request (``cProfile``'s count, of
this thread only: with ``--inline`` that is all of them).

``--inline`` runs each sync task on the calling thread instead of a worker
thread (a diagnostic, not a mode bgtasks offers): it shows what the work
itself costs, apart from handing it to another thread.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from werkzeug.test import EnvironBuilder

from bench.flask_http import app
from bgtasks import _threads

ROUTES = ("plain", "background", "runtime_sync", "hop", "hop_busy")


def _request(path: str) -> Callable[[], None]:
    environ = EnvironBuilder(path=path, base_url="http://127.0.0.1:8000").get_environ()

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
    ) -> Callable[[bytes], object]:
        return len

    def call() -> None:
        body = app(dict(environ), start_response)
        for _ in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()

    return call


def _idle() -> None:
    rt = app.extensions["bgtasks"].runtime
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = rt.stats()
        if not stats.get("pending", 0) and not stats.get("running", 0):
            return
        time.sleep(0.001)
    raise SystemExit("the runtime did not go idle within 30 s")


def cpu_per_request(path: str, n: int) -> float:
    call = _request(path)
    t0 = time.process_time()
    for _ in range(n):
        call()
    _idle()
    return (time.process_time() - t0) / n * 1e6


def calls_per_request(path: str, n: int) -> float:
    call = _request(path)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n):
        call()
    _idle()
    profile.disable()
    return pstats.Stats(profile).total_calls / n  # type: ignore[attr-defined,no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per route and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inline", action="store_true", help="run sync tasks on this thread")
    args = parser.parse_args()
    if args.inline:
        _threads.ThreadPool.submit = lambda self, fn: fn()  # type: ignore[method-assign]
    for route in ROUTES:  # warm up
        cpu_per_request("/" + route, 300)
    cpu: dict[str, list[float]] = {route: [] for route in ROUTES}
    for _ in range(args.rounds):
        for route in ROUTES:
            cpu[route].append(cpu_per_request("/" + route, args.requests))
    plain = statistics.median(cpu["plain"])
    mode = "tasks inline" if args.inline else "tasks on worker threads"
    print(f"in-process, one request at a time, {mode}; medians of {args.rounds} rounds")
    for route in ROUTES:
        us = statistics.median(cpu[route])
        calls = calls_per_request("/" + route, 1000)
        print(
            f"{route:>13}: {us:6.1f} CPU us/req  (+{us - plain:5.1f} over plain)  "
            f"{calls:5.0f} Python calls/req"
        )


if __name__ == "__main__":
    main()
