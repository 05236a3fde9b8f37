"""Reads: a bounded pool of read-only connections, and the queries they run.

In WAL mode a read never waits for a writer. A thread borrows a connection
for one query and gives it back, so a server with hundreds of threads holds
at most ``size`` connections (two descriptors each), not one per thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from ..._errors import StoreError
from ..._task import TaskRecord, TaskSnapshot
from ..base import ListQuery, Page, encode_cursor
from .rows import LIST_COLUMNS, RECORD_COLUMNS, snapshot

__all__ = ["Readers", "list_page", "load", "stats", "status_of"]


class Readers:
    """At most ``size`` read-only connections to ``path``, shared by every thread."""

    def __init__(self, path: str, *, busy_timeout: float, size: int = 4) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.size = size
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        conn = self._borrow()
        try:
            yield conn
        finally:
            if self._closed:  # closed while this thread read: nobody will borrow it again
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            else:
                self._idle.put(conn)

    def _borrow(self) -> sqlite3.Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                msg = f"the task store {self.path!r} is closed."
                raise StoreError(msg)
            if len(self._all) < self.size:
                conn = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout,
                    isolation_level=None,
                    check_same_thread=False,
                )
                conn.execute("PRAGMA query_only = 1")
                self._all.append(conn)
                return conn
        try:  # every connection is busy: wait for one, as long as for a lock
            return self._idle.get(timeout=self.busy_timeout)
        except queue.Empty:
            msg = (
                f"the task store {self.path!r}: no reader connection came free within "
                f"busy_timeout ({self.busy_timeout:g}s); reads are slower than the threads "
                "asking for them."
            )
            raise StoreError(msg) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


# ---------------------------------------------------------------------- queries
def load(conn: sqlite3.Connection, task_id: str) -> TaskRecord | None:
    row = conn.execute(f"SELECT {RECORD_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else snapshot(row).record()


def status_of(conn: sqlite3.Connection, task_id: str) -> str | None:
    row = conn.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else str(row[0])


def list_page(conn: sqlite3.Connection, q: ListQuery) -> Page:
    """Newest first by ``(created_at, id)``; each status (or name) filter is read
    from its own index and the runs merged, so no page sorts the table."""
    n = q.limit + 1
    where: list[str] = []
    args: list[Any] = []
    after = q.after
    if after is not None:
        # Written so that the index's first column takes the range.
        where.append("created_at <= ? AND (created_at < ? OR id < ?)")
        args += [after[0], after[0], after[1]]
    statuses: tuple[str, ...] = tuple(dict.fromkeys(q.statuses))
    names: tuple[str, ...] = tuple(dict.fromkeys(q.names))
    if statuses:
        by, values, rest = "status", statuses, names
        rest_col = "name"
    else:
        by, values, rest = "name", names, ()
        rest_col = "status"
    if rest:
        where.append(f"{rest_col} IN ({', '.join('?' * len(rest))})")
        args += rest
    order = "ORDER BY created_at DESC, id DESC LIMIT ?"
    runs: list[list[TaskSnapshot]] = []
    if values:
        for value in values:
            sql = " AND ".join([f"{by} = ?", *where])
            rows = conn.execute(
                f"SELECT {LIST_COLUMNS} FROM tasks WHERE {sql} {order}", (value, *args, n)
            ).fetchall()
            runs.append([snapshot(row) for row in rows])
    else:
        sql = f"WHERE {' AND '.join(where)}" if where else ""
        cur = conn.execute(f"SELECT {LIST_COLUMNS} FROM tasks {sql} {order}", (*args, n))
        runs.append([snapshot(row) for row in cur])
    merged = _newest_first(runs, n)
    items = merged[: q.limit]
    next_cursor = None
    if len(merged) > q.limit:
        last = items[-1]
        next_cursor = encode_cursor(last.created_at, last.id)
    return Page(items=[s.record(include_result=False) for s in items], next_cursor=next_cursor)


def _newest_first(runs: Sequence[list[TaskSnapshot]], n: int) -> list[TaskSnapshot]:
    if len(runs) == 1:
        return runs[0][:n]
    merged = heapq.merge(*runs, key=lambda s: (s.created_at, s.id), reverse=True)
    return list(itertools.islice(merged, n))


def stats(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    by_status = dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status"))
    by_name = dict(conn.execute("SELECT name, count(*) FROM tasks GROUP BY name"))
    return {"by_status": by_status, "by_name": by_name}
