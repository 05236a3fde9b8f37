"""SQLiteStore: every record and the journal of durable work in one SQLite file.

Several worker processes of one machine share the file (WAL mode), so any of
them answers the status route for any task. All writes go through one writer
thread per process: callers queue them, the thread commits them in batches, so
the event loop never waits on a write. Reads (``load``) are short and, in WAL
mode, never wait for a writer.

Leases are per process, not per task: each runtime registers an *owner* row
that its writer thread renews every ``lease / 3`` seconds; a task belongs to
the owner named in its row. A task whose owner is gone (its lease expired, or
its process on this host no longer exists) is claimed by the next runtime
that looks, in one ``BEGIN IMMEDIATE`` transaction, so one worker at a time
runs it. See docs/durability.md for what this does and does not guarantee.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from .._errors import StoreError
from .._ids import new_id
from .._task import FINISHED, ErrorInfo, Progress, TaskRecord
from ._journal import JournalEntry

if TYPE_CHECKING:
    from .._handle import TaskHandle
    from .._runtime import Runtime

__all__ = ["ClaimedTask", "SQLiteStore"]

logger = logging.getLogger("bgtasks")

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    result TEXT,
    progress TEXT,
    owner TEXT,
    updated_at REAL NOT NULL,
    durable INTEGER NOT NULL DEFAULT 0,
    target TEXT,
    payload TEXT,
    options TEXT,
    idempotency_key TEXT,
    crashes INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency
    ON tasks (name, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_open
    ON tasks (created_at) WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS tasks_finished
    ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_cancel
    ON tasks (owner) WHERE cancel_requested = 1;
CREATE TABLE IF NOT EXISTS owners (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    proc_started REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""

# One statement for every transition. The row is created by the first save (or
# by the journal); the WHERE keeps a process that lost a task to another owner
# (its lease expired) from overwriting the new owner's record.
_UPSERT = """
INSERT INTO tasks (id, name, status, created_at, started_at, finished_at, attempts,
                   error, result, progress, owner, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status, started_at = excluded.started_at,
    finished_at = excluded.finished_at, attempts = excluded.attempts,
    error = excluded.error, result = excluded.result, progress = excluded.progress,
    updated_at = excluded.updated_at
WHERE tasks.owner IS excluded.owner
"""

_JOURNAL = """
INSERT INTO tasks (id, name, status, created_at, attempts, owner, updated_at,
                   durable, target, payload, options, idempotency_key)
VALUES (?, ?, 'pending', ?, 0, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""

_RECORD_COLUMNS = (
    "id, name, status, created_at, started_at, finished_at, attempts, error, result, progress"
)
_OPEN = "status IN ('pending', 'running')"
# The owner is gone: released (NULL), or not among the owners whose lease holds.
_ORPHAN = "(owner IS NULL OR owner NOT IN (SELECT id FROM owners WHERE expires_at >= ?))"

_STOP = object()
_WAKE = object()


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A journaled task this process now owns and must run."""

    id: str
    name: str
    created_at: float
    attempts: int
    target: str
    payload: str
    options: str
    progress: Progress | None


class SQLiteStore:
    """Records and the journal of durable work in one SQLite file (WAL mode).

    ``Runtime(store="sqlite:///path.db")`` builds one; options can follow in
    the query string: ``?lease=30&poll=5&busy_timeout=5&max_crashes=3&synchronous=normal``.

    - ``lease``: seconds a process's claim on its tasks lasts without renewal.
      A process that dies on this host is noticed at once (its pid is gone);
      one that stops answering, after ``lease`` seconds.
    - ``poll``: seconds between two looks for orphaned tasks.
    - ``busy_timeout``: seconds a write waits for another process's lock.
    - ``max_crashes``: a task that was running when its process died this many
      times more is failed with ``WorkerCrashed`` instead of run again.
    - ``synchronous``: ``"normal"`` (a commit survives the process dying) or
      ``"full"`` (also the machine losing power: one fsync per batch).
    """

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lease: float = 30.0,
        poll: float = 5.0,
        busy_timeout: float = 5.0,
        max_crashes: int = 3,
        synchronous: str = "normal",
    ) -> None:
        path = os.fspath(path)
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            msg = (
                "the SQLite store needs a file that every worker process can open, "
                "not an in-memory database; use store='sqlite:///path/to/file.db', "
                "or store='memory' for records that live only in this process."
            )
            raise ValueError(msg)
        for value, what in ((lease, "lease"), (poll, "poll"), (busy_timeout, "busy_timeout")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                msg = f"SQLiteStore {what} must be a positive number of seconds, got {value!r}."
                raise ValueError(msg)
        if isinstance(max_crashes, bool) or not isinstance(max_crashes, int) or max_crashes < 0:
            msg = f"SQLiteStore max_crashes must be an int >= 0, got {max_crashes!r}."
            raise ValueError(msg)
        if synchronous not in ("normal", "full"):
            msg = f"SQLiteStore synchronous must be 'normal' or 'full', got {synchronous!r}."
            raise ValueError(msg)
        self.synchronous = synchronous
        self.path = path
        self.lease = float(lease)
        self.poll = float(poll)
        self.busy_timeout = float(busy_timeout)
        self.max_crashes = max_crashes
        self._reset()

    def _reset(self) -> None:
        self.owner: str | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._dirty: dict[str, TaskHandle] = {}
        self._dirty_lock = threading.Lock()
        self._journaled: set[str] = set()  # durable tasks this process runs
        self._parked: set[str] = set()  # left queued by shutdown: no more saves
        self._thread: threading.Thread | None = None
        self._closed = concurrent.futures.Future[None]()
        self._open = False
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._readers_lock = threading.Lock()
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._runtime: Runtime | None = None

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r}>"

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db``, options in the query."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "sqlite" or parts.netloc:
            msg = (
                f"{url!r} is not a SQLite store URL; write 'sqlite:///relative/path.db' "
                "or 'sqlite:////absolute/path.db' (no host part)."
            )
            raise ValueError(msg)
        path = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        options: dict[str, Any] = {}
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key not in ("lease", "poll", "busy_timeout", "max_crashes", "synchronous"):
                msg = (
                    f"unknown SQLite store option {key!r} in {url!r}; the options are "
                    "lease, poll, busy_timeout (seconds), max_crashes (a count) and "
                    "synchronous (normal or full)."
                )
                raise ValueError(msg)
            if key == "synchronous":
                options[key] = value.lower()
                continue
            try:
                options[key] = int(value) if key == "max_crashes" else float(value)
            except ValueError:
                msg = f"SQLite store option {key}={value!r} in {url!r} is not a number."
                raise ValueError(msg) from None
        return cls(path, **options)

    # ------------------------------------------------------------------ lifecycle
    async def open(self, runtime: Runtime) -> None:
        # Fresh state for each run, and this process's pid (after a fork, not the parent's).
        self._reset()
        self._runtime = runtime
        self.owner = new_id()
        ready = concurrent.futures.Future[None]()
        self._thread = threading.Thread(
            target=self._writer, args=(ready,), name="bgtasks-sqlite-writer", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(ready)
        self._open = True

    async def started(self, runtime: Runtime) -> None:
        from .._durable import replay_loop, replay_once

        await replay_once(runtime, self)
        runtime._side(replay_loop(runtime, self))

    async def close(self, runtime: Runtime) -> None:
        if self._thread is None or self._closed.done():
            return
        self._queue.put(_STOP)
        with contextlib.suppress(Exception):  # already logged by the writer
            await asyncio.wrap_future(self._closed)
        self._open = False
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def flush(self) -> None:
        """Wait until every record saved so far is committed (for tests and tools)."""
        await asyncio.wrap_future(self.submit(_nothing))

    async def before_cancel(self, runtime: Runtime, tasks: Sequence[TaskHandle]) -> None:
        """Put unfinished durable tasks back in the queue, unowned, for the next start."""
        ids = [t._id for t in tasks if t._id in self._journaled]
        if not ids:
            return
        self._parked.update(ids)
        try:
            await asyncio.wrap_future(self.release(ids))
        except StoreError:
            logger.exception(
                "bgtasks: could not put %d durable task(s) back in the queue; the next "
                "runtime will find them once this process's lease has expired",
                len(ids),
            )

    # ------------------------------------------------------------------ writes
    def save(self, task: TaskHandle) -> None:
        task_id = task._id
        if task_id in self._parked:
            return
        with self._dirty_lock:
            first = not self._dirty
            self._dirty[task_id] = task
        if first:
            self._queue.put(_WAKE)

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Run ``op(conn)`` in the writer's next transaction; its future has the result."""
        fut = concurrent.futures.Future[T]()
        if not self._open or self._closed.done():
            fut.set_exception(StoreError(self._not_open_msg()))
            return fut
        self._queue.put((op, fut))
        return fut

    @property
    def journal_timeout(self) -> float:
        return self.busy_timeout + 10.0

    def release(self, ids: Sequence[str]) -> concurrent.futures.Future[None]:
        """Put these tasks of ours back in the queue, unowned: the next look claims them."""
        owner = self.owner

        def release(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.executemany(
                f"UPDATE tasks SET status = 'pending', owner = NULL, updated_at = ? "
                f"WHERE id = ? AND owner = ? AND {_OPEN}",
                [(now, task_id, owner) for task_id in ids],
            )

        for task_id in ids:
            self._journaled.discard(task_id)
        return self.submit(release)

    def journal(
        self, runtime: Runtime, entry: JournalEntry
    ) -> concurrent.futures.Future[TaskRecord | None]:
        """Insert ``entry``. The future's result is None once committed, or the
        record of the task that already holds the idempotency key."""
        owner = self.owner

        def insert(conn: sqlite3.Connection) -> TaskRecord | None:
            now = time.time()
            cur = conn.execute(
                _JOURNAL,
                (
                    entry.id,
                    entry.name,
                    entry.created_at,
                    owner,
                    now,
                    int(entry.durable),
                    entry.target,
                    entry.payload,
                    entry.options,
                    entry.idempotency_key,
                ),
            )
            if cur.rowcount == 1 or entry.idempotency_key is None:
                return None
            row = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM tasks WHERE name = ? AND idempotency_key = ?",
                (entry.name, entry.idempotency_key),
            ).fetchone()
            if row is None:  # pragma: no cover - the insert conflicted on this very key
                msg = f"the idempotency key {entry.idempotency_key!r} conflicted but has no task"
                raise StoreError(msg)
            return _record(row)

        if entry.durable:
            self._journaled.add(entry.id)
        return self.submit(insert)

    def forget_journal(self, task_id: str) -> None:
        """The journal write failed or was superseded: not one of ours."""
        self._journaled.discard(task_id)

    def adopt(self, task_id: str) -> None:
        """A claimed task is now run by this process."""
        self._journaled.add(task_id)

    def claim(self, limit: int) -> concurrent.futures.Future[list[ClaimedTask]]:
        """Take up to ``limit`` orphaned durable tasks; fail orphaned non-durable ones."""
        owner, max_crashes = self.owner, self.max_crashes

        def claim(conn: sqlite3.Connection) -> list[ClaimedTask]:
            now = time.time()
            self._reap_owners(conn, now)
            crashed = json.dumps(
                {
                    "type": "WorkerCrashed",
                    "message": "the process running this task died; it was not durable, "
                    "so it was not run again (use @background(durable=True) for that)",
                }
            )
            conn.execute(
                f"UPDATE tasks SET status = 'failed', finished_at = ?, updated_at = ?, "
                f"error = ? WHERE durable = 0 AND {_OPEN} AND {_ORPHAN}",
                (now, now, crashed, now),
            )
            conn.execute(
                f"UPDATE tasks SET status = 'cancelled', finished_at = ?, updated_at = ? "
                f"WHERE cancel_requested = 1 AND {_OPEN} AND {_ORPHAN}",
                (now, now, now),
            )
            if limit <= 0:
                return []
            rows = conn.execute(
                f"SELECT id, status, crashes FROM tasks WHERE durable = 1 AND {_OPEN} "
                f"AND {_ORPHAN} ORDER BY created_at LIMIT ?",
                (now, limit),
            ).fetchall()
            claimed: list[str] = []
            for task_id, status, crashes in rows:
                crashes += status == "running"
                if crashes > max_crashes:
                    error = json.dumps(
                        {
                            "type": "WorkerCrashed",
                            "message": f"the process running this task died {crashes} times "
                            f"while running it; it is not run again (max_crashes={max_crashes})",
                        }
                    )
                    conn.execute(
                        "UPDATE tasks SET status = 'failed', finished_at = ?, updated_at = ?, "
                        "error = ?, crashes = ? WHERE id = ?",
                        (now, now, error, crashes, task_id),
                    )
                    continue
                conn.execute(
                    "UPDATE tasks SET status = 'pending', owner = ?, crashes = ?, "
                    "updated_at = ? WHERE id = ?",
                    (owner, crashes, now, task_id),
                )
                claimed.append(task_id)
            out: list[ClaimedTask] = []
            for task_id in claimed:
                row = conn.execute(
                    "SELECT id, name, created_at, attempts, target, payload, options, progress "
                    "FROM tasks WHERE id = ?",
                    (task_id,),
                ).fetchone()
                out.append(_claimed(row))
            return out

        return self.submit(claim)

    def request_cancel(self, task_id: str) -> bool:
        """Flag another process's task for cancelling; its owner looks every second.
        A task nobody owns any more (its process died) is cancelled at once."""
        if not self._open:
            return False
        try:
            row = (
                self._reader()
                .execute("SELECT status FROM tasks WHERE id = ?", (task_id,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise _store_error(exc, self.path) from exc
        if row is None or row[0] in FINISHED:
            return False

        def flag(conn: sqlite3.Connection) -> None:
            now = time.time()
            cur = conn.execute(
                f"UPDATE tasks SET status = 'cancelled', finished_at = ?, updated_at = ? "
                f"WHERE id = ? AND {_OPEN} AND {_ORPHAN}",
                (now, now, task_id, now),
            )
            if cur.rowcount == 0:
                conn.execute(
                    f"UPDATE tasks SET cancel_requested = 1, updated_at = ? "
                    f"WHERE id = ? AND {_OPEN}",
                    (now, task_id),
                )

        self.submit(flag)
        return True

    def _check_cancels(self, conn: sqlite3.Connection) -> None:
        """Cancel our tasks that another process asked to cancel."""
        rt = self._runtime
        ids = [
            task_id
            for (task_id,) in conn.execute(
                f"SELECT id FROM tasks WHERE owner = ? AND cancel_requested = 1 AND {_OPEN}",
                (self.owner,),
            )
        ]
        if ids and rt is not None:
            for task_id in ids:
                if task_id not in self._parked and rt.handle(task_id) is not None:
                    rt.cancel(task_id)  # thread-safe: it hops to the loop

    def expire(self, runtime: Runtime, cutoff: float) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at <= ? "
                "AND status IN ('succeeded', 'failed', 'cancelled')",
                (cutoff,),
            )

        if self._open:
            self.submit(delete)

    # ------------------------------------------------------------------ reads
    def load(self, task_id: str) -> TaskRecord | None:
        if not self._open:
            return None
        try:
            row = (
                self._reader()
                .execute(f"SELECT {_RECORD_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise _store_error(exc, self.path) from exc
        return None if row is None else _record(row)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    # ------------------------------------------------------------------ writer thread
    def _connect(self) -> sqlite3.Connection:
        path = Path(self.path)
        if not path.parent.is_dir():
            msg = (
                f"cannot open the task store {self.path!r}: the directory {str(path.parent)!r} "
                "does not exist (or is not a directory); create it, or point "
                "store='sqlite:///...' at a writable place."
            )
            raise StoreError(msg)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        # In WAL mode, NORMAL syncs at checkpoints only: a commit survives the
        # process dying, not necessarily the machine losing power (FULL: it does).
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                msg = (
                    f"the task store {self.path!r} has schema version {version}, written by a "
                    f"newer bgtasks (this one knows version {SCHEMA_VERSION}); upgrade bgtasks "
                    "in every process that shares the file, or point store= at another file."
                )
                raise StoreError(msg)
            if version < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._renew(conn, time.time())
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _renew(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute(
            "INSERT INTO owners (id, host, pid, proc_started, expires_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at",
            (self.owner, self._host, self._pid, _proc_started(self._pid), now + self.lease),
        )

    def _reap_owners(self, conn: sqlite3.Connection, now: float) -> None:
        """Forget owners that are dead: a process of this host that no longer
        exists, or a lease that expired a day ago."""
        dead = [
            (owner,)
            for owner, host, pid, started, expires in conn.execute(
                "SELECT id, host, pid, proc_started, expires_at FROM owners WHERE id != ?",
                (self.owner,),
            )
            if expires < now - 86400 or (host == self._host and not _alive(pid, started))
        ]
        if dead:
            conn.executemany("DELETE FROM owners WHERE id = ?", dead)

    def _writer(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect()
            self._init_schema(conn)
        except BaseException as exc:
            ready.set_exception(_store_error(exc, self.path))
            self._closed.set_result(None)
            return
        ready.set_result(None)
        beat_every = self.lease / 3
        check_every = min(1.0, self.poll)
        next_beat = time.monotonic() + beat_every
        next_check = time.monotonic() + check_every
        stopping = False
        try:
            while not stopping:
                wait = min(next_beat, next_check) - time.monotonic()
                try:
                    items = [self._queue.get(timeout=max(0.0, wait))]
                except queue.Empty:
                    items = []
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + check_every
                    try:
                        self._check_cancels(conn)
                    except sqlite3.Error as exc:
                        logger.warning(
                            "bgtasks: could not look for cancel requests: %s",
                            _store_error(exc, self.path),
                        )
                while len(items) < 1000:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                ops = [item for item in items if isinstance(item, tuple)]
                stopping = any(item is _STOP for item in items)
                beat = time.monotonic() >= next_beat
                if beat:
                    next_beat = time.monotonic() + beat_every
                self._write(conn, ops, beat=beat, last=stopping)
        except BaseException as exc:  # pragma: no cover - a bug; do not die silently
            logger.exception("bgtasks: the SQLite writer thread stopped")
            self._closed.set_exception(exc)
            raise
        finally:
            self._open = False
            self._fail_queued()
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._closed.set_result(None)

    def _write(
        self,
        conn: sqlite3.Connection,
        ops: list[tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future[Any]]],
        *,
        beat: bool,
        last: bool,
    ) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, {}
        now = time.time()
        rows = [_snapshot(t, self.owner, now) for t in dirty.values() if t._id not in self._parked]
        if not (rows or ops or beat or last):
            return
        for t in dirty.values():
            if t._status in FINISHED:
                self._journaled.discard(t._id)
        outcomes: list[tuple[concurrent.futures.Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if beat or last:
                    self._renew(conn, now)
                if rows:
                    conn.executemany(_UPSERT, rows)
                for op, fut in ops:
                    try:
                        outcomes.append((fut, True, op(conn)))
                    except sqlite3.Error:
                        raise
                    except Exception as exc:
                        outcomes.append((fut, False, exc))
                if last:
                    conn.execute("DELETE FROM owners WHERE id = ?", (self.owner,))
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            error = _store_error(exc, self.path)
            logger.error("bgtasks: a write to the task store failed: %s", error)
            if not last:
                with self._dirty_lock:  # try the records again with the next batch
                    for task_id, t in dirty.items():
                        self._dirty.setdefault(task_id, t)
                time.sleep(min(0.5, self.busy_timeout))
            for _, fut in ops:
                _settle(fut, False, error)
            return
        for fut, ok, value in outcomes:
            _settle(fut, ok, value)

    def _fail_queued(self) -> None:
        error = StoreError(self._not_open_msg())
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                _settle(item[1], False, error)

    def _not_open_msg(self) -> str:
        return (
            f"the task store {self.path!r} is not open: the runtime has not started or has "
            "shut down. Start it first (`async with rt:` or an adapter's lifespan)."
        )


# ---------------------------------------------------------------------- helpers
def _nothing(conn: sqlite3.Connection) -> None:
    pass


def _proc_started(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def _alive(pid: int, started: float) -> bool:
    """Is the process that registered as ``(pid, started)`` still running?"""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, but we may not look at it
        return True


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


def _snapshot(t: TaskHandle, owner: str | None, now: float) -> tuple[Any, ...]:
    error: ErrorInfo | None = t._error
    progress: Progress | None = t._progress
    return (
        t._id,
        t._name,
        t._status,
        t._created_at,
        t._started_at,
        t._finished_at,
        t._attempts,
        None if error is None else error.model_dump_json(),
        _dumps(t._result),
        None if progress is None else progress.model_dump_json(),
        owner,
        now,
    )


def _utc(ts: float | None) -> _dt.datetime | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)


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
        error=None if error is None else ErrorInfo.model_validate_json(error),
        result=None if result is None else json.loads(result),
        progress=None if progress is None else Progress.model_validate_json(progress),
    )


def _claimed(row: Sequence[Any]) -> ClaimedTask:
    task_id, name, created, attempts, target, payload, options, progress = row
    return ClaimedTask(
        id=task_id,
        name=name,
        created_at=created,
        attempts=attempts,
        target=target or "",
        payload=payload or "{}",
        options=options or "{}",
        progress=None if progress is None else Progress.model_validate_json(progress),
    )


def _store_error(exc: BaseException, path: str) -> BaseException:
    """Turn what sqlite3 raised into a StoreError that says what to do."""
    if isinstance(exc, StoreError) or not isinstance(exc, sqlite3.Error):
        return exc
    text = str(exc)
    if "locked" in text or "busy" in text:
        msg = (
            f"the task store {path!r} stayed locked by another connection for longer than "
            f"busy_timeout ({text}). Another process holds a long write transaction on it; "
            "end that process, or raise ?busy_timeout= in the store URL."
        )
    elif "not a database" in text or "malformed" in text or "corrupt" in text:
        msg = (
            f"the task store {path!r} is not a SQLite database or is corrupt ({text}). Move "
            "the file aside (it may hold unfinished work worth inspecting) and start again, "
            "or point store= at another file."
        )
    elif "unable to open" in text or "readonly" in text or "read-only" in text:
        msg = (
            f"cannot open the task store {path!r} for writing ({text}). Check that the file "
            "and its directory exist and are writable by this process (SQLite also creates "
            f"{path}-wal and {path}-shm beside it), or point store= at another path."
        )
    elif "disk" in text and ("full" in text or "I/O" in text):
        msg = (
            f"the task store {path!r} could not be written ({text}); free disk space or "
            "check the disk."
        )
    else:
        msg = f"the task store {path!r} failed: {type(exc).__name__}: {text}"
    err = StoreError(msg)
    err.__cause__ = exc
    return err


def _settle(fut: concurrent.futures.Future[Any], ok: bool, value: Any) -> None:
    """Give a write's caller its outcome, unless it stopped waiting.

    A caller that awaited the write through ``asyncio.wrap_future`` and was
    cancelled cancels this future too; the write itself may still have been
    committed (at-least-once), and the writer thread must go on.
    """
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled (or settled) by the caller meanwhile
