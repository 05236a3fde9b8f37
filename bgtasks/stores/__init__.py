"""Where task records live: the Store protocol and ``open_store``.

The runtime always keeps the tasks it runs in memory. A store adds what
memory cannot: records other processes can read, and a journal of accepted
work that survives the process. ``MemoryStore`` adds nothing, which keeps the
default hot path free of I/O. The protocol and its values are in ``base``.
"""

from __future__ import annotations

from .base import ClaimedTask as ClaimedTask
from .base import JournalEntry as JournalEntry
from .base import ListQuery as ListQuery
from .base import Page as Page
from .base import Store as Store
from .base import TaskSnapshot as TaskSnapshot
from .memory import MemoryStore as MemoryStore

__all__ = [
    "ClaimedTask",
    "JournalEntry",
    "ListQuery",
    "MemoryStore",
    "Page",
    "Store",
    "TaskSnapshot",
    "open_store",
]


def open_store(spec: object) -> Store:
    """``"memory"``, ``"sqlite:///path.db"`` or a ``Store`` instance."""
    if isinstance(spec, str):
        if spec == "memory":
            return MemoryStore()
        if spec.startswith("sqlite://"):
            from .sqlite import SQLiteStore

            return SQLiteStore.from_url(spec)
        if spec.startswith(("postgresql://", "postgres://")):
            try:
                from .postgres import PostgresStore
            except ImportError as exc:
                msg = (
                    f"store={spec.split('://')[0]}://... needs the postgres extra "
                    f"(pip install 'bgtasks[postgres]'): {exc}"
                )
                raise ValueError(msg) from exc
            return PostgresStore.from_url(spec)
        msg = (
            f"unknown store {spec!r}; use store='memory', store='sqlite:///path/to/file.db' "
            "(three slashes before a relative path, four before an absolute one) or "
            "store='postgresql://user:password@host:5432/db'."
        )
        raise ValueError(msg)
    if isinstance(spec, Store):
        return spec
    missing = [name for name in _MEMBERS if not hasattr(spec, name)]
    if 0 < len(missing) < len(_MEMBERS) // 2:  # an attempt at a Store, incomplete
        msg = (
            f"store {type(spec).__name__} is missing {', '.join(missing)} of the Store "
            "protocol (bgtasks.stores.base.Store); implement them, or subclass "
            "bgtasks.stores.MemoryStore and override what you need."
        )
        raise TypeError(msg)
    msg = f"store must be 'memory', 'sqlite:///path.db' or a Store, got {type(spec).__name__}."
    raise TypeError(msg)


_MEMBERS = sorted(
    name for name in {*Store.__annotations__, *dir(Store)} if not name.startswith("_")
)
