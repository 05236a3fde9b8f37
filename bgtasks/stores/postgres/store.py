"""``PostgresStore``: the Store protocol over PostgreSQL, with procrastinate's jobs
standing for claims (see ``_engine``) instead of leases."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import datetime as dt
import logging
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..._errors import StoreError
from ..._task import FINISHED, TaskRecord, TaskSnapshot
from ..base import JournalEntry, ListQuery, Page, encode_cursor
from ..sqlite.rows import LIST_COLUMNS, RECORD_COLUMNS, entry_row
from ..sqlite.rows import snapshot as snapshot_of
from ..sqlite.rows import snapshot_row as sqlite_snapshot_row
from ._engine import JOB_TASK, Desk, RetryPolicy
from ._jobs import JobsMixin
from ._loop import LoopThread
from ._schema import STEPS, TABLE, create_tables, missing_tables

__all__ = ["PostgresStore"]

logger = logging.getLogger("bgtasks")
T = TypeVar("T")

_OPEN = "status IN ('pending', 'running')"
_SAVE = f"""
INSERT INTO {TABLE} (id, name, status, created_at, started_at, finished_at, attempts,
                     error, result, progress, wake_at, steps)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, started_at = EXCLUDED.started_at,
    finished_at = EXCLUDED.finished_at, attempts = EXCLUDED.attempts,
    error = EXCLUDED.error, result = EXCLUDED.result, progress = EXCLUDED.progress,
    wake_at = EXCLUDED.wake_at, steps = EXCLUDED.steps, updated_at = now()
WHERE {TABLE}.status IN ('pending', 'running')
"""
_JOURNAL = f"""
INSERT INTO {TABLE} (id, name, status, created_at, durable, target, payload, options,
                     idempotency_key, wake_at, job_id)
VALUES (%s, %s, 'pending', %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING id
"""
#: Options read from the store URL's query string (the rest goes to libpq).
_URL_OPTIONS: dict[str, type] = {
    "pool_size": int,
    "concurrency": int,
    "journal_timeout": float,
    "connect_timeout": float,
    "poll": float,
    "heartbeat": float,
    "stalled_after": float,
    "max_crashes": int,
}


class _KeyTaken(Exception):
    """The idempotency key of a journal entry is held by another task."""


class PostgresStore(JobsMixin):
    """Records in PostgreSQL shared by every host; durable work as procrastinate jobs.

    Options (keywords, or the store URL's query string:
    ``postgresql://.../db?concurrency=20&max_crashes=3``):

    - ``pool_size``: connections this process opens at most (10);
    - ``concurrency``: jobs this host holds at once (10); ``max_concurrency``
      and ``max_pending`` still bound what runs;
    - ``journal_timeout``: seconds a durable call waits for its commit before
      it is refused (503 under an adapter) (5);
    - ``poll``: seconds between two looks for jobs when no notification came (1);
    - ``heartbeat`` / ``stalled_after``: a worker beats every ``heartbeat``
      seconds; one silent for ``stalled_after`` seconds is dead and its jobs
      run again on another host (5 / 30);
    - ``max_crashes``: a task whose worker died this many times more is failed
      with ``WorkerCrashed`` instead of run again (3).
    """

    durable = True
    #: A durable call is run by whichever consuming host fetches its job.
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
        if not 0 < heartbeat < stalled_after:
            msg = (
                f"heartbeat ({heartbeat:g}s) must be > 0 and shorter than stalled_after "
                f"({stalled_after:g}s), or live workers would be taken for dead."
            )
            raise ValueError(msg)
        self.url = url
        self.pool_size = pool_size
        self.concurrency = concurrency
        self._journal_timeout = float(journal_timeout)
        self.connect_timeout = float(connect_timeout)
        self.fetch_poll = float(poll)
        self.heartbeat = float(heartbeat)
        self.stalled_after = float(stalled_after)
        self.max_crashes = int(max_crashes)
        self.queue = queue
        parts = urllib.parse.urlsplit(url)
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"
        self._io = LoopThread("bgtasks-postgres", self._store_error)
        self._pool: Any = None
        self._app: Any = None
        self._job_task: Any = None
        self._worker: Any = None
        self._consumer: concurrent.futures.Future[None] | None = None
        self._closing = False
        self._desk = Desk()
        self._dirty: dict[str, TaskSnapshot] = {}
        self._dirty_lock = threading.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self._flush_lock: asyncio.Lock | None = None
        self._sides: set[asyncio.Task[Any]] = set()
        self._dropped: set[str] = set()  # released or parked: later saves are dropped
        self._owned: set[str] = set()  # unfinished tasks this process runs
        self._last_cancel_look = 0.0

    def __repr__(self) -> str:
        return f"<PostgresStore {self.where}>"

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
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

    @property
    def journal_timeout(self) -> float:
        return self._journal_timeout

    @property
    def poll(self) -> float:
        """How often the runtime looks for jobs this host's worker fetched: an
        in-memory look, so often (the worker itself waits for notifications)."""
        return 0.05

    def _store_error(self, exc: BaseException) -> BaseException:
        module = type(exc).__module__
        if not (
            module.startswith(("psycopg", "procrastinate"))
            or isinstance(exc, (asyncio.TimeoutError, OSError))
        ):
            return exc
        detail = str(exc).strip() or type(exc).__name__
        return StoreError(
            f"PostgreSQL at {self.where} is unreachable or failed ({type(exc).__name__}: "
            f"{detail})"
        )

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        self._closing = False
        self._io.start()
        try:
            await asyncio.wrap_future(self._io.submit(self._open()))
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._io.submit(self._close_pool()))
            self._io.stop()
            raise

    async def _open(self) -> None:
        import procrastinate
        import psycopg_pool

        pool = psycopg_pool.AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self._journal_timeout,
            kwargs={"connect_timeout": max(1, round(self.connect_timeout))},
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

    async def close(self) -> None:
        self._io.soon(self._stop_fetching, True)
        consumer = self._consumer
        if consumer is not None:  # its jobs end once requeued
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(consumer)), 10.0)
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._io.submit(self._stop_sides()))
        try:  # bounded: a database that is down must not hold the shutdown
            flush = asyncio.wrap_future(self._io.submit(self._flush_all()))
            await asyncio.wait_for(flush, self._wait_bound)
        except Exception as exc:
            logger.warning("bgtasks: task records not saved at close (%s)", exc)
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._io.submit(self._close_pool()))
        self._io.stop()

    def stop_consuming(self) -> None:
        """Fetch no more jobs (a worker process got SIGTERM); jobs fetched but not
        yet taken by the runtime go back to the queue now, for another host. The
        tasks running here go on until the runtime's shutdown decides."""
        self._io.soon(self._stop_fetching, False)

    def _stop_fetching(self, everything: bool) -> None:
        self._closing = True
        if self._worker is not None:
            self._worker.stop()
        self._desk.requeue(taken=everything)

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

    # ------------------------------------------------------------------ writes
    def save(self, snapshot: TaskSnapshot) -> None:
        with self._dirty_lock:
            first = not self._dirty
            self._dirty[snapshot.id] = snapshot
        if first:
            self._io.soon(self._schedule_flush)

    def _schedule_flush(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self._flush_all())

    async def _flush_all(self) -> None:
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:  # one flush at a time: saves commit in order
            await self._flush_batches()

    async def _flush_batches(self) -> None:
        while True:
            with self._dirty_lock:
                batch, self._dirty = self._dirty, {}
            snaps = [s for s in batch.values() if s.id not in self._dropped]
            if not snaps or self._pool is None:
                return
            rows = [_row(s) for s in snaps]
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
                continue
            for s in snaps:
                if s.status in FINISHED:
                    self._owned.discard(s.id)
                    self._desk.settle(s.id, "finished")  # its job ends, committed
                else:
                    self._owned.add(s.id)

    async def flush(self) -> None:
        """Wait until every record saved so far is committed (for tests and tools)."""
        await asyncio.wrap_future(self._io.submit(self._flush_all()))

    def journal(self, entry: JournalEntry) -> concurrent.futures.Future[TaskRecord | None]:
        return self._io.submit(self._journal(entry))

    async def _journal(self, entry: JournalEntry) -> TaskRecord | None:
        return await asyncio.wait_for(self._journal_once(entry), self._wait_bound)

    async def _journal_once(self, entry: JournalEntry) -> TaskRecord | None:
        row = entry_row(entry, None, 0.0)
        # entry_row: id, name, created_at, owner, now, durable, target, payload,
        # options, idempotency_key, wake_at
        params = (row[0], row[1], row[2], bool(row[5]), *row[6:])

        async def write(conn: Any) -> TaskRecord | None:
            try:
                async with conn.transaction():
                    job_id = None
                    if entry.durable:  # the job first: its id goes in the record
                        when = None  # a delayed task: procrastinate hands it out at wake_at
                        if entry.wake_at is not None:
                            when = dt.datetime.fromtimestamp(entry.wake_at, dt.timezone.utc)
                        deferrer = self._job_task.configure(connection=conn, schedule_at=when)
                        job_id = await deferrer.defer_async(task_id=entry.id)
                    cur = await conn.execute(_JOURNAL, (*params, job_id))
                    if await cur.fetchone() is None:
                        raise _KeyTaken  # rolls the job back too
            except _KeyTaken:
                # Taken by a task committed by another host (or one this insert waited for).
                cur = await conn.execute(
                    f"SELECT {RECORD_COLUMNS} FROM {TABLE} "
                    "WHERE name = %s AND idempotency_key = %s",
                    (entry.name, entry.idempotency_key),
                )
                found = await cur.fetchone()
                await conn.rollback()
                if found is None:
                    msg = f"task id {entry.id} is already taken"
                    raise StoreError(msg) from None
                return snapshot_of(found).record()
            return None

        existing = await self._with_conn(write)
        if existing is None and not entry.durable:
            self._owned.add(entry.id)
        return existing

    async def _with_conn(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """``op(connection)``, once more on a fresh connection if the server had
        dropped the pooled one (it restarted): the first statement fails then."""
        import psycopg

        for attempt in (1, 2):
            async with self._pool.connection() as conn:
                try:
                    return await op(conn)
                except psycopg.OperationalError:
                    if attempt == 2 or not conn.broken:
                        raise
            await self._pool.check()  # drop the other dead ones before trying again
        raise AssertionError("unreachable")

    def forget(self, task_id: str) -> None:
        """Nothing to undo: a refused call's transaction was rolled back."""

    def expire(self, cutoff: float) -> None:
        async def delete() -> None:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(
                    f"DELETE FROM {STEPS} WHERE task_id IN (SELECT id FROM {TABLE} "
                    "WHERE finished_at IS NOT NULL AND finished_at <= %s)",
                    (cutoff,),
                )
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE finished_at IS NOT NULL AND finished_at <= %s "
                    "AND status IN ('succeeded', 'failed', 'cancelled')",
                    (cutoff,),
                )

        if self._io.loop is not None:
            self._io.submit(delete())

    def keep_step(
        self, task_id: str, name: str, value_json: str
    ) -> concurrent.futures.Future[None]:
        async def keep() -> None:
            async with self._pool.connection() as conn:
                await conn.execute(
                    f"INSERT INTO {STEPS} (task_id, name, value) VALUES (%s, %s, %s) "
                    "ON CONFLICT (task_id, name) DO UPDATE SET value = EXCLUDED.value",
                    (task_id, name, value_json),
                )

        return self._io.submit(keep())

    def kept_steps(self, task_id: str) -> concurrent.futures.Future[dict[str, str]]:
        async def read() -> dict[str, str]:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    f"SELECT name, value FROM {STEPS} WHERE task_id = %s", (task_id,)
                )
                return {name: value for name, value in await cur.fetchall()}

        return self._io.submit(read())

    # ------------------------------------------------------------------ reads
    @property
    def _wait_bound(self) -> float:
        return self._journal_timeout + self.connect_timeout

    def load(self, task_id: str) -> TaskRecord | None:
        if self._io.loop is None:
            return None
        return self._io.call(self._load(task_id), self._wait_bound)

    async def _load(self, task_id: str) -> TaskRecord | None:
        async def read(conn: Any) -> Any:
            cur = await conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM {TABLE} WHERE id = %s", (task_id,)
            )
            return await cur.fetchone()

        row = await self._with_conn(read)
        return None if row is None else snapshot_of(row).record()

    def list(self, query: ListQuery) -> Page:
        if self._io.loop is None:
            return Page(items=[])
        return self._io.call(self._list(query), self._wait_bound)

    async def _list(self, q: ListQuery) -> Page:
        where: builtins.list[str] = []
        args: builtins.list[Any] = []
        after = q.after
        if after is not None:
            where.append("(created_at, id) < (%s, %s)")
            args += [after[0], after[1]]
        if q.statuses:
            where.append("status = ANY(%s)")
            args.append(builtins.list(q.statuses))
        if q.names:
            where.append("name = ANY(%s)")
            args.append(builtins.list(q.names))
        sql = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {LIST_COLUMNS} FROM {TABLE} {sql} "
                "ORDER BY created_at DESC, id DESC LIMIT %s",
                (*args, q.limit + 1),
            )
            rows = await cur.fetchall()
        snaps = [snapshot_of(row) for row in rows]
        items = snaps[: q.limit]
        next_cursor = None
        if len(snaps) > q.limit:
            next_cursor = encode_cursor(items[-1].created_at, items[-1].id)
        return Page(items=[s.record(include_result=False) for s in items], next_cursor=next_cursor)

    def stats(self) -> dict[str, dict[str, int]]:
        if self._io.loop is None:
            return {"by_status": {}, "by_name": {}}
        return self._io.call(self._stats(), self._wait_bound)

    async def _stats(self) -> dict[str, dict[str, int]]:
        async with self._pool.connection() as conn:
            by_status = await (
                await conn.execute(f"SELECT status, count(*) FROM {TABLE} GROUP BY status")
            ).fetchall()
            by_name = await (
                await conn.execute(f"SELECT name, count(*) FROM {TABLE} GROUP BY name")
            ).fetchall()
        return {"by_status": dict(by_status), "by_name": dict(by_name)}

    # ------------------------------------------------------------------ schema
    async def migrate(self) -> builtins.list[str]:
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


def _row(s: TaskSnapshot) -> tuple[Any, ...]:
    """The upsert's parameters: the SQLite row without its owner and time."""
    r = sqlite_snapshot_row(s, None, 0.0)
    # id, name, status, created, started, finished, attempts, error, result,
    # progress, owner, now, wake_at, steps
    return (*r[:10], r[12], r[13])
