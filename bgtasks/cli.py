"""The ``bgtasks`` command (also ``python -m bgtasks``).

- ``bgtasks worker MODULE:RUNTIME [--concurrency N]``: run durable work with the
  app's own runtime (its limits, hooks, retries and store) and no web server,
  until SIGTERM or SIGINT, then shut it down gracefully: ``beforeunload``, up to
  ``shutdown_grace``, and unfinished durable tasks go back to the queue.
- ``bgtasks migrate MODULE:RUNTIME``: create the store's tables (procrastinate's
  and bgtasks'); safe to run again.

``MODULE:RUNTIME`` names a ``bgtasks.Runtime`` (or a function returning one),
e.g. ``myapp.tasks:runtime``; the current directory is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ._runtime import Runtime

__all__ = ["load_runtime", "main"]

logger = logging.getLogger("bgtasks")


class UsageError(Exception):
    """Bad command-line input: the message says what to fix."""


def load_runtime(ref: str) -> Runtime:
    """The Runtime named by ``"module:attribute"`` (a callable is called)."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        msg = f"expected MODULE:RUNTIME (e.g. myapp.tasks:runtime), got {ref!r}"
        raise UsageError(msg)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        msg = f"cannot import {module_name!r}: {exc}"
        raise UsageError(msg) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            msg = f"module {module_name!r} has no attribute {attr!r}"
            raise UsageError(msg) from None
    if not isinstance(obj, Runtime) and callable(obj):
        obj = obj()
    if not isinstance(obj, Runtime):
        msg = f"{ref} is a {type(obj).__name__}, not a bgtasks.Runtime"
        raise UsageError(msg)
    return obj


def _shared_store(rt: Runtime, ref: str, what: str) -> Any:
    store = rt.store
    if not getattr(store, "dispatches_durable", False):
        msg = (
            f"`bgtasks {what}` needs a runtime whose store is shared by several hosts "
            f"(store='postgresql://...'); {ref} has {type(store).__name__}"
        )
        raise UsageError(msg)
    return store


async def _run_worker(rt: Runtime) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with rt:
        logger.info("bgtasks: worker %d consuming durable tasks from %r", os.getpid(), rt.store)
        await stop.wait()
        logger.info("bgtasks: worker %d stopping", os.getpid())
        rt.store.stop_consuming()  # type: ignore[attr-defined]  # a shared store (checked)
        # A second signal while draining leaves at once (the work is requeued by
        # the engine's stalled-job recovery).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, os._exit, 1)


def worker(ref: str, concurrency: int | None) -> int:
    rt = load_runtime(ref)
    store = _shared_store(rt, ref, "worker")
    if concurrency is not None:
        if concurrency < 1:
            msg = f"--concurrency must be >= 1, got {concurrency}"
            raise UsageError(msg)
        store.concurrency = concurrency
    rt.consume = True
    asyncio.run(_run_worker(rt))
    return 0


def migrate(ref: str) -> int:
    rt = load_runtime(ref)
    store = _shared_store(rt, ref, "migrate")
    made = asyncio.run(store.migrate())
    print(f"bgtasks: created {', '.join(made)}" if made else "bgtasks: tables are up to date")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bgtasks", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("worker", help="run durable work, with no web server")
    run.add_argument("runtime", metavar="MODULE:RUNTIME")
    run.add_argument("--concurrency", type=int, default=None, help="jobs run at once")
    run.add_argument("--log-level", default="INFO", help="bgtasks' log level (INFO)")
    mig = commands.add_parser("migrate", help="create or upgrade the store's tables")
    mig.add_argument("runtime", metavar="MODULE:RUNTIME")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "worker":
            logger.setLevel(args.log_level.upper())
            return worker(args.runtime, args.concurrency)
        return migrate(args.runtime)
    except UsageError as exc:
        parser.exit(2, f"bgtasks {args.command}: error: {exc}\n")
    except Exception as exc:  # a store that cannot open: say why, without a traceback
        from ._errors import StoreError

        if not isinstance(exc, StoreError):
            raise
        parser.exit(1, f"bgtasks {args.command}: error: {exc}\n")
