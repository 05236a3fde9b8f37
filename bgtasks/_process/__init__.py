"""``isolation="process"``: worker processes that run tasks under hard per-task OS limits.

The modules, each importing only the ones listed after it:

- ``pool``: ``ProcessPool``, what the runtime uses: hands tasks to workers and
  turns their replies into results or exceptions;
- ``cpuwatch``: the 90% warning of a task's CPU budget, seen from the parent;
- ``worker``: one worker process seen from the parent's event loop;
- ``request``: the request the parent sends (the function by name, its arguments);
- ``checks``: refusing early a function or arguments a worker could not take;
- ``errors``: how a failure in a worker reaches the parent as an exception;
- ``child``: the loop each worker process runs (its target is ``child.main``);
- ``limits``: the per-task CPU and memory limits inside a worker;
- ``current``: what a task sees inside a worker (``in_worker``, ``worker_task``);
- ``wire``: the messages between the two sides.
"""

from __future__ import annotations

from .checks import check_importable as check_importable
from .checks import check_picklable as check_picklable
from .current import WorkerTask as WorkerTask
from .current import in_worker as in_worker
from .current import report_progress_in_worker as report_progress_in_worker
from .current import worker_task as worker_task
from .errors import RemoteTraceback as RemoteTraceback
from .errors import WorkerTaskError as WorkerTaskError
from .pool import ProcessPool as ProcessPool

__all__ = [
    "ProcessPool",
    "RemoteTraceback",
    "WorkerTask",
    "WorkerTaskError",
    "check_importable",
    "check_picklable",
    "in_worker",
    "report_progress_in_worker",
    "worker_task",
]
