"""Submitting a call that is journaled first: durable calls and idempotency keys.

The task is admitted in memory, its ``JournalEntry`` goes to the store, and
it is launched only once the store confirms (for a durable store: committed),
or it is replaced by the task that already holds its idempotency key.
Idempotency keys map ``(task name, key)`` to one task: in the store's unique
index when the store is durable, in the memory store (per process) otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import weakref
from typing import TYPE_CHECKING, Any

from .._errors import RegistryFull, StoreError
from .._handle import TaskHandle
from .._limits import Limits
from .._spec import Spec
from .._state import ctl_of
from .._task import TaskRecord, TaskStatus
from ..stores.base import JournalEntry
from .codec import codec_of, target_of

if TYPE_CHECKING:
    from .._api import _Options
    from .._runner import Ticket
    from .._runtime import Runtime
    from ..stores.base import Store

__all__ = ["RemoteHandle", "limits_json", "submit_durable", "submit_durable_async"]

logger = logging.getLogger("bgtasks")

_warned: weakref.WeakSet[Runtime] = weakref.WeakSet()
_warned_blocking: weakref.WeakSet[Runtime] = weakref.WeakSet()


@dataclasses.dataclass(slots=True)
class _Pending:
    """A task admitted in memory whose journal write is in flight."""

    rt: Runtime
    store: Store
    ticket: Ticket
    entry: JournalEntry
    future: concurrent.futures.Future[TaskRecord | None]

    @property
    def task(self) -> TaskHandle:
        return self.ticket.handle

    @property
    def on_loop(self) -> bool:
        """Reserved on the runtime's loop thread: settle it there too."""
        return self.ticket.on_loop

    def settle_later(self) -> None:
        """The caller stopped waiting: let the commit decide, whenever it comes."""

        def done(fut: concurrent.futures.Future[TaskRecord | None]) -> None:
            loop = self.rt._loop
            if not self.on_loop:
                _settle_late(self, fut)
            elif loop is not None:
                with contextlib.suppress(RuntimeError):  # closed: the journal keeps it
                    loop.call_soon_threadsafe(_settle_late, self, fut)

        self.future.add_done_callback(done)


def submit_durable(
    rt: Runtime, opts: _Options[Any, Any], spec: Spec, idempotency_key: str | None
) -> TaskHandle:
    """Submit ``spec``, returning the existing task for ``idempotency_key`` if any.

    With a durable store the call is journaled (committed) before this returns;
    on the event-loop thread that blocks the loop for the write (logged once per
    runtime; ``fn.submit_async`` and the endpoint path use ``submit_durable_async``,
    which awaits it instead).
    """
    begun = _begin(rt, opts, spec, idempotency_key)
    fut = begun.future
    if begun.on_loop and begun.store.durable and rt not in _warned_blocking:
        _warned_blocking.add(rt)
        logger.warning(
            "bgtasks: %s(...) was called on the event loop's thread, outside a "
            "@background endpoint, so the loop waits for its journal write to be "
            "committed (up to the store's busy_timeout if another process holds the "
            "lock). In a coroutine, use `await %s.submit_async(...)`, which awaits the "
            "write and returns the same TaskHandle.",
            opts.fn.__name__,
            opts.fn.__name__,
        )
    if not fut.done():
        timeout = begun.store.journal_timeout
        try:
            concurrent.futures.wait((fut,), timeout)
        except BaseException:  # KeyboardInterrupt while waiting
            begun.settle_later()
            raise
        if not fut.done():
            begun.settle_later()
            rt._refuse(opts.name, "store")
            msg = (
                f"the task store did not confirm the journal write within {timeout:g}s; "
                "the call was not accepted (it may still run once the store answers). "
                "Retry later."
            )
            raise RegistryFull(msg, retry_after=1.0)
    return _outcome(begun)


async def submit_durable_async(
    rt: Runtime, opts: _Options[Any, Any], spec: Spec, idempotency_key: str | None
) -> TaskHandle:
    """``submit_durable`` for async callers: the event loop never waits on the write."""
    begun = _begin(rt, opts, spec, idempotency_key)
    if not begun.future.done():
        try:
            await asyncio.shield(asyncio.wrap_future(begun.future))
        except asyncio.CancelledError:
            # The caller went away; the commit, not the caller, decides the task's fate.
            begun.settle_later()
            raise
        except Exception:
            pass  # _outcome reports it
    return _outcome(begun)


def _begin(rt: Runtime, opts: _Options[Any, Any], spec: Spec, key: str | None) -> _Pending:
    store = rt.store
    payload = target = None
    if opts.durable:
        codec = codec_of(opts.fn)
        args, kwargs, payload = codec.dump(opts.name, spec.args, spec.kwargs)
        spec = Spec(spec.kind, spec.fn, args, kwargs, spec.limits, spec.retries, spec.wake_at)
        target = target_of(opts.fn)
        if not store.durable and rt not in _warned:
            _warned.add(rt)
            logger.warning(
                "bgtasks: durable task %r runs on a runtime whose store is not durable; "
                "nothing survives a crash. Use Runtime(store='sqlite:///path.db') to "
                "journal durable tasks.",
                opts.name,
            )
    origin = rt._carrier() if opts.durable and rt._observers else None
    ticket = rt.reserve(opts.name, spec)
    t = ticket.handle
    if opts.durable and store.durable:
        ctl_of(t).durable = True  # its kept steps live in the store
    if rt._observers:
        observed = rt._runner.observed(t)
        observed.durable = opts.durable
        observed.origin = origin  # so that a replay can link to the submitter's trace
    entry = JournalEntry(
        id=t._id,
        name=opts.name,
        created_at=t._created_at,
        target=target,
        payload=payload,
        retries=spec.retries,
        limits=limits_json(spec.limits) if opts.durable else None,
        isolation=opts.isolation,
        idempotency_key=key,
        wake_at=spec.wake_at,
        context=origin,
    )
    try:
        fut = store.journal(entry)
    except BaseException:
        ticket.retract()
        raise
    return _Pending(rt, store, ticket, entry, fut)


def _outcome(begun: _Pending) -> TaskHandle:
    exc = begun.future.exception()
    if exc is not None:
        raise _refused(begun, exc) from exc
    return _settle(begun, begun.future.result())


def _settle(begun: _Pending, existing: TaskRecord | None) -> TaskHandle:
    rt, t = begun.rt, begun.task
    if existing is None:
        if begun.entry.durable and getattr(begun.store, "dispatches_durable", False):
            # Committed with its engine's job: a consuming host runs it.
            begun.ticket.retract()
            return RemoteHandle.of(rt, t.record)
        return begun.ticket.launch()
    store = begun.store
    handle = rt.handle(existing.id)
    if handle is None and not store.durable:
        # A per-process key whose holder this runtime no longer has (it expired):
        # the key is free again. (A store that is not durable answers at once.)
        store.forget(existing.id)
        retry = store.journal(begun.entry)
        holder = retry.result() if retry.done() and retry.exception() is None else existing
        if holder is None:
            return begun.ticket.launch()
        existing, handle = holder, rt.handle(holder.id)
    # Another task already holds this idempotency key: that one is the answer.
    store.forget(t._id)
    begun.ticket.retract()
    if handle is not None:
        return handle
    return RemoteHandle.of(rt, existing)


def _settle_late(begun: _Pending, fut: concurrent.futures.Future[TaskRecord | None]) -> None:
    try:
        exc = fut.exception()
        if exc is None:
            _settle(begun, fut.result())
        else:
            _refused(begun, exc)
    except Exception:  # a closed loop: the journal keeps the task for the next start
        logger.debug("bgtasks: could not settle task %s", begun.task._id, exc_info=True)


def _refused(begun: _Pending, exc: BaseException) -> BaseException:
    begun.store.forget(begun.task._id)
    begun.ticket.retract()
    if isinstance(exc, StoreError):
        begun.rt._refuse(begun.entry.name, "store")
        # The detail (a path, a database URL) goes to the log, never to a client.
        logger.error("bgtasks: task %r could not be journaled: %s", begun.entry.name, exc)
        msg = "the call was not accepted: it could not be journaled (see the log). Retry later."
        return RegistryFull(msg, retry_after=1.0)
    return exc


def limits_json(limits: Limits) -> dict[str, Any]:
    return {
        "wall_clock": limits.wall_clock,
        "cpu_time": limits.cpu_time,
        "memory": limits.memory_bytes,
    }


class RemoteHandle(TaskHandle):
    """A task that another process (or an earlier runtime) runs.

    Returned for an idempotency key that a task outside this runtime holds.
    ``status`` and ``record`` are read from the store each time; ``wait``
    polls it.
    """

    __slots__ = ()

    @classmethod
    def of(cls, rt: Runtime, record: TaskRecord) -> RemoteHandle:
        handle = cls(rt, record.id, record.name)
        handle._created_at = record.created_at.timestamp()
        handle._attempts = record.attempts
        handle._status = record.status
        return handle

    def _fresh(self) -> TaskRecord | None:
        record = self._rt.get(self._id)
        if record is not None:
            self._status = record.status
        return record

    @property
    def status(self) -> TaskStatus:
        """The stored status; on an event loop's thread, the last one read (a
        store read there could hold the loop: ``await handle.wait()`` reads it
        off the loop)."""
        if asyncio._get_running_loop() is None:
            self._fresh()
        return self._status

    @property
    def record(self) -> TaskRecord:
        return self._fresh() or super().record

    async def wait(self, timeout: float | None = None) -> TaskRecord:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.02
        while True:
            record = await asyncio.to_thread(self._fresh) or super().record
            if record.finished:
                return record
            if deadline is not None and loop.time() + delay > deadline:
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def wait_sync(self, timeout: float | None = None) -> TaskRecord:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            record = self.record
            if record.finished:
                return record
            if deadline is not None and time.monotonic() + delay > deadline:
                msg = f"task {self._id} did not finish within {timeout} seconds"
                raise TimeoutError(msg)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
