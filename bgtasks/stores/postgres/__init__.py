"""Many hosts: task records in PostgreSQL, durable work run by procrastinate.

``Runtime(store="postgresql://user:password@host:5432/db")`` (extra
``bgtasks[postgres]``). Every host shares one table of records, so any host
answers the status route, cancels, and sees idempotency keys. A durable call
commits its record and a procrastinate job in one transaction before it
returns; a consuming host's worker fetches the job and hands the task to its
runtime through ``claim``.

- ``store.py``: ``PostgresStore``, the Store protocol;
- ``_engine.py``: the procrastinate side (retry policy, held jobs);
- ``_schema.py``: bgtasks' tables and ``migrate``;
- ``_loop.py``: the store's own event loop thread.
"""

from __future__ import annotations

from .store import PostgresStore as PostgresStore

__all__ = ["PostgresStore"]
