"""Push and dashboard routes: rows in the route table of ``bgtasks._http``.

``Watch.install(router)`` adds the rows: ``GET <status_url>?wait=N``,
``GET <status_url>/events`` and, when the app turned the dashboard on, every
path under its prefix. A handler answers a ``Reply`` as every route does, or
a ``Push``: a reply the adapter does not send as it is but hands back to
``Watch`` (``serve_asgi`` / ``serve_wsgi``) to wait or to stream. Who may see
the dashboard (the app's ``dashboard`` callable) is asked by the adapter
before the route runs, for the paths ``Watch.gated`` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import urllib.parse
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    MutableMapping,
)
from typing import Any, Literal

from ._dashboard import SECURITY_HEADERS, DashboardRoutes, StreamRequest
from ._dashboard import not_found as dashboard_not_found
from ._http import Ask, Call, Reply, Route, Router, Step, not_found, task_status
from ._ids import is_valid_id
from ._task import TaskRecord
from ._watch import (
    SSE_HEADERS,
    Slots,
    WatchConfig,
    busy_reply_body,
    change_stream,
    event_stream,
    event_stream_sync,
    long_poll,
    long_poll_sync,
    parse_wait,
)

__all__ = ["Push", "Watch"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]

_READ = frozenset(("GET", "HEAD"))


@dataclasses.dataclass(frozen=True, slots=True)
class Push(Reply):
    """A route's answer that is not sent as it is: wait for the task, or stream it.

    ``kind``: ``"wait"`` (long-poll ``seconds``), ``"events"`` (the task's
    record stream) or ``"changes"`` (change events of every task).
    """

    kind: Literal["wait", "events", "changes"]
    task_id: str | None
    seconds: float
    include_result: bool
    extra_headers: tuple[tuple[str, str], ...] = ()


def _push(
    kind: Literal["wait", "events", "changes"],
    task_id: str | None,
    *,
    include_result: bool,
    seconds: float = 0.0,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> Push:
    return Push(200, [], b"", kind, task_id, seconds, include_result, extra_headers)


def _json_reply(status: int, body: bytes, extra: list[tuple[str, str]] | None = None) -> Reply:
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        *(extra or []),
    ]
    return Reply(status, headers, body)


def _bad_request(message: str) -> Reply:
    return _json_reply(400, json.dumps({"detail": message}).encode())


def _only(reply: Reply) -> Step:
    """A route step that answers at once (a generator, as routes are)."""
    return reply
    yield  # pragma: no cover - never reached; makes this a generator


class Watch:
    """The push rows of a router, the dashboard's rows, and the bound they share."""

    def __init__(self, *, dashboard: DashboardRoutes | None, config: WatchConfig) -> None:
        self.dashboard = dashboard
        self.config = config
        self.slots = Slots(config.max_watchers)
        self._status_prefix: str | None = None
        self._server: tuple[int, Callable[[], bool] | None] | None = None

    # ------------------------------------------------------------------ the table
    def install(self, router: Router, *, status: bool = True) -> None:
        """Add the rows to ``router``: push on its status routes (if ``status``), the dashboard."""
        if status:
            self._status_prefix = router.prefix
            # Ahead of the plain status row, which answers what this one passes on.
            router.routes.insert(0, Route(router.prefix, "/{task_id}", _READ, self._task_wait))
            router.add(Route(router.prefix, "/{task_id}/events", _READ, self._task_events))
        board = self.dashboard
        if board is None:
            return
        prefix = board.prefix
        for pattern, methods in (
            ("", _READ),
            ("/", _READ),
            ("/static/{name}", _READ),
            ("/api/tasks", _READ),
            ("/api/stats", _READ),
            ("/api/events", _READ),
            ("/api/tasks/{task_id}", _READ),
            ("/api/tasks/{task_id}/events", _READ),
            ("/api/tasks/{task_id}/cancel", frozenset(("POST",))),
        ):
            router.add(Route(prefix, pattern, methods, self._board_route(pattern)))

    def gated(self, path: str) -> bool:
        """True for a dashboard path: the app's ``dashboard`` callable decides first."""
        board = self.dashboard
        if board is None or board.match(path) is None:
            return False
        status = self._status_prefix
        return status is None or not (path == status or path.startswith(status + "/"))

    def refused(self) -> Reply:
        """The answer to a dashboard request the app's callable refused: as if absent."""
        return dashboard_not_found()

    def _task_wait(self, call: Call) -> Step:
        """``GET <status_url>?wait=N``; without ``wait``, the plain status route."""
        values = (
            urllib.parse.parse_qs(call.query, keep_blank_values=True).get("wait")
            if "wait" in call.query
            else None
        )
        if values is None:
            return (yield from task_status(call))
        seconds = parse_wait(values)
        if isinstance(seconds, str):
            return _bad_request(seconds)
        record = yield from self._readable(call)
        if isinstance(record, Reply):
            return record
        return _push("wait", record.id, seconds=seconds, include_result=call.router.include_result)

    def _task_events(self, call: Call) -> Step:
        """``GET <status_url>/events``."""
        record = yield from self._readable(call)
        if isinstance(record, Reply):
            return record
        return _push("events", record.id, include_result=call.router.include_result)

    @staticmethod
    def _readable(call: Call) -> Generator[Ask, bool, TaskRecord | Reply]:
        task_id = call.params["task_id"]
        record: TaskRecord | None = call.runtime.get(task_id) if is_valid_id(task_id) else None
        if record is None:
            return not_found()
        if call.router.authorize is not None:
            allowed = yield Ask(record, "read")
            if not allowed:
                return not_found()  # as for the status route: a refused reader learns nothing
        return record

    def _board_route(self, pattern: str) -> Callable[[Call], Step]:
        board = self.dashboard
        assert board is not None

        def route(call: Call) -> Step:
            sub = pattern.format(**call.params)
            params = urllib.parse.parse_qs(call.query, keep_blank_values=True)
            answer = board.handle(call.runtime, call.method, sub, params, call.headers)
            if isinstance(answer, StreamRequest):
                kind: Literal["events", "changes"] = (
                    "changes" if answer.task_id is None else "events"
                )
                answer = _push(
                    kind,
                    answer.task_id,
                    include_result=board.include_result,
                    extra_headers=tuple(SECURITY_HEADERS[:2]),
                )
            return (yield from _only(answer))

        return route

    def busy(self) -> Reply:
        return _json_reply(503, busy_reply_body(self.config), [("retry-after", "5")])

    # ------------------------------------------------------------------ ASGI
    async def serve_asgi(
        self, runtime: Any, push: Push, receive: Receive, send: Send, *, head: bool
    ) -> None:
        """Wait or stream for ``push``, never blocking the event loop."""
        if not self.slots.try_take():
            await _send_reply(send, self.busy(), head=head)
            return
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        try:
            if push.kind == "wait":
                assert push.task_id is not None
                found = await long_poll(
                    _async_reader(runtime, push.task_id),
                    runtime._hub,
                    push.task_id,
                    push.seconds,
                    local=_local(runtime, push.task_id),
                    config=self.config,
                    disconnected=disconnected,
                )
                reply = not_found() if found is None else _record_reply(found, push)
                await _send_reply(send, reply, head=head)
                return
            await self._stream_asgi(runtime, push, send, disconnected, head=head)
        finally:
            disconnected.cancel()
            self.slots.give_back()

    async def _stream_asgi(
        self,
        runtime: Any,
        push: Push,
        send: Send,
        disconnected: asyncio.Future[None],
        *,
        head: bool,
    ) -> None:
        stream: AsyncIterator[bytes]
        if push.kind == "changes":
            stream = change_stream(runtime._hub, config=self.config)
        else:
            assert push.task_id is not None
            stream = event_stream(
                _async_reader(runtime, push.task_id),
                runtime._hub,
                push.task_id,
                local=_local(runtime, push.task_id),
                include_result=push.include_result,
                config=self.config,
            )
        headers = [*SSE_HEADERS, *push.extra_headers]
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                }
            )
            if not head:
                async for chunk in _until(stream, disconnected):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone (a server that raises on send)
            pass
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ WSGI
    def serve_wsgi(self, runtime: Any, push: Push, *, head: bool) -> tuple[Reply, Iterable[bytes]]:
        """Wait (holding this server thread) or open a stream for ``push``.

        Returns the reply to start with and the body to send; a stream's body
        gives its slot back when the server closes it.
        """
        if push.kind == "changes" or push.task_id is None:
            # Under WSGI the page polls: a stream of every change would hold a thread per tab.
            return dashboard_not_found(), []
        if not self.slots.try_take():
            reply = self.busy()
            return reply, [] if head else [reply.body]
        task_id = push.task_id

        def read() -> TaskRecord | None:
            found: TaskRecord | None = runtime.get(task_id)
            return found

        stopping = self._server_stopping()
        if push.kind == "wait":
            try:
                found = long_poll_sync(
                    read,
                    runtime._hub,
                    task_id,
                    push.seconds,
                    local=_local(runtime, task_id),
                    config=self.config,
                    stopping=stopping,
                )
            finally:
                self.slots.give_back()
            reply = not_found() if found is None else _record_reply(found, push)
            return reply, [] if head else [reply.body]
        reply = Reply(200, [*SSE_HEADERS, *push.extra_headers], b"")
        if head:
            self.slots.give_back()
            return reply, []
        stream = event_stream_sync(
            read,
            runtime._hub,
            task_id,
            local=_local(runtime, task_id),
            include_result=push.include_result,
            config=self.config,
            stopping=stopping,
        )
        return reply, SlotBody(stream, self.slots)

    def _server_stopping(self) -> Callable[[], bool] | None:
        """Under gunicorn, a check that this worker is stopping (found once per process).

        A stream or a long-poll then ends within ``STOP_CHECK`` seconds of the
        SIGTERM instead of holding the worker until its ``graceful_timeout``
        kill (which would also skip the runtime's drain).
        """
        pid = os.getpid()
        found = self._server
        if found is None or found[0] != pid:
            from ._loopthread import gunicorn_worker

            server = gunicorn_worker()
            if server is not None:
                server.close()  # its heartbeat file is not needed here
            found = self._server = (pid, None if server is None else server.stopping)
        return found[1]


class SlotBody:
    """A streamed WSGI body that gives its slot back when the server closes it.

    (A generator the server never started would not run its ``finally``.)
    """

    __slots__ = ("_closed", "_slots", "_stream")

    def __init__(self, stream: Iterator[bytes], slots: Slots) -> None:
        self._stream = stream
        self._slots = slots
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self._stream

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            self._slots.give_back()


def _record_reply(record: TaskRecord, push: Push) -> Reply:
    exclude = None if push.include_result else {"result"}
    return _json_reply(200, record.model_dump_json(exclude=exclude).encode())


def _local(runtime: Any, task_id: str) -> Callable[[], bool]:
    registry = runtime._registry
    return lambda: task_id in registry


def _async_reader(runtime: Any, task_id: str) -> Callable[[], Awaitable[TaskRecord | None]]:
    """Read the record; from a thread unless this process holds the task in memory."""
    registry = runtime._registry

    async def read() -> TaskRecord | None:
        t = registry.get(task_id)
        if t is not None:
            record: TaskRecord = t.record
            return record
        import anyio.to_thread

        found: TaskRecord | None = await anyio.to_thread.run_sync(runtime.get, task_id)
        return found

    return read


async def _until_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _until(stream: AsyncIterator[bytes], stop: asyncio.Future[None]) -> AsyncIterator[bytes]:
    """The items of ``stream`` until ``stop`` is done (each wait races with it)."""
    while True:
        step = asyncio.ensure_future(stream.__anext__())
        try:
            await asyncio.wait((step, stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            step.cancel()
            raise
        if not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
            return
        try:
            yield step.result()
        except StopAsyncIteration:
            return


async def _send_reply(send: Send, reply: Reply, *, head: bool = False) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})


def request_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers as a dict with lower-case names (the last of repeated ones)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}


def environ_headers(environ: MutableMapping[str, Any]) -> dict[str, str]:
    """A WSGI environ's request headers, lower-case names with dashes."""
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_") and isinstance(value, str)
    }
    if "host" not in headers and "SERVER_NAME" in environ:
        headers["host"] = f"{environ['SERVER_NAME']}:{environ.get('SERVER_PORT', '')}"
    return headers
