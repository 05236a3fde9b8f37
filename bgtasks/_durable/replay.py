"""Running journaled work again, and cancel requests from other processes.

The runtime's durable part, against any durable ``Store`` through its
protocol: at start and then every ``store.poll`` seconds it claims journaled
tasks whose owner is gone (or whose ``wake_at`` has passed) and runs them
here; every second (at most ``store.poll``) it asks for cancel requests on
the tasks this process owns and cancels them. At a graceful shutdown,
``release`` puts unfinished durable tasks back in the queue. A look that
fails is logged and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from .._errors import RegistryFull, StoreError
from .._limits import Limits
from .._spec import Spec, is_async_callable
from .._state import ctl_of
from .._steps import restore
from .._task import Progress
from .codec import codec_of, resolve

if TYPE_CHECKING:
    from .._runtime import Runtime
    from ..stores.base import ClaimedTask, Store

__all__ = ["CLAIM_BATCH", "Replay", "release", "replay_once"]

logger = logging.getLogger("bgtasks")

#: Most claimable tasks one look takes; the next look takes the rest.
CLAIM_BATCH = 100
#: Longest time between two looks for cancel requests.
CANCEL_POLL = 1.0


class Replay:
    """The claim loop and the cancel-request loop of one runtime on a durable store."""

    def __init__(self, rt: Runtime, store: Store) -> None:
        self.rt = rt
        self.store = store
        self._tasks: list[asyncio.Task[None]] = []
        # Wake-up times of tasks parked here (a heap of Unix times): one loop
        # timer, for the earliest, makes the claim loop look then, not a poll later.
        self._wakes: list[float] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._nudge = asyncio.Event()

    def nudge_at(self, when: float) -> None:
        """Look for claimable work at ``when`` (a task parked until then)."""
        heapq.heappush(self._wakes, when)
        self._arm()

    def _arm(self) -> None:
        now = time.time()
        while self._wakes and self._wakes[0] <= now:
            heapq.heappop(self._wakes)
            self._nudge.set()
        if not self._wakes or self._wakes[0] >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._wakes[0]
        loop = asyncio.get_running_loop()
        # A little after: the store compares wake_at with its own clock reading.
        self._timer = loop.call_later(self._timer_at - now + 0.01, self._ring)

    def _ring(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._arm()

    async def start(self) -> None:
        """Run what is claimable now, then keep looking. Raises (having started
        nothing) if the first look fails."""
        await replay_once(self.rt, self.store)
        self._tasks = [
            asyncio.ensure_future(self._claim_loop()),
            asyncio.ensure_future(self._cancel_loop()),
        ]

    async def stop(self) -> None:
        """Stop looking (the runtime is shutting down)."""
        tasks, self._tasks = self._tasks, []
        if self._timer is not None:
            self._timer.cancel()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _claim_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), self.store.poll)
            self._nudge.clear()
            try:
                more = True
                while more:  # a full batch: there may be more waiting
                    more = await replay_once(self.rt, self.store) >= CLAIM_BATCH
            except StoreError as exc:
                logger.warning("bgtasks: could not look for journaled tasks to run: %s", exc)
            except Exception:
                logger.exception("bgtasks: looking for journaled tasks to run failed")

    async def _cancel_loop(self) -> None:
        rt = self.rt
        while True:
            await asyncio.sleep(min(CANCEL_POLL, self.store.poll))
            try:
                ids = await asyncio.wrap_future(self.store.cancel_requests())
            except StoreError as exc:
                logger.warning("bgtasks: could not look for cancel requests: %s", exc)
                continue
            except Exception:
                logger.exception("bgtasks: looking for cancel requests failed")
                continue
            for task_id in ids:
                if rt.handle(task_id) is not None:
                    rt.cancel(task_id)


async def replay_once(rt: Runtime, store: Store) -> int:
    """Claim journaled tasks and run them here; returns how many were claimed."""
    if not rt.started or not rt.consume:  # Runtime(consume=False): enqueue only
        return 0
    limit = CLAIM_BATCH
    if rt.max_pending is not None:
        limit = min(limit, rt.max_pending - rt._admission.unfinished)
    claimed = await asyncio.wrap_future(store.claim(limit))
    refused: list[str] = []
    for task in claimed:
        kept: dict[str, str] = {}
        if task.entry.durable:
            try:
                kept = await asyncio.wrap_future(store.kept_steps(task.entry.id))
            except StoreError:  # it runs, and its steps run again (at-least-once)
                logger.exception("bgtasks: could not read the kept steps of %s", task.entry.id)
        if not _adopt(rt, task, kept):
            refused.append(task.entry.id)
    if refused:  # full after all: back in the queue for whoever has room
        store.release(refused)
    if claimed:
        logger.info("bgtasks: running %d journaled task(s) again", len(claimed))
    return len(claimed)


async def release(store: Store, ids: Sequence[str]) -> None:
    """Shutdown: put these unfinished tasks back in the queue (durable ones;
    the store ignores the rest), unowned, for the next runtime."""
    if not ids or not store.durable:
        return
    try:
        await asyncio.wrap_future(store.release(ids))
    except StoreError:
        logger.exception(
            "bgtasks: could not put %d durable task(s) back in the queue; the next "
            "runtime will find them once this process's lease has expired",
            len(ids),
        )


def _adopt(rt: Runtime, claimed: ClaimedTask, kept: dict[str, str]) -> bool:
    entry = claimed.entry
    try:
        spec = _spec_of(rt, claimed)
    except Exception as exc:
        # Reported through the normal path: the record fails with this error,
        # unhandledrejection fires, the error is logged.
        spec = Spec("coro", _raise(exc))
    try:
        ticket = rt.reserve(entry.name, spec, task_id=entry.id)
    except RegistryFull:
        if spec.kind == "coro":
            spec.fn.close()
        return False
    t = ticket.handle
    t._created_at = entry.created_at
    if rt._observers:  # a new trace, linked to the submitter's (entry.context)
        observed = rt._runner.observed(t)
        observed.created_at = entry.created_at
        observed.durable, observed.replayed = True, True
        observed.origin = dict(entry.context) if entry.context else None
    t._attempts = claimed.attempts
    t._progress = _progress(claimed.progress)
    if entry.durable:
        restore(t, kept, claimed.steps)
    waiters = rt._parked_waiters.pop(entry.id, None)
    if waiters:  # it parked here, and whoever waited on it still does
        ctl_of(t).callbacks.extend(waiters)
    ticket.launch()
    return True


def _progress(raw: str | None) -> Progress | None:
    if raw is None:
        return None
    try:
        return Progress.model_validate_json(raw)
    except ValueError:  # shown progress only: a bad one is dropped, the task runs
        return None


def _spec_of(rt: Runtime, claimed: ClaimedTask) -> Spec:
    entry = claimed.entry
    fn = resolve(entry.target or "")
    given: dict[str, Any] = {k: v for k, v in (entry.limits or {}).items() if v is not None}
    limits = Limits(**given)
    args, kwargs = codec_of(fn).load(entry.payload or "{}")
    kind: Any = "async" if is_async_callable(fn) else "sync"
    if entry.isolation == "process":
        kind = "process"
    return Spec(
        kind,
        fn,
        args,
        kwargs,
        rt._task_limits(limits, inline=kind != "process"),
        entry.retries,
    )


async def _raise(exc: BaseException) -> NoReturn:
    raise exc
