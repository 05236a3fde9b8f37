"""gunicorn settings for prometheus-client's multiprocess mode (see docs/observability.md)."""

from __future__ import annotations

from typing import Any

from prometheus_client import multiprocess


def child_exit(server: Any, worker: Any) -> None:
    # A worker that exits leaves its gauge files behind: mark them dead so a
    # "livesum" gauge (bgtasks_tasks) stops counting them.
    multiprocess.mark_process_dead(worker.pid)
