"""Push and dashboard routes served to ASGI and WSGI: one ``Watch`` per middleware.

The adapters hand every request to ``Watch.asgi`` / ``Watch.wsgi`` first;
they answer the requests that are theirs (``<status_url>?wait=N``,
``<status_url>/events``, everything under the dashboard prefix) and return
False / None for the rest. The decisions (status codes, bodies, bounds) are
made in ``bgtasks._watch`` and ``bgtasks._dashboard``; this module only moves
bytes in each protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

from ._dashboard import SECURITY_HEADERS, DashboardRoutes, StreamRequest
from ._dashboard import not_found as dashboard_not_found
from ._http import Reply, StatusRoutes, not_found
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

__all__ = ["Watch"]

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
#: ASGI: may this request read this task? A Reply is answered as it is.
AsyncAuthorize = Callable[[TaskRecord], Awaitable["bool | Reply"]]


def _json_reply(status: int, body: bytes, extra: list[tuple[str, str]] | None = None) -> Reply:
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
        *(extra or []),
    ]
    return Reply(status, headers, body)


class Watch:
    """The push routes of ``status`` and the ``dashboard`` routes, bounded together."""

    def __init__(
        self,
        *,
        status: StatusRoutes | None,
        dashboard: DashboardRoutes | None,
        config: WatchConfig,
    ) -> None:
        self.status = status
        self.dashboard = dashboard
        self.config = config
        self.slots = Slots(config.max_watchers)

    def match(self, path: str, query: str | bytes) -> tuple[str, str] | None:
        """``("events" | "wait", task_id)``, ``("dashboard", rest)`` or None."""
        if self.status is not None:
            rest = self.status.match(path)
            if rest is not None:
                if rest.endswith("/events"):
                    return "events", rest[: -len("/events")]
                if isinstance(query, bytes):
                    query = query.decode("latin-1")
                if "wait=" in query:
                    return "wait", rest
                return None  # a plain status request: the status routes answer it
        if self.dashboard is not None:
            sub = self.dashboard.match(path)
            if sub is not None:
                return "dashboard", sub
        return None

    def busy(self) -> Reply:
        return _json_reply(503, busy_reply_body(self.config), [("retry-after", "5")])

    def _record_reply(self, record: TaskRecord, include_result: bool) -> Reply:
        exclude = None if include_result else {"result"}
        return _json_reply(200, record.model_dump_json(exclude=exclude).encode())

    # ------------------------------------------------------------------ ASGI
    async def asgi(
        self,
        runtime: Any,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        path: str,
        *,
        authorize: AsyncAuthorize | None,
        request: Callable[[], Any],
    ) -> bool:
        """Serve the request if it is one of ours; False if it is not."""
        raw_query: bytes = scope.get("query_string", b"")
        hit = self.match(path, raw_query)
        if hit is None:
            return False
        kind, arg = hit
        query = raw_query.decode("latin-1")
        method: str = scope["method"]
        head = method == "HEAD"
        if kind == "dashboard":
            await self._dashboard_asgi(runtime, scope, receive, send, arg, request)
            return True
        if method not in ("GET", "HEAD"):
            await _send_reply(
                send, Reply(405, [("allow", "GET, HEAD"), ("content-length", "0")], b"")
            )
            return True
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        seconds = parse_wait(params.get("wait", [])) if kind == "wait" else 0.0
        if isinstance(seconds, str):
            await _send_reply(send, _json_reply(400, _detail(seconds)), head=head)
            return True
        read = _async_reader(runtime, arg)
        record = await read() if is_valid_id(arg) else None
        if record is None:
            await _send_reply(send, not_found(), head=head)
            return True
        if authorize is not None:
            verdict = await authorize(record)
            if isinstance(verdict, Reply):
                await _send_reply(send, verdict, head=head)
                return True
            if not verdict:
                await _send_reply(send, not_found(), head=head)
                return True
        assert self.status is not None
        include_result = self.status.include_result
        if kind == "events":
            stream = event_stream(
                read,
                runtime._hub,
                arg,
                local=_local(runtime, arg),
                include_result=include_result,
                config=self.config,
                disconnected=None,
            )
            await self._stream_asgi(receive, send, stream, head=head, extra=[])
            return True
        if not self.slots.try_take():
            await _send_reply(send, self.busy(), head=head)
            return True
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        try:
            found = await long_poll(
                read,
                runtime._hub,
                arg,
                float(seconds),
                local=_local(runtime, arg),
                config=self.config,
                disconnected=disconnected,
            )
        finally:
            self.slots.give_back()
            disconnected.cancel()
        if found is None:
            await _send_reply(send, not_found(), head=head)
        else:
            await _send_reply(send, self._record_reply(found, include_result), head=head)
        return True

    async def _stream_asgi(
        self,
        receive: Receive,
        send: Send,
        stream: AsyncIterator[bytes],
        *,
        head: bool,
        extra: list[tuple[str, str]],
    ) -> None:
        """Send ``stream`` as ``text/event-stream``; stop at once when the client leaves."""
        if not self.slots.try_take():
            await stream.aclose()  # type: ignore[attr-defined]
            await _send_reply(send, self.busy(), head=head)
            return
        disconnected = asyncio.ensure_future(_until_disconnect(receive))
        try:
            headers = [
                (k.encode("latin-1"), v.encode("latin-1")) for k, v in [*SSE_HEADERS, *extra]
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if not head:
                async for chunk in _until(stream, disconnected):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone (a server that raises on send)
            pass
        finally:
            disconnected.cancel()
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
            self.slots.give_back()

    async def _dashboard_asgi(
        self,
        runtime: Any,
        scope: MutableMapping[str, Any],
        receive: Receive,
        send: Send,
        sub: str,
        request: Callable[[], Any],
    ) -> None:
        dashboard = self.dashboard
        assert dashboard is not None
        method: str = scope["method"]
        head = method == "HEAD"
        if not await _allowed_async(dashboard.allow, request()):
            await _send_reply(send, dashboard_not_found(), head=head)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        import anyio.to_thread

        # Listing a store or counting a big registry: off the event loop.
        answer = await anyio.to_thread.run_sync(
            dashboard.handle, runtime, method, sub, params, headers
        )
        if isinstance(answer, Reply):
            await _send_reply(send, answer, head=head)
            return
        stream = self._dashboard_stream(runtime, answer)
        await self._stream_asgi(receive, send, stream, head=head, extra=SECURITY_HEADERS[:2])

    def _dashboard_stream(self, runtime: Any, want: StreamRequest) -> AsyncIterator[bytes]:
        assert self.dashboard is not None
        if want.task_id is None:
            return change_stream(runtime._hub, config=self.config)
        return event_stream(
            _async_reader(runtime, want.task_id),
            runtime._hub,
            want.task_id,
            local=_local(runtime, want.task_id),
            include_result=self.dashboard.include_result,
            config=self.config,
        )

    # ------------------------------------------------------------------ WSGI
    def wsgi(
        self,
        runtime: Any,
        environ: MutableMapping[str, Any],
        start_response: Callable[..., Any],
        path: str,
        *,
        authorize: Callable[[TaskRecord], bool] | None,
        allow: Callable[[], bool],
    ) -> Iterable[bytes] | None:
        """Serve the request if it is one of ours; None if it is not.

        ``allow()`` asks the app's ``dashboard`` callable about this request.
        """
        query = environ.get("QUERY_STRING", "")
        hit = self.match(path, query)
        if hit is None:
            return None
        kind, arg = hit
        method = environ.get("REQUEST_METHOD", "GET")
        head = method == "HEAD"
        if kind == "dashboard":
            dashboard = self.dashboard
            assert dashboard is not None
            if not allow():
                return _wsgi_reply(start_response, dashboard_not_found(), head)
            params = urllib.parse.parse_qs(query, keep_blank_values=True)
            headers = _wsgi_headers(environ)
            answer = dashboard.handle(runtime, method, arg, params, headers)
            if isinstance(answer, Reply):
                return _wsgi_reply(start_response, answer, head)
            return _wsgi_reply(start_response, dashboard_not_found(), head)  # no streams: it polls
        if method not in ("GET", "HEAD"):
            reply = Reply(405, [("allow", "GET, HEAD"), ("content-length", "0")], b"")
            return _wsgi_reply(start_response, reply, head)
        params = urllib.parse.parse_qs(query, keep_blank_values=True)
        seconds = parse_wait(params.get("wait", [])) if kind == "wait" else 0.0
        if isinstance(seconds, str):
            return _wsgi_reply(start_response, _json_reply(400, _detail(seconds)), head)

        def read() -> TaskRecord | None:
            found: TaskRecord | None = runtime.get(arg)
            return found

        record = read() if is_valid_id(arg) else None
        if record is None:
            return _wsgi_reply(start_response, not_found(), head)
        if authorize is not None and not authorize(record):
            return _wsgi_reply(start_response, not_found(), head)
        assert self.status is not None
        include_result = self.status.include_result
        if not self.slots.try_take():
            return _wsgi_reply(start_response, self.busy(), head)
        if kind == "wait":
            try:
                found = long_poll_sync(
                    read,
                    runtime._hub,
                    arg,
                    float(seconds),
                    local=_local(runtime, arg),
                    config=self.config,
                )
            finally:
                self.slots.give_back()
            reply = not_found() if found is None else self._record_reply(found, include_result)
            return _wsgi_reply(start_response, reply, head)
        start_response("200 OK", list(SSE_HEADERS))
        if head:
            self.slots.give_back()
            return []
        stream = event_stream_sync(
            read,
            runtime._hub,
            arg,
            local=_local(runtime, arg),
            include_result=include_result,
            config=self.config,
        )
        return _SlotBody(stream, self.slots)


class _SlotBody:
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


def _detail(message: str) -> bytes:
    import json

    return json.dumps({"detail": message}).encode()


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


async def _allowed_async(allow: Callable[[Any], Any], request: Any) -> bool:
    if inspect.iscoroutinefunction(allow) or inspect.iscoroutinefunction(
        getattr(allow, "__call__", None)  # noqa: B004
    ):
        return bool(await allow(request))
    import anyio.to_thread

    verdict = await anyio.to_thread.run_sync(allow, request)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return bool(verdict)


async def _send_reply(send: Send, reply: Reply, *, head: bool = False) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})


def _wsgi_reply(start_response: Callable[..., Any], reply: Reply, head: bool) -> list[bytes]:
    start_response(f"{reply.status} {_reason(reply.status)}", list(reply.headers))
    return [] if head else [reply.body]


_REASONS = {
    200: "OK",
    202: "Accepted",
    308: "Permanent Redirect",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    503: "Service Unavailable",
}


def _reason(status: int) -> str:
    return _REASONS.get(status, "")


def _wsgi_headers(environ: MutableMapping[str, Any]) -> dict[str, str]:
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_") and isinstance(value, str)
    }
    if "host" not in headers and "SERVER_NAME" in environ:
        headers["host"] = f"{environ['SERVER_NAME']}:{environ.get('SERVER_PORT', '')}"
    return headers
