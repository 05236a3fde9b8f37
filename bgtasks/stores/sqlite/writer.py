"""The writer thread: every write of one process, committed in batches.

Callers never wait on a write on the event loop: ``save`` puts the snapshot
in a dict (the last one of a task wins) and wakes the thread; other writes are
queued as operations with a future. The thread takes what has queued up (up
to ``BATCH`` items), runs it in one ``BEGIN IMMEDIATE`` transaction, commits,
then settles the futures: one commit for many journal writes, saves and kept
steps. Reads that must follow the writes queued before them (``read=True``)
run after the commit on the same connection. The thread also renews the
process's lease every ``lease / 3`` seconds, and notices the file being
removed or replaced under it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ..._errors import StoreError
from ..._task import TaskSnapshot
from .errors import settle, store_error
from .owners import Owner
from .rows import snapshot_row
from .schema import migrate

__all__ = ["Writer"]

logger = logging.getLogger("bgtasks")

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]

#: Most queued items one transaction takes.
BATCH = 1000
#: Most ids of released or parked tasks whose saves this process drops early.
MAX_DROPPED = 10_000

# One statement for every transition. The row is created by the first save (or
# by the journal); the WHERE keeps a process that lost a task (to another owner,
# or by releasing or parking it) from overwriting the row.
_UPSERT = """
INSERT INTO tasks (id, name, status, created_at, started_at, finished_at, attempts,
                   error, result, progress, owner, updated_at, wake_at, steps)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    status = excluded.status, started_at = excluded.started_at,
    finished_at = excluded.finished_at, attempts = excluded.attempts,
    error = excluded.error, result = excluded.result, progress = excluded.progress,
    updated_at = excluded.updated_at, wake_at = excluded.wake_at, steps = excluded.steps
WHERE tasks.owner IS excluded.owner
"""

_STOP = object()
_WAKE = object()


class Writer:
    """The one thread that writes to the file for this process."""

    def __init__(self, path: str, *, busy_timeout: float, synchronous: str, owner: Owner) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.owner = owner
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._dirty: dict[str, TaskSnapshot] = {}
        self._dirty_lock = threading.Lock()
        # Released or parked tasks, oldest first: their late saves are dropped here
        # (the upsert's WHERE on the owner refuses them anyway; this saves the
        # write). Bounded: a task another process claimed would stay forever.
        self._dropped: dict[str, None] = {}
        self._thread: threading.Thread | None = None
        self.closed = concurrent.futures.Future[None]()
        self.is_open = False
        #: Why the store refuses writes (the file was removed or replaced), or None.
        self.broken: str | None = None
        self._identity: tuple[int, int] | None = None

    # ------------------------------------------------------------------ callers
    def start(self) -> concurrent.futures.Future[None]:
        """Open the file, migrate it, take the lease; the future says when ready."""
        ready = concurrent.futures.Future[None]()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="bgtasks-sqlite-writer", daemon=True
        )
        self._thread.start()
        return ready

    def stop(self) -> concurrent.futures.Future[None]:
        """Commit what is queued, give up the lease, close; the future says when done."""
        if self._thread is not None and not self.closed.done():
            self._queue.put(_STOP)
        return self.closed

    def save(self, snapshot: TaskSnapshot) -> None:
        task_id = snapshot.id
        if task_id in self._dropped:
            return
        with self._dirty_lock:
            first = not self._dirty
            self._dirty[task_id] = snapshot
        if first:
            self._queue.put(_WAKE)

    def submit(
        self, op: Callable[[sqlite3.Connection], T], *, read: bool = False
    ) -> concurrent.futures.Future[T]:
        """Run ``op(conn)`` in the next transaction (after it, if ``read``)."""
        fut = concurrent.futures.Future[T]()
        if self.broken is not None:
            fut.set_exception(StoreError(self.broken))
        elif not self.is_open or self.closed.done():
            fut.set_exception(StoreError(self.not_open_msg()))
        else:
            self._queue.put((op, fut, read))
        return fut

    def drop(self, ids: Iterable[str]) -> None:
        """Later saves of these tasks are not written (released or parked)."""
        dropped = self._dropped
        for task_id in ids:
            dropped[task_id] = None
        while len(dropped) > MAX_DROPPED:
            del dropped[next(iter(dropped))]

    def undrop(self, ids: Iterable[str]) -> None:
        """These tasks are ours again (claimed): write their saves."""
        for task_id in ids:
            self._dropped.pop(task_id, None)

    def not_open_msg(self) -> str:
        return (
            f"the task store {self.path!r} is not open: the runtime has not started or has "
            "shut down. Start it first (`async with rt:` or an adapter's lifespan)."
        )

    # ------------------------------------------------------------------ the thread
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

    def _init(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrate(conn, self.path)
            self.owner.renew(conn, time.time())
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            ready.set_exception(store_error(exc, self.path))
            self.closed.set_result(None)
            return
        try:
            self._init(conn)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            ready.set_exception(store_error(exc, self.path))
            self.closed.set_result(None)
            return
        self.is_open = True
        ready.set_result(None)
        beat_every = self.owner.lease / 3
        next_beat = time.monotonic() + beat_every
        stopping = False
        try:
            while not stopping:
                try:
                    items = [self._queue.get(timeout=max(0.0, next_beat - time.monotonic()))]
                except queue.Empty:
                    items = []
                while len(items) < BATCH:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                writes: list[tuple[Op, concurrent.futures.Future[Any]]] = []
                reads: list[tuple[Op, concurrent.futures.Future[Any]]] = []
                for item in items:
                    if item is _STOP:
                        stopping = True
                    elif isinstance(item, tuple):
                        (reads if item[2] else writes).append((item[0], item[1]))
                beat = time.monotonic() >= next_beat
                if beat:
                    next_beat = time.monotonic() + beat_every
                self._write(conn, writes, beat=beat, last=stopping)
                for op, fut in reads:
                    self._read(conn, op, fut)
        except BaseException as exc:  # pragma: no cover - a bug; do not die silently
            logger.exception("bgtasks: the SQLite writer thread stopped")
            self.closed.set_exception(exc)
            raise
        finally:
            self.is_open = False
            self._fail_queued()
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self.closed.set_result(None)

    def _replaced(self) -> bool:
        """Was the file removed or replaced since it was opened? (Told once.)"""
        if self.broken is not None:
            return True
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity
        except OSError:
            same = False
        if same:
            return False
        self.broken = (
            f"the task store {self.path!r} was removed or replaced while this process had "
            "it open; durable calls are refused and records are no longer saved. Restart "
            "the process (every worker that shares the file) to open it again."
        )
        logger.error("bgtasks: %s", self.broken)
        return True

    def _write(
        self,
        conn: sqlite3.Connection,
        ops: list[tuple[Op, concurrent.futures.Future[Any]]],
        *,
        beat: bool,
        last: bool,
    ) -> None:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, {}
        now = time.time()
        dropped = self._dropped
        owner = self.owner
        rows = [snapshot_row(s, owner.id, now) for s in dirty.values() if s.id not in dropped]
        if not (rows or ops or beat or last):
            return
        if self._replaced():
            error = StoreError(self.broken or "")
            for _, fut in ops:
                settle(fut, False, error)
            return
        outcomes: list[tuple[concurrent.futures.Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if beat or last:
                    owner.renew(conn, now)
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
                    owner.retire(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            failure = store_error(exc, self.path)
            logger.error("bgtasks: a write to the task store failed: %s", failure)
            if not last:
                with self._dirty_lock:  # try the records again with the next batch
                    for task_id, s in dirty.items():
                        self._dirty.setdefault(task_id, s)
                time.sleep(min(0.5, self.busy_timeout))
            for _, fut in ops:
                settle(fut, False, failure)
            return
        for fut, ok, value in outcomes:
            settle(fut, ok, value)

    def _read(self, conn: sqlite3.Connection, op: Op, fut: concurrent.futures.Future[Any]) -> None:
        if self.broken is not None:
            settle(fut, False, StoreError(self.broken))
            return
        try:
            settle(fut, True, op(conn))
        except sqlite3.Error as exc:
            settle(fut, False, store_error(exc, self.path))
        except Exception as exc:
            settle(fut, False, exc)

    def _fail_queued(self) -> None:
        error = StoreError(self.broken or self.not_open_msg())
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                settle(item[1], False, error)
