"""Many hosts: task records in PostgreSQL, durable work run by procrastinate.

``Runtime(store="postgresql://user:password@host:5432/db")`` (extra
``bgtasks[postgres]``). Every host's runtime shares one table of records, so
any host answers the status route, cancels, and sees idempotency keys. A
durable call commits its record and a procrastinate job in one transaction
before it returns; whichever host consumes (``Runtime(consume=True)``, the
default, or ``bgtasks worker MODULE:RUNTIME``) fetches the job and runs the
task under its own runtime. Queue, claims, heartbeats, stalled-job recovery
and abort are procrastinate's.

All database I/O runs on one event loop in a thread of its own (the store's
loop), so neither the runtime's loop nor a WSGI thread ever waits on a socket
it does not own. Create the tables once with ``bgtasks migrate MODULE:RUNTIME``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..._errors import StoreError
from ..._task import FINISHED, ErrorInfo, Progress, TaskRecord
from .._journal import JournalEntry
from ..sqlite import ClaimedTask
from ._engine import JOB_TASK, RetryPolicy, bridge
from ._schema import TABLE, create_tables, missing_tables

if TYPE_CHECKING:
    from ..._hooks import BeforeUnloadEvent
    from ..._runtime import Runtime
    from ..._task import TaskHandle

__all__ = ["PostgresStore"]

logger = logging.getLogger("bgtasks")
T = TypeVar("T")

_COLUMNS = (
    "id, name, status, created_at, started_at, finished_at, attempts, error, result, progress"
)
_OPEN = "status IN ('pending', 'running')"
_SAVE = f"""
INSERT INTO {TABLE} (id, name, status, created_at, started_at, finished_at, attempts,
                     error, result, progress)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, started_at = EXCLUDED.started_at,
    finished_at = EXCLUDED.finished_at, attempts = EXCLUDED.attempts,
    error = EXCLUDED.error, result = EXCLUDED.result, progress = EXCLUDED.progress,
    updated_at = now()
WHERE {TABLE}.status IN ('pending', 'running')
"""
_JOURNAL = f"""
INSERT INTO {TABLE} (id, name, status, created_at, durable, target, payload, options,
                     idempotency_key)
VALUES (%s, %s, 'pending', %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING id
"""
#: Options read from the store URL's query string (the rest goes to libpq).
_URL_OPTIONS = {
    "pool_size": int,
    "concurrency": int,
    "journal_timeout": float,
    "connect_timeout": float,
    "poll": float,
    "heartbeat": float,
    "stalled_after": float,
    "max_crashes": int,
}


class PostgresStore:
    """Records in PostgreSQL shared by every host; durable work as procrastinate jobs.

    - ``pool_size``: connections this process opens at most.
    - ``concurrency``: jobs this host's worker runs at once (``max_concurrency``
      still bounds what runs).
    - ``journal_timeout``: seconds a durable call waits for its commit before it
      is refused (503 under an adapter).
    - ``poll``: seconds between two looks for jobs and cancel requests when no
      notification came.
    - ``heartbeat`` / ``stalled_after``: a worker beats every ``heartbeat``
      seconds; one silent for ``stalled_after`` seconds is dead and its jobs run
      again elsewhere.
    - ``max_crashes``: a task whose worker died this many times more is failed
      with ``WorkerCrashed`` instead of run again.
    """

    durable = True
    #: A durable call is run by whichever host fetches its job, not by the caller.
    dispatches_durable = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        concurrency: int = 10,
        journal_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        poll: float = 1.0,
        heartbeat: float = 5.0,
        stalled_after: float = 30.0,
        max_crashes: int = 3,
        queue: str = "bgtasks",
    ) -> None:
        if not url.startswith(("postgresql://", "postgres://")):
            msg = f"a PostgreSQL store URL starts with postgresql://, got {url!r}."
            raise ValueError(msg)
        for value, what in ((pool_size, "pool_size"), (concurrency, "concurrency")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{what} must be an integer >= 1, got {value!r}."
                raise ValueError(msg)
        if heartbeat >= stalled_after:
            msg = (
                f"heartbeat ({heartbeat:g}s) must be shorter than stalled_after "
                f"({stalled_after:g}s), or live workers would be taken for dead."
            )
            raise ValueError(msg)
        self.url = url
        self.pool_size = pool_size
        self.concurrency = concurrency
        self.journal_timeout = float(journal_timeout)
        self.connect_timeout = float(connect_timeout)
        self.poll = float(poll)
        self.heartbeat = float(heartbeat)
        self.stalled_after = float(stalled_after)
        self.max_crashes = int(max_crashes)
        self.queue = queue
        parts = urllib.parse.urlsplit(url)
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
        self._runtime: Runtime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: Any = None
        self._app: Any = None
        self._job_task: Any = None
        self._worker: Any = None
        self._consumer: concurrent.futures.Future[None] | None = None
        self._watcher: concurrent.futures.Future[None] | None = None
        self._closing = False
        self._dirty: dict[str, TaskHandle] = {}
        self._dirty_lock = threading.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self._sides: set[asyncio.Task[Any]] = set()  # the side loops, on the store's loop
        self._jobs: set[str] = set()  # tasks this host runs for a job
        self._requeued: set[str] = set()  # ... that its shutdown stopped: back to the queue

    def __repr__(self) -> str:
        return f"<PostgresStore {self.where}>"

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """``postgresql://...?concurrency=4&max_crashes=3`` (see the class for the options)."""
        parts = urllib.parse.urlsplit(url)
        kept: list[tuple[str, str]] = []
        options: dict[str, Any] = {}
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            convert = _URL_OPTIONS.get(key)
            if convert is None:
                kept.append((key, value))
                continue
            try:
                options[key] = convert(value)
            except ValueError:
                msg = f"store URL option {key}={value!r} is not a {convert.__name__}."
                raise ValueError(msg) from None
        clean = parts._replace(query=urllib.parse.urlencode(kept)).geturl()
        return cls(clean, **options)

    # ------------------------------------------------------------------ the store's loop
    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                # Whatever is left (a side loop, a flush) ends here, not half-way.
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="bgtasks-postgres", daemon=True)
        self._thread.start()
        ready.wait(10)
        self._loop = loop

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = None
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        loop = self._loop
        if loop is None:
            coro.close()
            fut: concurrent.futures.Future[T] = concurrent.futures.Future()
            fut.set_exception(StoreError(f"the PostgreSQL store {self.where} is not open"))
            return fut
        return asyncio.run_coroutine_threadsafe(self._guard(coro), loop)

    async def _guard(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro``; what the driver raises becomes a StoreError naming the server."""
        try:
            return await coro
        except StoreError:
            raise
        except Exception as exc:
            if not _is_db_error(exc):
                raise
            msg = (
                f"PostgreSQL at {self.where} is unreachable or failed "
                f"({type(exc).__name__}: {str(exc).strip() or 'no detail'})"
            )
            raise StoreError(msg) from exc

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the store's loop and wait (never from that loop's thread)."""
        if self._thread is threading.current_thread():
            coro.close()
            msg = "a blocking PostgresStore call was made from the store's own loop"
            raise RuntimeError(msg)
        fut = self._submit(coro)
        try:
            return fut.result(self.journal_timeout + self.connect_timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            msg = f"PostgreSQL at {self.where} did not answer in time"
            raise StoreError(msg) from None

    # ------------------------------------------------------------------ lifecycle
    async def open(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._closing = False
        self._start_loop()
        try:
            await asyncio.wrap_future(self._submit(self._open()))
        except BaseException:
            await asyncio.wrap_future(self._submit(self._close_pool()))
            self._stop_loop()
            raise

    async def _open(self) -> None:
        import procrastinate
        import psycopg_pool

        pool = psycopg_pool.AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.journal_timeout,
            kwargs={"connect_timeout": max(1, round(self.connect_timeout))},
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            name="bgtasks",
        )
        self._pool = pool
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
        except psycopg_pool.PoolTimeout as exc:
            msg = (
                f"cannot connect to PostgreSQL at {self.where} within "
                f"{self.connect_timeout:g}s; check that it runs and that the store URL "
                "(user, password, host, port, database) is right"
            )
            raise StoreError(msg) from exc
        async with pool.connection() as conn:
            missing = await missing_tables(conn)
        if missing:
            msg = (
                f"the database {self.where} has no {' and no '.join(missing)} table: run "
                "`bgtasks migrate MODULE:RUNTIME` once (or `await store.migrate()`) before "
                "starting the app"
            )
            raise StoreError(msg)
        app = procrastinate.App(connector=procrastinate.PsycopgConnector())
        await app.open_async(pool)
        self._app = app

        @app.task(name=JOB_TASK, queue=self.queue, pass_context=True, retry=RetryPolicy())
        async def run_task(context: procrastinate.JobContext, task_id: str) -> None:
            await self._run_job(task_id)

        self._job_task = run_task

    async def started(self, runtime: Runtime) -> None:
        runtime.on("beforeunload", self._on_unload)
        if getattr(runtime, "consume", True):
            self._consumer = self._submit(self._consume())
        self._watcher = self._submit(self._watch())

    def _on_unload(self, event: BeforeUnloadEvent) -> None:
        if event.reason == "shutdown":
            self.stop_consuming()

    def stop_consuming(self) -> None:
        """Take no new job (shutdown begins); running ones finish or go back."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stop_worker)

    def _stop_worker(self) -> None:
        self._closing = True
        if self._worker is not None:
            self._worker.stop()

    async def before_cancel(self, runtime: Runtime, tasks: Sequence[TaskHandle]) -> None:
        """Tasks run for a job go back to the queue instead of being cancelled."""
        self._requeued.update(t._id for t in tasks if t._id in self._jobs)

    async def close(self, runtime: Runtime) -> None:
        self.stop_consuming()
        consumer = self._consumer
        if consumer is not None:  # its jobs have ended with the runtime's tasks
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(consumer)), 10.0)
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._submit(self._stop_sides()))
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._submit(self._flush_all()))
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._submit(self._close_pool()))
        self._stop_loop()

    def _side(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._sides.add(task)

    async def _stop_sides(self) -> None:
        sides, self._sides = self._sides, set()
        for task in sides:
            task.cancel()
        await asyncio.gather(*sides, return_exceptions=True)

    async def _close_pool(self) -> None:
        app, pool = self._app, self._pool
        self._app = self._pool = None
        if app is not None:
            with contextlib.suppress(Exception):
                await app.close_async()
        if pool is not None:
            await pool.close()

    # ------------------------------------------------------------------ consuming jobs
    async def _consume(self) -> None:
        """Run procrastinate's worker until shutdown; restart it if the database
        went away under it (it stops itself when its listener fails)."""
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
                    fetch_job_polling_interval=self.poll,
                    abort_job_polling_interval=self.poll,
                    shutdown_graceful_timeout=None,  # the runtime's shutdown_grace decides
                    delete_jobs="always",  # bgtasks' record keeps the outcome
                    install_signal_handlers=False,
                    update_heartbeat_interval=self.heartbeat,
                    stalled_worker_timeout=self.stalled_after,
                )
                try:
                    await self._worker.run()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self._closing:
                        break
                    logger.warning("bgtasks: the job worker stopped (%s); restarting it", exc)
                    await asyncio.sleep(self.poll)
        finally:
            recover.cancel()

    async def _run_job(self, task_id: str) -> None:
        rt = self._runtime
        assert rt is not None
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT name, created_at, attempts, target, payload, options, progress, "
                f"status, cancel_requested FROM {TABLE} WHERE id = %s",
                (task_id,),
            )
            row = await cur.fetchone()
        if row is None:
            logger.warning("bgtasks: job for task %s, which has no record; skipped", task_id)
            return
        name, created, attempts, target, payload, options, progress, status, cancel = row
        if status in FINISHED:
            return
        if cancel:
            await self._set_cancelled(task_id)
            return
        claimed = ClaimedTask(
            id=task_id,
            name=name,
            created_at=created,
            attempts=attempts,
            target=target or "",
            payload=payload or "{}",
            options=options or "{}",
            progress=None if progress is None else Progress.model_validate(progress),
        )
        self._jobs.add(task_id)
        try:
            await bridge(rt, claimed, self._requeued, self.stop_consuming)
        except asyncio.CancelledError:
            await asyncio.shield(self._set_cancelled(task_id))
            raise
        finally:
            self._jobs.discard(task_id)
            self._requeued.discard(task_id)

    async def _set_cancelled(self, task_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                f"UPDATE {TABLE} SET status = 'cancelled', finished_at = %s, updated_at = now() "
                f"WHERE id = %s AND {_OPEN}",
                (time.time(), task_id),
            )

    async def _recover_loop(self) -> None:
        while True:
            await asyncio.sleep(max(self.heartbeat, self.poll))
            try:
                await self._guard(self.recover_stalled())
            except StoreError as exc:
                logger.warning("bgtasks: could not look for stalled jobs: %s", exc)

    async def recover_stalled(self) -> int:
        """Run again the jobs of workers that stopped beating (procrastinate's
        ``get_stalled_jobs`` + ``retry_job``); fail those past ``max_crashes``.
        One host at a time does it (an advisory lock). Returns how many it handled."""
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

    async def _watch(self) -> None:
        """Cancel this host's own tasks that another host asked to cancel (tasks run
        for a job also get procrastinate's abort; this covers the others)."""
        rt = self._runtime
        assert rt is not None
        self._side()
        while True:
            await asyncio.sleep(self.poll)
            ids = [i for i, t in list(rt._registry.items()) if t._status not in FINISHED]
            if not ids:
                continue
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(
                        f"SELECT id FROM {TABLE} WHERE id = ANY(%s) AND cancel_requested "
                        f"AND {_OPEN}",
                        (ids,),
                    )
                    rows = await cur.fetchall()
            except Exception as exc:
                logger.debug("bgtasks: could not look for cancel requests: %s", exc)
                continue
            loop = rt._loop
            for (task_id,) in rows:
                if loop is not None:
                    loop.call_soon_threadsafe(rt.cancel, task_id)

    # ------------------------------------------------------------------ writes
    def save(self, task: TaskHandle) -> None:
        with self._dirty_lock:
            first = not self._dirty
            self._dirty[task._id] = task
        loop = self._loop
        if first and loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._schedule_flush)

    def _schedule_flush(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_all())

    async def _flush_all(self) -> None:
        while True:
            with self._dirty_lock:
                batch, self._dirty = self._dirty, {}
            if not batch or self._pool is None:
                return
            rows = [_snapshot(t, t._id in self._requeued) for t in batch.values()]
            try:
                async with (
                    self._pool.connection() as conn,
                    conn.transaction(),
                    conn.cursor() as cur,
                ):
                    await cur.executemany(_SAVE, rows)
            except Exception as exc:
                logger.warning(
                    "bgtasks: could not save %d task record(s) to %s (%s); retrying",
                    len(rows),
                    self.where,
                    exc,
                )
                with self._dirty_lock:
                    batch.update(self._dirty)
                    self._dirty = batch
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        """Wait until every record saved so far is committed (for tests and tools)."""
        await asyncio.wrap_future(self._submit(self._flush_all()))

    def journal(
        self, runtime: Runtime, entry: JournalEntry
    ) -> concurrent.futures.Future[TaskRecord | None]:
        return self._submit(self._journal(entry))

    async def _journal(self, entry: JournalEntry) -> TaskRecord | None:
        return await asyncio.wait_for(self._journal_once(entry), self.journal_timeout * 2)

    async def _journal_once(self, entry: JournalEntry) -> TaskRecord | None:
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                _JOURNAL,
                (
                    entry.id,
                    entry.name,
                    entry.created_at,
                    entry.durable,
                    entry.target,
                    entry.payload,
                    entry.options,
                    entry.idempotency_key,
                ),
            )
            if await cur.fetchone() is None:
                # The key is taken (committed by another host, or it waited for one).
                cur = await conn.execute(
                    f"SELECT {_COLUMNS} FROM {TABLE} WHERE name = %s AND idempotency_key = %s",
                    (entry.name, entry.idempotency_key),
                )
                row = await cur.fetchone()
                if row is None:
                    msg = f"task id {entry.id} is already taken"
                    raise StoreError(msg)
                return _record(row)
            if entry.durable:
                job_id = await self._job_task.configure(connection=conn).defer_async(
                    task_id=entry.id
                )
                await conn.execute(
                    f"UPDATE {TABLE} SET job_id = %s WHERE id = %s", (job_id, entry.id)
                )
        return None

    def forget_journal(self, task_id: str) -> None:
        """Nothing to undo: a refused call's transaction was rolled back."""

    def request_cancel(self, task_id: str) -> bool:
        """Cancel a task another host holds: a queued job is cancelled at once; a
        running one is aborted through procrastinate, which tells its worker."""
        if self._loop is None:
            return False
        return self._call(self._request_cancel(task_id))

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

    def expire(self, runtime: Runtime, cutoff: float) -> None:
        async def delete() -> None:
            async with self._pool.connection() as conn:
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE finished_at IS NOT NULL AND finished_at <= %s "
                    "AND status IN ('succeeded', 'failed', 'cancelled')",
                    (cutoff,),
                )

        if self._loop is not None:
            self._submit(delete())

    # ------------------------------------------------------------------ reads
    def load(self, task_id: str) -> TaskRecord | None:
        if self._loop is None:
            return None
        return self._call(self._load(task_id))

    async def _load(self, task_id: str) -> TaskRecord | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM {TABLE} WHERE id = %s", (task_id,))
            row = await cur.fetchone()
        return None if row is None else _record(row)

    # ------------------------------------------------------------------ schema
    async def migrate(self) -> list[str]:
        """Create procrastinate's tables and bgtasks' (what ``bgtasks migrate`` runs).
        Returns what it created; safe to run again, and from several hosts at once."""
        import procrastinate
        import psycopg
        import psycopg_pool

        pool = psycopg_pool.AsyncConnectionPool(
            self.url, min_size=1, max_size=2, open=False, name="bgtasks-migrate"
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
        except psycopg_pool.PoolTimeout as exc:
            await pool.close()
            msg = f"cannot connect to PostgreSQL at {self.where} to migrate it"
            raise StoreError(msg) from exc
        try:
            app = procrastinate.App(connector=procrastinate.PsycopgConnector())
            await app.open_async(pool)
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                return await create_tables(conn, app)
        finally:
            await pool.close()


def _is_db_error(exc: BaseException) -> bool:
    module = type(exc).__module__
    return module.startswith(("psycopg", "procrastinate")) or isinstance(
        exc, (asyncio.TimeoutError, OSError)
    )


def _snapshot(t: TaskHandle, requeued: bool) -> tuple[Any, ...]:
    error: ErrorInfo | None = t._error
    progress: Progress | None = t._progress
    status = t._status
    finished_at = t._finished_at
    if requeued:  # stopped by this host's shutdown: waiting in the queue again
        status, finished_at = "pending", None
    result = None
    if t._result is not None:
        try:
            result = json.dumps(t._result, separators=(",", ":"))
        except (TypeError, ValueError):
            result = None
    return (
        t._id,
        t._name,
        status,
        t._created_at,
        t._started_at,
        finished_at,
        t._attempts,
        None if error is None else error.model_dump_json(),
        result,
        None if progress is None else progress.model_dump_json(),
    )


def _utc(ts: float | None) -> Any:
    import datetime as dt

    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _record(row: Sequence[Any]) -> TaskRecord:
    task_id, name, status, created, started, finished, attempts, error, result, progress = row
    return TaskRecord.model_construct(
        id=task_id,
        name=name,
        status=status,
        created_at=_utc(created),
        started_at=_utc(started),
        finished_at=_utc(finished),
        attempts=attempts,
        error=None if error is None else ErrorInfo.model_validate(error),
        result=result,
        progress=None if progress is None else Progress.model_validate(progress),
    )
