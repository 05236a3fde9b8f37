"""The file's schema and its migrations.

``PRAGMA user_version`` holds the schema version. Each migration takes a file
from one version to the next inside the opening ``BEGIN IMMEDIATE``
transaction, so every process sharing the file sees the old schema or the new
one, never half of it; a file written by a newer bgtasks is refused.

- 1: tasks (records and the journal), owners (leases).
- 2: steps and wake_at columns; kept_steps; the listing indexes (newest
  first by ``(created_at, id)``, overall, per status and per name); the
  claim index (unfinished tasks by owner, durable and wake_at, replacing
  version 1's index of unfinished tasks by age), so that many parked tasks
  cost a claim nothing.
"""

from __future__ import annotations

import sqlite3

from ..._errors import StoreError

__all__ = ["SCHEMA_VERSION", "migrate"]

SCHEMA_VERSION = 2

_V1 = """
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

_V2 = """
ALTER TABLE tasks ADD COLUMN steps TEXT;
ALTER TABLE tasks ADD COLUMN wake_at REAL;
CREATE TABLE IF NOT EXISTS kept_steps (
    task_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (task_id, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_newest ON tasks (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS tasks_status_newest ON tasks (status, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS tasks_name_newest ON tasks (name, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS tasks_open_owner
    ON tasks (owner, durable, wake_at) WHERE status IN ('pending', 'running');
DROP INDEX IF EXISTS tasks_open;
"""

#: _MIGRATIONS[v] takes a file from version v to v + 1.
_MIGRATIONS = (_V1, _V2)
assert len(_MIGRATIONS) == SCHEMA_VERSION


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file to ``SCHEMA_VERSION``; call inside ``BEGIN IMMEDIATE``."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        msg = (
            f"the task store {path!r} has schema version {version}, written by a "
            f"newer bgtasks (this one knows version {SCHEMA_VERSION}); upgrade bgtasks "
            "in every process that shares the file, or point store= at another file."
        )
        raise StoreError(msg)
    for script in _MIGRATIONS[version:]:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    if version < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
