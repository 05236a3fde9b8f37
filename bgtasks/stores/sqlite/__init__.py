"""The SQLite store: one file, shared by the worker processes of one machine.

- ``store.py``: ``SQLiteStore``, the Store protocol over the parts below;
- ``schema.py``: the schema and its migrations;
- ``writer.py``: the writer thread and its batches;
- ``owners.py``: owners, leases, claims, release, park and cancel requests;
- ``readers.py``: the bounded reader pool and the read queries;
- ``rows.py``: rows <-> snapshots, records and claims;
- ``errors.py``: sqlite3 errors told as StoreErrors.
"""

from __future__ import annotations

from ..base import ClaimedTask as ClaimedTask
from .schema import SCHEMA_VERSION as SCHEMA_VERSION
from .store import SQLiteStore as SQLiteStore

__all__ = ["SCHEMA_VERSION", "ClaimedTask", "SQLiteStore"]
