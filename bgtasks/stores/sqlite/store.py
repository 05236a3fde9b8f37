"""SQLiteStore: every record and the journal of durable work in one SQLite file.

Several worker processes of one machine share the file (WAL mode), so any of
them answers the status route for any task. All writes go through one writer
thread per process (``writer.py``); reads use a small pool of read-only
connections (``readers.py``); leases and claims are in ``owners.py``. See
docs/durability.md for what this does and does not guarantee.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from ..._errors import StoreError
from ..._ids import new_id
from ..._task import FINISHED, TaskRecord, TaskSnapshot
from ..base import ClaimedTask, JournalEntry, ListQuery, Page
from . import readers
from .errors import store_error
from .owners import Owner
from .readers import Readers
from .rows import RECORD_COLUMNS, entry_row, snapshot
from .writer import Writer

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_OPTIONS = ("lease", "poll", "busy_timeout", "max_crashes", "synchronous")

_JOURNAL = """
INSERT INTO tasks (id, name, status, created_at, attempts, owner, updated_at,
                   durable, target, payload, options, idempotency_key, wake_at)
VALUES (?, ?, 'pending', ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""

_KEEP = "INSERT OR REPLACE INTO kept_steps (task_id, name, value) VALUES (?, ?, ?)"

_FINISHED_BEFORE = (
    "finished_at IS NOT NULL AND finished_at <= ? "
    "AND status IN ('succeeded', 'failed', 'cancelled')"
)


class SQLiteStore:
    """Records and the journal of durable work in one SQLite file (WAL mode).

    ``Runtime(store="sqlite:///path.db")`` builds one; options can follow in
    the query string: ``?lease=30&poll=5&busy_timeout=5&max_crashes=3&synchronous=normal``.

    - ``lease``: seconds a process's claim on its tasks lasts without renewal.
      A process that dies on this host is noticed at once (its pid is gone);
      one that stops answering, after ``lease`` seconds.
    - ``poll``: seconds between two looks for orphaned or woken tasks.
    - ``busy_timeout``: seconds a write waits for another process's lock.
    - ``max_crashes``: a task that was running when its process died this many
      times more is failed with ``WorkerCrashed`` instead of run again.
    - ``synchronous``: ``"normal"`` (a commit survives the process dying) or
      ``"full"`` (also the machine losing power: one fsync per batch).
    """

    durable = True
    #: Most read-only connections one process holds (threads share them).
    max_readers = 4

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
        self.owner: str | None = None
        self._writer: Writer | None = None
        self._readers: Readers | None = None

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
            if key not in _OPTIONS:
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
    @property
    def journal_timeout(self) -> float:
        return self.busy_timeout + 10.0

    async def open(self) -> None:
        # A fresh owner for each run, with this process's pid (after a fork, not the parent's).
        self.owner = new_id()
        owner = Owner(self.owner, lease=self.lease, max_crashes=self.max_crashes)
        writer = Writer(
            self.path, busy_timeout=self.busy_timeout, synchronous=self.synchronous, owner=owner
        )
        self._writer = writer
        self._readers = Readers(self.path, busy_timeout=self.busy_timeout, size=self.max_readers)
        await asyncio.wrap_future(writer.start())

    async def close(self) -> None:
        writer, readers_ = self._writer, self._readers
        if writer is not None:
            with contextlib.suppress(Exception):  # already logged by the writer
                await asyncio.wrap_future(writer.stop())
        if readers_ is not None:
            readers_.close()

    async def flush(self) -> None:
        """Wait until every record saved so far is committed (for tests and tools)."""
        await asyncio.wrap_future(self.submit(_nothing))

    @property
    def broken(self) -> str | None:
        """Why the store refuses writes (its file was removed or replaced), or None."""
        return None if self._writer is None else self._writer.broken

    def submit(
        self, op: Callable[[sqlite3.Connection], T], *, read: bool = False
    ) -> concurrent.futures.Future[T]:
        """Run ``op(conn)`` in the writer's next transaction; its future has the result."""
        writer = self._writer
        if writer is None:
            fut = concurrent.futures.Future[T]()
            fut.set_exception(StoreError(self._not_open_msg()))
            return fut
        return writer.submit(op, read=read)

    def _not_open_msg(self) -> str:
        return (
            f"the task store {self.path!r} is not open: the runtime has not started or has "
            "shut down. Start it first (`async with rt:` or an adapter's lifespan)."
        )

    @property
    def _is_open(self) -> bool:
        return self._writer is not None and self._writer.is_open

    # ------------------------------------------------------------------ records
    def save(self, snapshot: TaskSnapshot) -> None:
        writer = self._writer
        if writer is not None:
            writer.save(snapshot)

    def expire(self, cutoff: float) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"DELETE FROM kept_steps WHERE task_id IN "
                f"(SELECT id FROM tasks WHERE {_FINISHED_BEFORE})",
                (cutoff,),
            )
            conn.execute(f"DELETE FROM tasks WHERE {_FINISHED_BEFORE}", (cutoff,))

        if self._is_open:
            self.submit(delete)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection | None]:
        """A reader connection; None if the store is not open."""
        readers_ = self._readers
        if readers_ is None or not self._is_open:
            yield None
            return
        broken = self.broken
        if broken is not None:
            raise StoreError(broken)
        try:
            with readers_.connection() as conn:
                yield conn
        except sqlite3.Error as exc:
            raise store_error(exc, self.path) from exc

    def load(self, task_id: str) -> TaskRecord | None:
        with self._reading() as conn:
            return None if conn is None else readers.load(conn, task_id)

    def list(self, query: ListQuery) -> Page:
        with self._reading() as conn:
            return Page(items=[]) if conn is None else readers.list_page(conn, query)

    def stats(self) -> dict[str, dict[str, int]]:
        with self._reading() as conn:
            if conn is None:
                return {"by_status": {}, "by_name": {}}
            return readers.stats(conn)

    # ------------------------------------------------------------------ the journal
    def journal(self, entry: JournalEntry) -> concurrent.futures.Future[TaskRecord | None]:
        owner = self.owner

        def insert(conn: sqlite3.Connection) -> TaskRecord | None:
            cur = conn.execute(_JOURNAL, entry_row(entry, owner, time.time()))
            if cur.rowcount == 1 or entry.idempotency_key is None:
                return None
            row = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM tasks WHERE name = ? AND idempotency_key = ?",
                (entry.name, entry.idempotency_key),
            ).fetchone()
            if row is None:  # pragma: no cover - the insert conflicted on this very key
                msg = f"the idempotency key {entry.idempotency_key!r} conflicted but has no task"
                raise StoreError(msg)
            return snapshot(row).record()

        return self.submit(insert)

    def forget(self, task_id: str) -> None:
        # Nothing was written for it (or the write failed): nothing to undo.
        pass

    # ------------------------------------------------------------------ owners
    def claim(self, limit: int) -> concurrent.futures.Future[builtins.list[ClaimedTask]]:
        writer = self._writer
        if writer is None:
            return self.submit(_no_claims)

        def claim(conn: sqlite3.Connection) -> builtins.list[ClaimedTask]:
            out = writer.owner.claim(conn, limit)
            writer.undrop(c.entry.id for c in out)
            return out

        return self.submit(claim)

    def release(self, ids: Sequence[str]) -> concurrent.futures.Future[None]:
        ids = builtins.list(ids)
        writer = self._writer
        if writer is None:
            return self.submit(_nothing)

        def release(conn: sqlite3.Connection) -> None:
            # Their later saves (the runtime stops them here) must not be written.
            writer.drop(writer.owner.release(conn, ids))

        return self.submit(release)

    def park(self, task_id: str, wake_at: float) -> concurrent.futures.Future[None]:
        writer = self._writer
        if writer is None:
            return self.submit(_nothing)

        def park(conn: sqlite3.Connection) -> None:
            writer.owner.park(conn, task_id, wake_at)
            writer.drop((task_id,))  # after the last save of this run was written

        return self.submit(park)

    def request_cancel(self, task_id: str) -> bool:
        writer = self._writer
        with self._reading() as conn:
            if conn is None or writer is None:
                return False
            status = readers.status_of(conn, task_id)
        if status is None or status in FINISHED:
            return False
        self.submit(lambda conn: writer.owner.flag_cancel(conn, task_id))
        return True

    def cancel_requests(self) -> concurrent.futures.Future[builtins.list[str]]:
        writer = self._writer
        if writer is None:
            return self.submit(_no_ids)
        return self.submit(writer.owner.cancel_requests, read=True)

    # ------------------------------------------------------------------ kept steps
    def keep_step(
        self, task_id: str, name: str, value_json: str
    ) -> concurrent.futures.Future[None]:
        def keep(conn: sqlite3.Connection) -> None:
            conn.execute(_KEEP, (task_id, name, value_json))

        return self.submit(keep)

    def kept_steps(self, task_id: str) -> concurrent.futures.Future[dict[str, str]]:
        def read(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(
                "SELECT name, value FROM kept_steps WHERE task_id = ?", (task_id,)
            ).fetchall()
            return {name: value for name, value in rows}

        return self.submit(read, read=True)


def _nothing(conn: sqlite3.Connection) -> None:
    pass


def _no_claims(conn: sqlite3.Connection) -> builtins.list[ClaimedTask]:
    return []


def _no_ids(conn: sqlite3.Connection) -> builtins.list[str]:
    return []
