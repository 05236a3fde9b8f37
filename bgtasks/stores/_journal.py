"""What a durable call leaves in a store's journal."""

from __future__ import annotations

import dataclasses

__all__ = ["JournalEntry"]


@dataclasses.dataclass(frozen=True, slots=True)
class JournalEntry:
    """One accepted call, written before the caller gets its handle.

    ``target``, ``payload`` and ``options`` are set for a durable call only: the
    function as ``module:qualname``, its arguments as JSON, and its retries,
    limits and isolation as JSON. ``idempotency_key`` is scoped by ``name``.
    """

    id: str
    name: str
    created_at: float
    durable: bool
    target: str | None = None
    payload: str | None = None
    options: str | None = None
    idempotency_key: str | None = None
