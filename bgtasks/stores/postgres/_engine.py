"""procrastinate as the engine: one procrastinate job runs one durable bgtasks task.

The job's only argument is the task id; everything else (the function, its
JSON arguments, its limits and retries) is in bgtasks' record. A worker that
fetches the job hands the task to its runtime (``run_claimed``), so limits,
hooks, retries and ``max_concurrency`` apply exactly as for any other task.

What the engine owns, and bgtasks does not re-implement: the queue and its
claims (``fetch_job``), worker heartbeats and stalled-job detection
(``get_stalled_jobs``), retries of a job (``retry_job``), and abort
(``cancel_job_by_id(abort=True)``, delivered to the worker that runs the job).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import TYPE_CHECKING, Any

from procrastinate import BaseRetryStrategy, RetryDecision

from ..._errors import RegistryFull
from ..._runtime import Spec
from ..sqlite import ClaimedTask

if TYPE_CHECKING:
    from procrastinate.jobs import Job

    from ..._runtime import Runtime
    from ..._task import TaskHandle

__all__ = ["JOB_TASK", "Busy", "Requeue", "RetryPolicy", "bridge", "run_claimed"]

#: The procrastinate task every bgtasks job runs.
JOB_TASK = "bgtasks.run"


class Requeue(Exception):
    """This host stopped the task (shutdown): the job goes back to the queue."""


class Busy(Exception):
    """This host's runtime is full (``max_pending``): try again soon."""


class RetryPolicy(BaseRetryStrategy):
    """procrastinate retries a job only to move it to another host (Requeue) or
    to wait for room (Busy); a task's own retries are bgtasks' (``retries=N``)."""

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, Requeue):
            return RetryDecision()  # now, for whichever worker fetches it first
        if isinstance(exception, Busy):
            return RetryDecision(retry_in={"seconds": 1})
        return None


def run_claimed(rt: Runtime, claimed: ClaimedTask) -> TaskHandle:
    """Admit and launch a claimed durable task on ``rt`` (call on the runtime's loop).

    Raises ``RegistryFull`` when the runtime has no room or is shutting down.
    """
    from ... import _durable  # the durable module imports the runtime: import late

    try:
        spec = _durable._spec_of(rt, claimed)
    except Exception as exc:
        # Reported through the normal path: the record fails with this error.
        spec = Spec("coro", _durable._raise(exc))
    try:
        t = rt._admit(claimed.name, spec, task_id=claimed.id)
    except RegistryFull:
        if spec.kind == "coro":
            spec.fn.close()
        raise
    t._created_at = claimed.created_at
    t._attempts = claimed.attempts
    t._progress = claimed.progress
    rt._launch(t)
    return t


async def _on_loop(fn: Any, *args: Any) -> Any:
    return fn(*args)


async def bridge(
    rt: Runtime, claimed: ClaimedTask, requeued: set[str], on_closing: Any
) -> None:
    """The body of a job, on the store's loop: run the task on the runtime's loop
    and wait for it. A cancelled job (abort: a ``DELETE`` on any host) cancels the
    task; a task this host stopped at shutdown raises ``Requeue``."""
    loop = rt._loop
    assert loop is not None
    start: concurrent.futures.Future[TaskHandle] = asyncio.run_coroutine_threadsafe(
        _on_loop(run_claimed, rt, claimed), loop
    )
    started = asyncio.wrap_future(start)
    aborted = False
    try:
        t = await asyncio.shield(started)
    except asyncio.CancelledError:
        aborted = True
        try:
            t = await started
        except RegistryFull:
            raise asyncio.CancelledError from None
    except RegistryFull:
        if rt._state != "started":
            on_closing()
            raise Requeue(f"task {claimed.id}: this host is shutting down") from None
        raise Busy(f"task {claimed.id}: this host is full (max_pending)") from None
    if aborted:
        loop.call_soon_threadsafe(rt.cancel, t.id)
    done = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(t.wait(), loop))
    while True:
        try:
            await asyncio.shield(done)
            break
        except asyncio.CancelledError:
            if done.cancelled():
                raise
            aborted = True
            loop.call_soon_threadsafe(rt.cancel, t.id)
    if t.id in requeued:
        raise Requeue(f"task {t.id} was stopped by this host's shutdown")
    if aborted:
        raise asyncio.CancelledError
