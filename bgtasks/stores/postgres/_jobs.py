"""The job side of ``PostgresStore``: procrastinate's worker, the jobs it holds,
stalled-job recovery, and the Store methods that act through jobs (``claim``,
``release``, ``park``, ``request_cancel``, ``cancel_requests``)."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..._errors import StoreError
from ..._task import FINISHED, ErrorInfo
from ..base import ClaimedTask
from ..sqlite.rows import CLAIM_COLUMNS, claimed
from ._engine import JOB_TASK, Busy, Desk, Park, Requeue
from ._loop import LoopThread
from ._schema import TABLE

__all__ = ["JobsMixin"]

logger = logging.getLogger("bgtasks")

_OPEN = "status IN ('pending', 'running')"


class JobsMixin:
    """Mixed into ``PostgresStore``; the attributes below are its."""

    _io: LoopThread
    _pool: Any
    _app: Any
    _worker: Any
    _consumer: concurrent.futures.Future[None] | None
    _closing: bool
    _desk: Desk
    _dropped: set[str]
    _owned: set[str]
    _last_cancel_look: float
    queue: str
    concurrency: int
    fetch_poll: float
    heartbeat: float
    stalled_after: float
    max_crashes: int

    @property
    def _wait_bound(self) -> float:
        raise NotImplementedError

    def _side(self) -> None:
        raise NotImplementedError

    async def _flush_all(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the worker
    async def _consume(self) -> None:
        """procrastinate's worker, until close; restarted if the database went
        away under it (it stops itself when its listener fails)."""
        from procrastinate import worker

        self._side()
        recover = asyncio.ensure_future(self._recover_loop())
        try:
            while not self._closing:
                self._worker = worker.Worker(
                    self._app,
                    queues=[self.queue],
                    name=f"bgtasks-{threading.get_native_id()}",
                    concurrency=self.concurrency,
                    fetch_job_polling_interval=self.fetch_poll,
                    abort_job_polling_interval=self.fetch_poll,
                    shutdown_graceful_timeout=None,  # the runtime's shutdown_grace decides
                    delete_jobs="always",  # bgtasks' record keeps the outcome
                    install_signal_handlers=False,
                    update_heartbeat_interval=self.heartbeat,
                    stalled_worker_timeout=self.stalled_after,
                )
                try:
                    await self._worker.run()
                except Exception as exc:
                    if self._closing:
                        break
                    logger.warning("bgtasks: the job worker stopped (%s); restarting it", exc)
                    await asyncio.sleep(self.fetch_poll)
        finally:
            recover.cancel()

    async def _run_job(self, task_id: str) -> None:
        """One job: offer its task to the runtime, hold the job until it is done."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {CLAIM_COLUMNS}, status, cancel_requested FROM {TABLE} WHERE id = %s",
                (task_id,),
            )
            row = await cur.fetchone()
        if row is None:
            logger.warning("bgtasks: a job for task %s, which has no record; skipped", task_id)
            return
        status, cancel = row[-2], row[-1]
        if status in FINISHED:
            return
        if cancel:
            await self._finish(task_id, "cancelled", None)
            return
        try:
            claim = claimed(row[:-2])
        except ValueError as exc:
            error = ErrorInfo(type="StoreError", message=f"cannot run task {task_id}: {exc}")
            await self._finish(task_id, "failed", error)
            return
        if self._closing:
            raise Requeue(f"task {task_id}: this host is shutting down")
        self._dropped.discard(task_id)
        held = self._desk.offer(claim)
        try:
            while True:
                try:
                    outcome = await asyncio.shield(held.done)
                    break
                except asyncio.CancelledError:
                    if held.done.cancelled():
                        raise
                    if not held.taken:  # still waiting here: nothing runs it
                        held.done.set_result("finished")
                        await asyncio.shield(self._finish(task_id, "cancelled", None))
                        raise
                    held.aborted = True  # cancel_requests() tells the runtime
        finally:
            self._desk.remove(task_id)
        if held.aborted:
            raise asyncio.CancelledError
        if outcome == "requeue":
            raise Requeue(f"task {task_id} was given back")
        if outcome == "busy":
            raise Busy(f"task {task_id}: no room on this host")
        if isinstance(outcome, float):
            raise Park(outcome)

    async def _finish(self, task_id: str, status: str, error: ErrorInfo | None) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                f"UPDATE {TABLE} SET status = %s, error = %s, finished_at = %s, "
                f"updated_at = now() WHERE id = %s AND {_OPEN}",
                (
                    status,
                    None if error is None else error.model_dump_json(),
                    time.time(),
                    task_id,
                ),
            )

    async def _recover_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.heartbeat, self.fetch_poll))
            try:
                await self._io.guard(self.recover_stalled())
            except StoreError as exc:
                logger.warning("bgtasks: could not look for stalled jobs: %s", exc)

    async def recover_stalled(self) -> int:
        """Jobs of workers that stopped beating run again (procrastinate's
        ``get_stalled_jobs`` and ``retry_job``); a task past ``max_crashes`` fails
        instead. One host at a time (an advisory lock). Returns how many."""
        from procrastinate.jobs import Status

        manager = self._app.job_manager
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(hashtext('bgtasks.recover'))"
            )
            got = await cur.fetchone()
            if not got or not got[0]:
                return 0
            stalled = list(
                await manager.get_stalled_jobs(
                    task_name=JOB_TASK, seconds_since_heartbeat=self.stalled_after
                )
            )
            for job in stalled:
                task_id = job.task_kwargs.get("task_id")
                cur = await conn.execute(
                    f"UPDATE {TABLE} SET crashes = crashes + 1, updated_at = now() "
                    "WHERE id = %s RETURNING crashes",
                    (task_id,),
                )
                row = await cur.fetchone()
                crashes = row[0] if row else 0
                if crashes > self.max_crashes:
                    error = ErrorInfo(
                        type="WorkerCrashed",
                        message=(
                            f"the worker running this task died {crashes} times (killed, out "
                            f"of memory, or its host lost); it is not run again "
                            f"(max_crashes={self.max_crashes})"
                        ),
                    )
                    await conn.execute(
                        f"UPDATE {TABLE} SET status = 'failed', error = %s, finished_at = %s "
                        f"WHERE id = %s AND {_OPEN}",
                        (error.model_dump_json(), time.time(), task_id),
                    )
                    await manager.finish_job(job, status=Status.FAILED, delete_job=True)
                else:
                    await conn.execute(
                        f"UPDATE {TABLE} SET status = 'pending' WHERE id = %s AND {_OPEN}",
                        (task_id,),
                    )
                    await manager.retry_job(job)
            if stalled:
                logger.warning(
                    "bgtasks: %d task(s) whose worker stopped beating go back to the queue",
                    len(stalled),
                )
            return len(stalled)

    # ------------------------------------------------------------------ claims
    def claim(self, limit: int) -> concurrent.futures.Future[builtins.list[ClaimedTask]]:
        """Tasks of jobs this host's worker fetched (the worker starts at the
        first claim: a runtime with ``consume=False`` never claims)."""
        return self._io.submit(self._claim(limit))

    async def _claim(self, limit: int) -> builtins.list[ClaimedTask]:
        if self._consumer is None and not self._closing:
            self._consumer = asyncio.run_coroutine_threadsafe(
                self._consume(), asyncio.get_running_loop()
            )
        taken = self._desk.take(limit) if limit > 0 else []
        self._owned.update(c.entry.id for c in taken)
        return taken

    def release(self, ids: Sequence[str]) -> concurrent.futures.Future[None]:
        return self._io.submit(self._release(list(ids)))

    async def _release(self, ids: builtins.list[str]) -> None:
        held = [i for i in ids if i in self._desk.held]
        if not held:
            return
        self._dropped.update(held)
        async with self._pool.connection() as conn:
            await conn.execute(
                f"UPDATE {TABLE} SET status = 'pending', finished_at = NULL, updated_at = now() "
                f"WHERE id = ANY(%s) AND {_OPEN}",
                (held,),
            )
        # At shutdown, back in the queue now; refused for room, in a second (so
        # that a full host does not fetch it again at once).
        outcome = "requeue" if self._closing else "busy"
        for task_id in held:
            self._owned.discard(task_id)
            self._desk.settle(task_id, outcome)

    def park(self, task_id: str, wake_at: float) -> concurrent.futures.Future[None]:
        return self._io.submit(self._park(task_id, wake_at))

    async def _park(self, task_id: str, wake_at: float) -> None:
        await self._flush_all()  # the record as the task left it (its steps), then drop
        self._dropped.add(task_id)
        self._owned.discard(task_id)
        async with self._pool.connection() as conn:
            await conn.execute(
                f"UPDATE {TABLE} SET status = 'pending', wake_at = %s, updated_at = now() "
                f"WHERE id = %s AND {_OPEN}",
                (wake_at, task_id),
            )
        self._desk.settle(task_id, float(wake_at))

    def request_cancel(self, task_id: str) -> bool:
        """A queued job is cancelled at once; a running one is aborted through
        procrastinate, which tells the worker holding it."""
        if self._io.loop is None:
            return False
        return self._io.call(self._request_cancel(task_id), self._wait_bound)

    async def _request_cancel(self, task_id: str) -> bool:
        from procrastinate.jobs import Status

        manager = self._app.job_manager
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                f"UPDATE {TABLE} SET cancel_requested = true, updated_at = now() "
                f"WHERE id = %s AND {_OPEN} RETURNING job_id",
                (task_id,),
            )
            row = await cur.fetchone()
            if row is None:
                return False
            job_id = row[0]
            if job_id is not None and await manager.cancel_job_by_id_async(
                job_id, abort=True, connection=conn
            ):
                status = await manager.get_job_status_async(job_id, connection=conn)
                if status is Status.CANCELLED:  # it was still queued: no worker will see it
                    await conn.execute(
                        f"UPDATE {TABLE} SET status = 'cancelled', finished_at = %s "
                        f"WHERE id = %s AND {_OPEN}",
                        (time.time(), task_id),
                    )
        return True

    def cancel_requests(self) -> concurrent.futures.Future[builtins.list[str]]:
        return self._io.submit(self._cancel_requests())

    async def _cancel_requests(self) -> builtins.list[str]:
        found = self._desk.aborted()
        # Tasks with no job (not durable) have only the flag: look once a second.
        others = [i for i in self._owned if i not in self._desk.held]
        now = time.monotonic()
        if others and now - self._last_cancel_look >= 1.0:
            self._last_cancel_look = now
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    f"SELECT id FROM {TABLE} WHERE id = ANY(%s) AND cancel_requested AND {_OPEN}",
                    (others,),
                )
                found += [task_id for (task_id,) in await cur.fetchall()]
        return found
