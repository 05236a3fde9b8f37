"""The Store protocol: persistence only, and the values that cross it.

A store never sees the runtime or a live ``TaskHandle``. It receives immutable
snapshots (``TaskSnapshot``) and journal entries, and answers with records,
pages and claims. Everything that *acts* on what a store answers (running a
claimed task again, cancelling a task another process asked to cancel) lives
in the runtime's durable part, ``bgtasks._durable.replay``.

Threads: ``save``, ``expire``, ``forget`` and the methods that return a
``concurrent.futures.Future`` are called on the event-loop thread and must not
block it (queue the I/O and resolve the future later). ``load``, ``list``,
``stats`` and ``request_cancel`` may block for a short read: the runtime calls
them from worker threads when the store is not the memory store.

Errors: a store that cannot do what is asked raises ``bgtasks.StoreError``
(or fails the future with it), with a message that names the cause and the
fix; it may name files and hosts, so it goes to the log, never into a
response body.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import collections
import concurrent.futures
import dataclasses
import heapq
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .._task import StepRecord, TaskRecord, TaskSnapshot, TaskStatus

__all__ = [
    "ClaimedTask",
    "JournalEntry",
    "ListQuery",
    "Page",
    "StepRecord",
    "Store",
    "TaskSnapshot",
    "decode_cursor",
    "encode_cursor",
    "page_of",
    "stats_of",
]

#: Statuses a ListQuery may filter on.
STATUSES: tuple[TaskStatus, ...] = ("pending", "running", "succeeded", "failed", "cancelled")
#: Largest page a ListQuery may ask for.
MAX_LIMIT = 500


@dataclasses.dataclass(frozen=True, slots=True)
class JournalEntry:
    """One accepted call, journaled before the caller gets its handle.

    Every call with an idempotency key is journaled (the key is claimed), and
    so is every ``durable=True`` call. For a durable call ``target`` is the
    function as ``module:qualname`` and ``payload`` its arguments as JSON text;
    ``retries``, ``limits`` (``{"wall_clock", "cpu_time", "memory"}``, ``None``
    for unlimited) and ``isolation`` are what another process needs to run it
    the same way. ``idempotency_key`` is scoped by ``name``. ``wake_at`` (a
    Unix time) is set for a delayed task (``fn.using(delay=...)``): nobody
    runs it before then. ``context`` is an optional ``str -> str`` mapping
    kept for tracing (e.g. W3C ``traceparent``), handed back by ``claim``.
    """

    id: str
    name: str
    created_at: float
    target: str | None = None
    payload: str | None = None
    retries: int = 0
    limits: Mapping[str, float | int | None] | None = None
    isolation: str = "inline"
    idempotency_key: str | None = None
    wake_at: float | None = None
    context: Mapping[str, str] | None = None

    @property
    def durable(self) -> bool:
        """True for a ``durable=True`` call: another process may run it again."""
        return self.target is not None


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A journaled task this process now owns and must run (again).

    ``entry`` is the call as journaled; ``attempts`` how many attempts already
    started; ``progress`` and ``steps`` are the record's last saved progress
    and steps, as the JSON text the store kept (``None`` if none), so that the
    record goes on showing them. Kept step results are read with
    ``Store.kept_steps``.
    """

    entry: JournalEntry
    attempts: int = 0
    progress: str | None = None
    steps: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ListQuery:
    """Which records ``Store.list`` answers: newest first by ``(created_at, id)``.

    ``statuses`` and ``names`` filter (empty: all); ``limit`` is the page size
    (1 to ``MAX_LIMIT``); ``cursor`` is the ``next_cursor`` of the page before,
    or None for the first page.
    """

    statuses: tuple[TaskStatus, ...] = ()
    names: tuple[str, ...] = ()
    limit: int = 50
    cursor: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            msg = f"limit must be an int from 1 to {MAX_LIMIT}, got {self.limit!r}."
            raise ValueError(msg)
        if not 1 <= self.limit <= MAX_LIMIT:
            msg = f"limit must be from 1 to {MAX_LIMIT}, got {self.limit}."
            raise ValueError(msg)
        for status in self.statuses:
            if status not in STATUSES:
                msg = f"unknown status {status!r}; the statuses are {', '.join(STATUSES)}."
                raise ValueError(msg)
        if self.cursor is not None:
            decode_cursor(self.cursor)  # a bad cursor fails here, with its message

    @property
    def after(self) -> tuple[float, str] | None:
        """The ``(created_at, id)`` the page starts after, or None."""
        return None if self.cursor is None else decode_cursor(self.cursor)


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """One page of ``Store.list``: records without their results, newest first.

    ``next_cursor`` is None on the last page.
    """

    items: list[TaskRecord]
    next_cursor: str | None = None


def encode_cursor(created_at: float, task_id: str) -> str:
    """The opaque cursor of the page after the record ``(created_at, task_id)``."""
    raw = json.dumps([created_at, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """``(created_at, id)`` of an ``encode_cursor`` value; ValueError if it is not one."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value: Any = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error, TypeError, AttributeError):
        value = None
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (int, float))
        and not isinstance(value[0], bool)
        and isinstance(value[1], str)
    ):
        return float(value[0]), value[1]
    msg = (
        f"invalid cursor {cursor!r}: pass back the next_cursor of the page before, "
        "unchanged, or no cursor for the first page."
    )
    raise ValueError(msg)


def page_of(snapshots: Iterable[TaskSnapshot], query: ListQuery) -> Page:
    """``query`` answered from snapshots in memory, as ``Store.list`` answers it
    from a file: for a runtime whose store keeps no records (the memory store)
    to list its own registry with the same order and cursors."""
    statuses, names, after = set(query.statuses), set(query.names), query.after
    chosen = (
        s
        for s in snapshots
        if (not statuses or s.status in statuses)
        and (not names or s.name in names)
        and (after is None or (s.created_at, s.id) < after)
    )
    top = heapq.nlargest(query.limit + 1, chosen, key=lambda s: (s.created_at, s.id))
    items = top[: query.limit]
    more = len(top) > query.limit
    return Page(
        items=[s.record(include_result=False) for s in items],
        next_cursor=encode_cursor(items[-1].created_at, items[-1].id) if more else None,
    )


def stats_of(snapshots: Iterable[TaskSnapshot]) -> dict[str, dict[str, int]]:
    """``Store.stats`` of snapshots in memory (see ``page_of``)."""
    by_status: collections.Counter[str] = collections.Counter()
    by_name: collections.Counter[str] = collections.Counter()
    for s in snapshots:
        by_status[s.status] += 1
        by_name[s.name] += 1
    return {"by_status": dict(by_status), "by_name": dict(by_name)}


@runtime_checkable
class Store(Protocol):
    """What a runtime needs from a store: persistence only.

    A store that is not ``durable`` (the memory store) answers every method,
    doing what it can: see ``bgtasks.stores.memory``.
    """

    #: True if records and journaled work survive the process (the runtime
    #: then saves every transition, replays claims and polls cancel requests).
    durable: bool

    @property
    def journal_timeout(self) -> float:
        """Seconds a caller waits for ``journal`` before refusing the call."""

    @property
    def poll(self) -> float:
        """Seconds between two looks for claimable work (the runtime looks for
        cancel requests every second, or every ``poll`` if shorter)."""

    async def open(self) -> None:
        """Before the runtime accepts work: open files, check or migrate the
        schema, register this process as an owner. Raises if the store cannot
        be used, having released what it took."""

    async def close(self) -> None:
        """After the last task: commit what is queued, give up ownership, close.
        Never raises for a write that already failed (it was logged)."""

    def save(self, snapshot: TaskSnapshot) -> None:
        """Record a transition (running, finished, progress, steps).

        Must not block: queue the write. Saves of one task may be coalesced
        (the last wins). A save of a task this process no longer owns (released,
        parked, or claimed by another process) is dropped."""

    def load(self, task_id: str) -> TaskRecord | None:
        """The stored record of ``task_id`` (with its result), or None.
        A blocking read: called from worker threads."""

    def list(self, query: ListQuery) -> Page:
        """Records matching ``query``, newest first by ``(created_at, id)``,
        without results; following ``next_cursor`` visits each record once.
        A blocking read. A bad cursor raises ValueError."""

    def stats(self) -> dict[str, dict[str, int]]:
        """``{"by_status": {status: n}, "by_name": {name: n}}`` over the stored
        records. A blocking read."""

    def expire(self, cutoff: float) -> None:
        """Forget records (and kept steps) of tasks finished at or before
        ``cutoff`` (a Unix time). Must not block: queue the delete."""

    def journal(self, entry: JournalEntry) -> concurrent.futures.Future[TaskRecord | None]:
        """Record an admitted, not yet launched, call, owned by this process.

        The future resolves to None once it is stored (committed, for a durable
        store), or to the record of the task that already holds
        ``entry.idempotency_key`` (then nothing was stored). It fails with
        ``StoreError`` if the write failed."""

    def forget(self, task_id: str) -> None:
        """``journal`` of ``task_id`` failed, or found its key taken: the task
        will not run here. Must not block."""

    def claim(self, limit: int) -> concurrent.futures.Future[builtins.list[ClaimedTask]]:
        """Take up to ``limit`` journaled durable tasks to run here, oldest first:
        unfinished ones whose owner process is gone, and parked or delayed ones
        whose ``wake_at`` has passed and that no process owns. This process
        becomes their owner. A row that cannot be read is failed with an error
        that says why, not handed out; non-durable tasks of a dead owner are
        failed (nobody can run them again)."""

    def release(self, ids: Sequence[str]) -> concurrent.futures.Future[None]:
        """Graceful shutdown: these unfinished durable tasks of ours go back to
        the queue (pending, no owner) instead of being cancelled; non-durable
        ids are ignored. Later saves of them are dropped."""

    def park(self, task_id: str, wake_at: float) -> concurrent.futures.Future[None]:
        """A durable task of ours sleeps until ``wake_at``: its record becomes
        pending with ``wake_at``, owned by nobody until ``claim`` hands it out
        after that time. Later saves from this run are dropped."""

    def request_cancel(self, task_id: str) -> bool:
        """Ask for a task another process runs to be cancelled; False if it is
        unknown or finished. A task nobody owns (parked, or its process died)
        is cancelled at once. A short blocking read; the write is queued."""

    def cancel_requests(self) -> concurrent.futures.Future[builtins.list[str]]:
        """Ids of unfinished tasks this process owns that someone asked to cancel."""

    def keep_step(
        self, task_id: str, name: str, value_json: str
    ) -> concurrent.futures.Future[None]:
        """Keep the result of the step ``name`` of a durable task (JSON text);
        resolves once committed. Writes are batched: many per transaction."""

    def kept_steps(self, task_id: str) -> concurrent.futures.Future[dict[str, str]]:
        """The kept step results of ``task_id``: step name -> JSON text."""
