"""Owners and leases, and the operations that move tasks between owners.

Leases are per process, not per task: each runtime registers an *owner* row
that its writer thread renews every ``lease / 3`` seconds, and a task belongs
to the owner named in its row. A task whose owner is gone (its lease expired,
or its process on this host no longer exists) or that nobody owns (released at
shutdown, parked until ``wake_at``) is claimed by the next runtime that looks,
in one ``BEGIN IMMEDIATE`` transaction, so one process at a time runs it.

Every function here that takes a connection runs on the writer thread, inside
its transaction.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Sequence

import psutil

from ..base import ClaimedTask
from .rows import CLAIM_COLUMNS, claimed

__all__ = ["OPEN", "ORPHAN", "Owner"]

logger = logging.getLogger("bgtasks")

OPEN = "status IN ('pending', 'running')"
_LIVE = "(SELECT id FROM owners WHERE expires_at >= ?)"
# The owner is gone: released or parked (NULL), or not among the owners whose lease holds.
ORPHAN = f"(owner IS NULL OR owner NOT IN {_LIVE})"
_DUE = "(wake_at IS NULL OR wake_at <= ?)"
# The claim's statements name their index: without statistics the planner would
# read every unfinished row, parked ones included, at every look.
_OWNED = "tasks INDEXED BY tasks_open_owner"
_GONE_OWNER = f"owner > '' AND {OPEN} AND owner NOT IN {_LIVE}"  # '' > NULL: skips parked


def _error(kind: str, message: str) -> str:
    return json.dumps({"type": kind, "message": message})


class Owner:
    """This process's owner row: its lease, and what it takes and gives back."""

    def __init__(self, owner_id: str, *, lease: float, max_crashes: int) -> None:
        self.id = owner_id
        self.lease = lease
        self.max_crashes = max_crashes
        self.host = socket.gethostname()
        self.pid = os.getpid()

    # ------------------------------------------------------------------ the lease
    def renew(self, conn: sqlite3.Connection, now: float) -> None:
        conn.execute(
            "INSERT INTO owners (id, host, pid, proc_started, expires_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at",
            (self.id, self.host, self.pid, _proc_started(self.pid), now + self.lease),
        )

    def retire(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM owners WHERE id = ?", (self.id,))

    def reap(self, conn: sqlite3.Connection, now: float) -> None:
        """Forget owners that are dead: a process of this host that no longer
        exists, or a lease that expired a day ago."""
        dead = [
            (owner,)
            for owner, host, pid, started, expires in conn.execute(
                "SELECT id, host, pid, proc_started, expires_at FROM owners WHERE id != ?",
                (self.id,),
            )
            if expires < now - 86400 or (host == self.host and not _alive(pid, started))
        ]
        if dead:
            conn.executemany("DELETE FROM owners WHERE id = ?", dead)

    # ------------------------------------------------------------------ moving tasks
    def claim(self, conn: sqlite3.Connection, limit: int) -> list[ClaimedTask]:
        """Take up to ``limit`` due orphaned durable tasks (see ``Store.claim``)."""
        now = time.time()
        self.reap(conn, now)
        crashed = _error(
            "WorkerCrashed",
            "the process running this task died; it was not durable, so it was not run "
            "again (use @background(durable=True) for that)",
        )
        conn.execute(
            f"UPDATE {_OWNED} SET status = 'failed', finished_at = ?, updated_at = ?, "
            f"error = ? WHERE durable = 0 AND {_GONE_OWNER}",
            (now, now, crashed, now),
        )
        conn.execute(
            f"UPDATE tasks INDEXED BY tasks_cancel SET status = 'cancelled', finished_at = ?, "
            f"updated_at = ? WHERE cancel_requested = 1 AND {OPEN} AND {ORPHAN}",
            (now, now, now),
        )
        if limit <= 0:
            return []
        rows: list[tuple[float, str, str, int]] = []
        for where, args in (
            (f"{_GONE_OWNER} AND {_DUE}", (now, now)),  # its process died
            ("owner IS NULL AND wake_at IS NULL", ()),  # released at a shutdown
            ("owner IS NULL AND wake_at <= ?", (now,)),  # parked or delayed, and due
        ):
            rows += conn.execute(
                f"SELECT created_at, id, status, crashes FROM {_OWNED} WHERE {where} "
                f"AND durable = 1 AND {OPEN} ORDER BY created_at LIMIT ?",
                (*args, limit),
            ).fetchall()
        rows.sort()
        out: list[ClaimedTask] = []
        for _, task_id, status, crashes in rows[:limit]:
            crashes += status == "running"
            if crashes > self.max_crashes:
                self._fail(
                    conn,
                    task_id,
                    now,
                    _error(
                        "WorkerCrashed",
                        f"the process running this task died {crashes} times while running "
                        f"it; it is not run again (max_crashes={self.max_crashes})",
                    ),
                    crashes,
                )
                continue
            row = conn.execute(
                f"SELECT {CLAIM_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            try:
                task = claimed(row)
            except ValueError as exc:
                # One bad row fails alone, saying why; the rest replay.
                message = (
                    f"the journaled task cannot be run again: {exc}. It was written by "
                    "another program or a damaged file; submit it again."
                )
                logger.error("bgtasks: task %s (%s): %s", task_id, row[1], message)
                self._fail(conn, task_id, now, _error("StoreError", message), crashes)
                continue
            conn.execute(
                "UPDATE tasks SET status = 'pending', owner = ?, crashes = ?, wake_at = NULL, "
                "updated_at = ? WHERE id = ?",
                (self.id, crashes, now, task_id),
            )
            out.append(task)
        return out

    @staticmethod
    def _fail(conn: sqlite3.Connection, task_id: str, now: float, error: str, crashes: int) -> None:
        conn.execute(
            "UPDATE tasks SET status = 'failed', finished_at = ?, updated_at = ?, "
            "error = ?, crashes = ? WHERE id = ?",
            (now, now, error, crashes, task_id),
        )

    def release(self, conn: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
        """Give these durable tasks of ours back to the queue; returns those given."""
        now = time.time()
        given: list[str] = []
        for task_id in ids:
            cur = conn.execute(
                f"UPDATE tasks SET status = 'pending', owner = NULL, updated_at = ? "
                f"WHERE id = ? AND owner = ? AND durable = 1 AND {OPEN}",
                (now, task_id, self.id),
            )
            if cur.rowcount:
                given.append(task_id)
        return given

    def park(self, conn: sqlite3.Connection, task_id: str, wake_at: float) -> None:
        conn.execute(
            f"UPDATE tasks SET status = 'pending', owner = NULL, wake_at = ?, updated_at = ? "
            f"WHERE id = ? AND owner = ? AND {OPEN}",
            (wake_at, time.time(), task_id, self.id),
        )

    def flag_cancel(self, conn: sqlite3.Connection, task_id: str) -> None:
        """Cancel an unowned task at once; flag an owned one for its owner."""
        now = time.time()
        cur = conn.execute(
            f"UPDATE tasks SET status = 'cancelled', finished_at = ?, updated_at = ? "
            f"WHERE id = ? AND {OPEN} AND {ORPHAN}",
            (now, now, task_id, now),
        )
        if cur.rowcount == 0:
            conn.execute(
                f"UPDATE tasks SET cancel_requested = 1, updated_at = ? WHERE id = ? AND {OPEN}",
                (now, task_id),
            )

    def cancel_requests(self, conn: sqlite3.Connection) -> list[str]:
        return [
            task_id
            for (task_id,) in conn.execute(
                f"SELECT id FROM tasks WHERE owner = ? AND cancel_requested = 1 AND {OPEN}",
                (self.id,),
            )
        ]


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
