"""bgtasks' own table in PostgreSQL, and ``migrate``.

The queue, claims, heartbeats and aborts are procrastinate's tables; this one
holds what bgtasks answers for: the record of every task (status, progress,
result, error), the durable call itself (function, JSON arguments, options),
idempotency keys (unique across hosts), the cancel-requested flag and the
count of worker crashes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STEPS", "TABLE", "create_tables", "missing_tables"]

TABLE = "bgtasks_tasks"
STEPS = "bgtasks_steps"

#: Text columns hold JSON in the same shapes as the SQLite store's rows.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id               text PRIMARY KEY,
    name             text NOT NULL,
    status           text NOT NULL,
    created_at       double precision NOT NULL,
    started_at       double precision,
    finished_at      double precision,
    attempts         integer NOT NULL DEFAULT 0,
    error            text,
    result           text,
    progress         text,
    wake_at          double precision,
    steps            text,
    durable          boolean NOT NULL DEFAULT false,
    target           text,
    payload          text,
    options          text,
    idempotency_key  text,
    job_id           bigint,
    cancel_requested boolean NOT NULL DEFAULT false,
    crashes          integer NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_idempotency_idx
    ON {TABLE} (name, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS {TABLE}_finished_idx
    ON {TABLE} (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS {TABLE}_listing_idx ON {TABLE} (created_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS {STEPS} (
    task_id text NOT NULL,
    name    text NOT NULL,
    value   text NOT NULL,
    PRIMARY KEY (task_id, name)
);
"""


async def missing_tables(conn: Any) -> list[str]:
    """Which of the tables the store needs do not exist in this database."""
    cur = await conn.execute(
        "SELECT to_regclass(%s) IS NULL, to_regclass('procrastinate_jobs') IS NULL", (TABLE,)
    )
    row = await cur.fetchone()
    missing = []
    if row[0]:
        missing.append(TABLE)
    if row[1]:
        missing.append("procrastinate_jobs")
    return missing


async def create_tables(conn: Any, app: Any) -> list[str]:
    """Create procrastinate's schema (if absent) and bgtasks' table; returns what was made.

    Upgrading procrastinate's schema between its versions is done with its own
    migrations (``procrastinate schema --migrations-path``), as its docs say.
    """
    made: list[str] = []
    # One migrator at a time, whichever host runs it.
    await conn.execute("SELECT pg_advisory_lock(hashtext('bgtasks.migrate'))")
    try:
        missing = await missing_tables(conn)
        if "procrastinate_jobs" in missing:
            await app.schema_manager.apply_schema_async()
            made.append("procrastinate")
        await conn.execute(SCHEMA)
        if TABLE in missing:
            made.append(TABLE)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('bgtasks.migrate'))")
    return made
