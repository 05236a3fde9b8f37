"""Where task records live: the Store protocol and ``open_store``.

The runtime always keeps the tasks it runs in memory (their handles). A store
adds what memory cannot: records other processes can read, and a journal of
accepted work that survives the process. ``MemoryStore`` adds nothing, which
keeps the default hot path free of I/O.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._journal import JournalEntry
from .memory import MemoryStore

if TYPE_CHECKING:
    from .._runtime import Runtime
    from .._task import TaskHandle, TaskRecord

__all__ = ["JournalEntry", "MemoryStore", "Store", "open_store"]


@runtime_checkable
class Store(Protocol):
    """What a runtime needs from a store. Every method may be called on the
    event-loop thread: sync ones must not block (queue the I/O instead)."""

    #: True if records and journaled work survive the process.
    durable: bool

    async def open(self, runtime: Runtime) -> None:
        """Before the runtime accepts work: open files, check the schema."""

    async def started(self, runtime: Runtime) -> None:
        """The runtime accepts work: e.g. replay journaled tasks."""

    async def close(self, runtime: Runtime) -> None:
        """After the last task: flush and close."""

    def save(self, task: TaskHandle) -> None:
        """Record a transition of ``task`` (pending, running, finished, progress)."""

    def load(self, task_id: str) -> TaskRecord | None:
        """A record this runtime does not hold in memory (another process's)."""

    def expire(self, runtime: Runtime, cutoff: float) -> None:
        """Forget records of tasks finished before ``cutoff`` (a Unix time)."""

    async def before_cancel(self, runtime: Runtime, tasks: Sequence[TaskHandle]) -> None:
        """Shutdown is about to cancel ``tasks`` (a durable store keeps them queued)."""

    # Durable calls and idempotency keys (used by bgtasks._durable). A store
    # that is not durable still answers them: it keeps keys in memory.

    @property
    def journal_timeout(self) -> float:
        """Seconds a caller waits for ``journal`` before refusing the call."""

    def journal(
        self, runtime: Runtime, entry: JournalEntry
    ) -> concurrent.futures.Future[TaskRecord | None]:
        """Record an admitted, not yet launched, call. The future resolves to None
        once it is stored (committed, for a durable store), or to the record of
        the task that already holds ``entry.idempotency_key``."""

    def forget_journal(self, task_id: str) -> None:
        """``journal`` failed or found the key taken: the task will not run here."""

    def request_cancel(self, task_id: str) -> bool:
        """Cancel a task another process runs (shared stores only); False if it is
        unknown or finished. It must not wait for a write: the owner cancels the task soon after."""


def open_store(spec: object) -> Store:
    """``"memory"``, ``"sqlite:///path.db"`` or a ``Store`` instance."""
    if isinstance(spec, str):
        if spec == "memory":
            return MemoryStore()
        if spec.startswith("sqlite://"):
            try:
                from .sqlite import SQLiteStore
            except ImportError as exc:  # pragma: no cover - shipped with the package
                msg = f"the SQLite store is not available: {exc}"
                raise ValueError(msg) from exc
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
    msg = f"store must be 'memory', 'sqlite:///path.db' or a Store, got {type(spec).__name__}."
    raise TypeError(msg)
