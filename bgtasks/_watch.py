"""Push for one task, with no framework in it: change notifications, long-poll, SSE.

The runtime calls ``Hub.notify(task_id)`` on every change of a task (status,
progress); a reader waits for the next change with a ``Waiter``, from async
code (``AsyncWaiter``, the ASGI side) or from a server thread
(``ThreadWaiter``, the WSGI side). Nobody waiting costs the runtime one
attribute check per change.

``GET <status_url>?wait=N`` answers once the task has finished or after N
seconds; ``GET <status_url>/events`` streams ``event: record`` frames at once
and on every change, coalescing bursts, with a heartbeat comment while idle,
and ends after the finish. Both are bounded by a ``Slots`` count: past it they
answer ``503`` with ``Retry-After``. Waiters are removed in ``finally`` blocks,
so a client that leaves (or a server that closes the response) leaks none.
A task run by another process (a shared store) sends no notification here;
its record is read again every ``poll`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from ._task import TaskRecord

__all__ = [
    "ANY",
    "DEFAULT_WATCH",
    "MAX_WAIT",
    "AsyncWaiter",
    "Hub",
    "Slots",
    "ThreadWaiter",
    "WatchConfig",
    "event_stream",
    "event_stream_sync",
    "long_poll",
    "long_poll_sync",
    "parse_wait",
    "sse_comment",
    "sse_record",
]

#: Wait for a change of any task (the dashboard's live list).
ANY = "*"
#: The longest ``?wait=N`` a client may ask for, in seconds.
MAX_WAIT = 60.0
SSE_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("x-accel-buffering", "no"),  # nginx: pass each frame on at once
]


@dataclasses.dataclass(frozen=True, slots=True)
class WatchConfig:
    """How push behaves: bounds and pacing (seconds)."""

    #: Long-polls and event streams open at once in this process; more get 503.
    max_watchers: int = 100
    #: Least time between two frames of one stream: a burst of progress is one frame.
    coalesce: float = 0.2
    #: A comment line after this long without a frame (keeps proxies from closing it).
    heartbeat: float = 15.0
    #: How often a task that sends no notification here (another process's) is read again.
    poll: float = 1.0
    #: Longest life of one stream; the client reconnects (``EventSource`` does by
    #: itself). Servers wait for open responses before they stop (uvicorn, unless
    #: ``--timeout-graceful-shutdown``): this bounds how long a stream delays that.
    max_stream: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_watchers, bool) or not isinstance(self.max_watchers, int):
            msg = f"max_watchers must be an int >= 0, got {self.max_watchers!r}."
            raise TypeError(msg)
        if self.max_watchers < 0:
            msg = f"max_watchers must be >= 0 (0 turns push off), got {self.max_watchers}."
            raise ValueError(msg)
        for what in ("coalesce", "heartbeat", "poll", "max_stream"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                msg = f"{what} must be a number of seconds > 0, got {value!r}."
                raise ValueError(msg)


DEFAULT_WATCH = WatchConfig()


class _Waiter:
    """One reader waiting for changes; ``wake`` may be called from any thread."""

    __slots__ = ("changed",)

    def __init__(self) -> None:
        self.changed = False

    def wake(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class ThreadWaiter(_Waiter):
    """Waits in a (non-event-loop) thread: a WSGI server's request thread."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        super().__init__()
        self._event = threading.Event()

    def wake(self) -> None:
        self.changed = True
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True if something changed since the last wait; False after ``timeout``."""
        got = self._event.wait(max(0.0, timeout))
        self._event.clear()
        changed, self.changed = self.changed, False
        return got or changed


class AsyncWaiter(_Waiter):
    """Waits on an event loop (the ASGI server's)."""

    __slots__ = ("_fut", "_loop", "_thread")

    def __init__(self) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._fut: asyncio.Future[None] | None = None

    def wake(self) -> None:
        self.changed = True
        if threading.get_ident() == self._thread:
            self._set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                self._loop.call_soon_threadsafe(self._set)

    def _set(self) -> None:
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, timeout: float, *, unless: asyncio.Future[Any] | None = None) -> bool:
        """True if something changed; False after ``timeout`` or once ``unless`` is done."""
        if not self.changed:
            fut = self._fut = self._loop.create_future()
            waits: set[asyncio.Future[Any]] = {fut}
            if unless is not None:
                waits.add(unless)
            try:
                await asyncio.wait(
                    waits, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                self._fut = None
                fut.cancel()
        changed, self.changed = self.changed, False
        return changed


class Hub:
    """Who waits for which task. The runtime calls ``notify`` on every change."""

    __slots__ = ("_lock", "_waiters", "active")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[_Waiter]] = {}
        #: True while anyone waits: the runtime's one check before notifying.
        self.active = False

    def notify(self, task_id: str) -> None:
        """``task_id`` changed: wake whoever waits for it (or for any task)."""
        if not self.active:
            return
        with self._lock:
            found = [*self._waiters.get(task_id, ()), *self._waiters.get(ANY, ())]
        for waiter in found:
            waiter.wake()

    def add(self, task_id: str, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.setdefault(task_id, []).append(waiter)
            self.active = True

    def remove(self, task_id: str, waiter: _Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[task_id]
            self.active = bool(self._waiters)

    @contextlib.contextmanager
    def watching(self, task_id: str, waiter: _Waiter) -> Iterator[None]:
        self.add(task_id, waiter)
        try:
            yield
        finally:
            self.remove(task_id, waiter)

    def count(self) -> int:
        """How many waiters are registered (0 when every reader has gone)."""
        with self._lock:
            return sum(len(w) for w in self._waiters.values())


class Slots:
    """A bound on open long-polls and streams: ``try_take`` is False past it."""

    __slots__ = ("_lock", "limit", "taken")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            if self.taken >= self.limit:
                return False
            self.taken += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.taken -= 1


def parse_wait(values: list[str]) -> float | str:
    """Seconds asked by ``?wait=N``, or an error message for a 400."""
    if len(values) != 1:
        return "give wait at most once, as a number of seconds from 0 to 60"
    try:
        seconds = float(values[0])
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_WAIT:  # also False for nan
        return f"wait must be a number of seconds from 0 to {MAX_WAIT:g}, got {values[0]!r}"
    return seconds


def _record_json(record: TaskRecord, include_result: bool) -> str:
    return record.model_dump_json(exclude=None if include_result else {"result"})


def sse_record(data: str) -> bytes:
    """One ``event: record`` frame; ``data`` is one line of JSON."""
    return f"event: record\ndata: {data}\n\n".encode()


def sse_comment(text: str = "keep-alive") -> bytes:
    """A comment line: clients ignore it, proxies see traffic."""
    return f": {text}\n\n".encode()


#: First bytes of every stream: a client that loses it reconnects after 1 s.
SSE_PREAMBLE = b"retry: 1000\n\n"
#: Longest single wait while a ``stopping`` check is given: how soon a stream
#: or a long-poll notices that the server is stopping.
STOP_CHECK = 0.5

Read = Callable[[], Awaitable[TaskRecord | None]]
ReadSync = Callable[[], TaskRecord | None]


async def event_stream(
    read: Read,
    hub: Hub,
    task_id: str,
    *,
    local: Callable[[], bool],
    include_result: bool,
    config: WatchConfig,
    disconnected: asyncio.Future[Any] | None = None,
) -> AsyncIterator[bytes]:
    """The frames of ``GET <status_url>/events``, from async code.

    ``read`` gives the record as it is now (None once it is gone);
    ``local()`` says whether this process runs the task (it then notifies;
    if not, the record is read again every ``config.poll`` seconds). The
    stream ends after a finished record, or when ``disconnected`` is done.
    """
    waiter = AsyncWaiter()
    with hub.watching(task_id, waiter):
        yield SSE_PREAMBLE
        last = ""
        sent_at = opened = time.monotonic()
        while True:
            record = await read()
            if record is None:
                return
            data = _record_json(record, include_result)
            if data != last:
                last = data
                sent_at = time.monotonic()
                yield sse_record(data)
            if record.finished:
                return
            now = time.monotonic()
            left = opened + config.max_stream - now
            if left <= 0:
                return  # the client reconnects and gets the record at once
            timeout = min(config.heartbeat - (now - sent_at), left)
            if not local():
                timeout = min(timeout, config.poll)
            changed = await waiter.wait(timeout, unless=disconnected)
            if disconnected is not None and disconnected.done():
                return
            if changed:
                # Coalesce: at most one frame per `coalesce` seconds; changes that
                # come meanwhile are in the record read after the pause.
                pause = config.coalesce - (time.monotonic() - sent_at)
                if pause > 0 and disconnected is None:
                    await asyncio.sleep(pause)
                elif pause > 0 and disconnected is not None:
                    await asyncio.wait((disconnected,), timeout=pause)
                    if disconnected.done():
                        return
            elif time.monotonic() - sent_at >= config.heartbeat:
                sent_at = time.monotonic()
                yield sse_comment()


async def change_stream(
    hub: Hub,
    *,
    config: WatchConfig,
    every: float = 1.0,
    disconnected: asyncio.Future[Any] | None = None,
) -> AsyncIterator[bytes]:
    """``event: change`` once per burst of changes of any task (at most one per ``every`` s).

    The dashboard's list reloads its page on each; the frames carry no data.
    """
    waiter = AsyncWaiter()
    with hub.watching(ANY, waiter):
        yield SSE_PREAMBLE
        # At once: a client that reconnected may have missed changes meanwhile.
        yield b"event: change\ndata: {}\n\n"
        sent_at = opened = time.monotonic()
        while True:
            now = time.monotonic()
            left = opened + config.max_stream - now
            if left <= 0:
                return
            changed = await waiter.wait(
                min(config.heartbeat - (now - sent_at), left), unless=disconnected
            )
            if disconnected is not None and disconnected.done():
                return
            if changed:
                pause = every - (time.monotonic() - sent_at)
                if pause > 0:
                    if disconnected is None:
                        await asyncio.sleep(pause)
                    else:
                        await asyncio.wait((disconnected,), timeout=pause)
                        if disconnected.done():
                            return
                waiter.changed = False  # what came during the pause is in this event
                sent_at = time.monotonic()
                yield b"event: change\ndata: {}\n\n"
            elif time.monotonic() - sent_at >= config.heartbeat:
                sent_at = time.monotonic()
                yield sse_comment()


def event_stream_sync(
    read: ReadSync,
    hub: Hub,
    task_id: str,
    *,
    local: Callable[[], bool],
    include_result: bool,
    config: WatchConfig,
    stopping: Callable[[], bool] | None = None,
) -> Iterator[bytes]:
    """``event_stream`` for a WSGI server thread (which it holds while open).

    A client that left is noticed when a write fails (at the latest at the
    next heartbeat); the server then closes this generator and the waiter goes.
    ``stopping()`` True (the server is stopping) ends the stream within
    ``STOP_CHECK`` seconds, so the server thread is free for the shutdown.
    """
    waiter = ThreadWaiter()
    with hub.watching(task_id, waiter):
        yield SSE_PREAMBLE
        last = ""
        sent_at = opened = time.monotonic()
        while True:
            record = read()
            if record is None:
                return
            data = _record_json(record, include_result)
            if data != last:
                last = data
                sent_at = time.monotonic()
                yield sse_record(data)
            if record.finished:
                return
            now = time.monotonic()
            left = opened + config.max_stream - now
            if left <= 0 or (stopping is not None and stopping()):
                return
            timeout = min(config.heartbeat - (now - sent_at), left)
            if not local():
                timeout = min(timeout, config.poll)
            if stopping is not None:
                timeout = min(timeout, STOP_CHECK)
            if waiter.wait(timeout):
                pause = config.coalesce - (time.monotonic() - sent_at)
                if pause > 0:
                    time.sleep(pause)  # a server thread, never the event loop
            elif time.monotonic() - sent_at >= config.heartbeat:
                sent_at = time.monotonic()
                yield sse_comment()


async def long_poll(
    read: Read,
    hub: Hub,
    task_id: str,
    seconds: float,
    *,
    local: Callable[[], bool],
    config: WatchConfig,
    disconnected: asyncio.Future[Any] | None = None,
) -> TaskRecord | None:
    """The record once the task has finished, or as it is after ``seconds``."""
    deadline = time.monotonic() + seconds
    waiter = AsyncWaiter()
    with hub.watching(task_id, waiter):
        while True:
            record = await read()
            left = deadline - time.monotonic()
            if record is None or record.finished or left <= 0:
                return record
            if disconnected is not None and disconnected.done():
                return record
            await waiter.wait(left if local() else min(left, config.poll), unless=disconnected)


def long_poll_sync(
    read: ReadSync,
    hub: Hub,
    task_id: str,
    seconds: float,
    *,
    local: Callable[[], bool],
    config: WatchConfig,
    stopping: Callable[[], bool] | None = None,
) -> TaskRecord | None:
    """``long_poll`` for a WSGI server thread; answers early once ``stopping()``."""
    deadline = time.monotonic() + seconds
    waiter = ThreadWaiter()
    with hub.watching(task_id, waiter):
        while True:
            record = read()
            left = deadline - time.monotonic()
            if record is None or record.finished or left <= 0:
                return record
            if stopping is not None and stopping():
                return record
            timeout = left if local() else min(left, config.poll)
            waiter.wait(timeout if stopping is None else min(timeout, STOP_CHECK))


def busy_reply_body(config: WatchConfig) -> bytes:
    return json.dumps(
        {
            "detail": (
                f"too many open long-polls and event streams (max_watchers="
                f"{config.max_watchers}); retry later, or poll the status URL."
            )
        }
    ).encode()
