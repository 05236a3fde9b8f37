"""procrastinate as the engine: one procrastinate job per durable bgtasks task.

The job's only argument is the task id; the call itself (function, JSON
arguments, limits, retries) is in bgtasks' record. The store runs
procrastinate's own ``Worker`` on its loop. The job function does not run the
task: it offers it on the ``Desk``, where the runtime's durable part takes it
with ``Store.claim`` (so limits, hooks, retries and ``max_concurrency`` apply
as for any task), and holds the job until the runtime's outcome:

- the task finished (its final record is committed): the job succeeds;
- ``Store.release`` (graceful shutdown, or no room here): ``Requeue``, which
  the job's retry policy turns into "back in the queue now";
- ``Store.park``: ``Park``, back in the queue at ``wake_at``;
- procrastinate aborts the job (a ``DELETE`` on any host): the task is
  reported by ``Store.cancel_requests``, the runtime cancels it, the job ends
  aborted.

The engine owns the rest: claims (``fetch_job``), heartbeats, stalled-job
detection (``get_stalled_jobs``), retries (``retry_job``) and abort.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
from typing import TYPE_CHECKING

from procrastinate import BaseRetryStrategy, RetryDecision

from ..base import ClaimedTask

if TYPE_CHECKING:
    from procrastinate.jobs import Job

__all__ = ["JOB_TASK", "Busy", "Desk", "Held", "Park", "Requeue", "RetryPolicy"]

#: The procrastinate task every bgtasks job runs.
JOB_TASK = "bgtasks.run"
#: What a held job waits for: "finished", "requeue", "busy", or a wake_at (parked).
Outcome = str | float


class Requeue(Exception):
    """The runtime gave the task back (shutdown, or no room): queue it again now."""


class Busy(Exception):
    """The runtime had no room for the task (``max_pending``): queue it again soon."""


class Park(Exception):
    """The task sleeps (``step.sleep``): queue it again at ``wake_at``."""

    def __init__(self, wake_at: float) -> None:
        super().__init__(f"parked until {wake_at}")
        self.wake_at = wake_at


class RetryPolicy(BaseRetryStrategy):
    """procrastinate retries a job only to hand it back (Requeue) or to wake it
    later (Park); a task's own retries are bgtasks' (``retries=N``)."""

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, Requeue):
            return RetryDecision()  # now, for whichever worker fetches it first
        if isinstance(exception, Busy):
            return RetryDecision(retry_in={"seconds": 1})
        if isinstance(exception, Park):
            return RetryDecision(
                retry_at=dt.datetime.fromtimestamp(exception.wake_at, dt.timezone.utc)
            )
        return None


@dataclasses.dataclass(slots=True)
class Held:
    """A fetched job whose task is offered to, or run by, the runtime."""

    claimed: ClaimedTask
    done: asyncio.Future[Outcome]
    taken: bool = False  # handed to the runtime by claim()
    aborted: bool = False  # procrastinate aborted the job: the runtime must cancel it


class Desk:
    """The jobs this host's worker holds. Used on the store's loop only."""

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}
        self._ready: collections.deque[str] = collections.deque()

    def offer(self, claimed: ClaimedTask) -> Held:
        held = Held(claimed, asyncio.get_running_loop().create_future())
        self.held[claimed.entry.id] = held
        self._ready.append(claimed.entry.id)
        return held

    def take(self, limit: int) -> list[ClaimedTask]:
        out: list[ClaimedTask] = []
        while self._ready and len(out) < limit:
            held = self.held.get(self._ready.popleft())
            if held is not None and not held.taken and not held.done.done():
                held.taken = True
                out.append(held.claimed)
        return out

    def settle(self, task_id: str, outcome: Outcome) -> None:
        held = self.held.get(task_id)
        if held is not None and not held.done.done():
            held.done.set_result(outcome)

    def remove(self, task_id: str) -> None:
        self.held.pop(task_id, None)

    def aborted(self) -> list[str]:
        return [i for i, h in self.held.items() if h.aborted and h.taken and not h.done.done()]

    def requeue(self, *, taken: bool) -> None:
        """Give back the jobs not taken by the runtime (and, if ``taken``, all)."""
        for task_id, held in list(self.held.items()):
            if taken or not held.taken:
                self.settle(task_id, "requeue")
