"""The ASGI adapter: a pure ASGI middleware for FastAPI, Starlette or any ASGI app.

``BackgroundMiddleware`` runs a ``Runtime`` for the app's lifetime from the
``lifespan`` scope, makes it the active runtime in every request, serves the
status routes, answers ``202 Accepted`` for ``@background`` endpoints and turns
``RegistryFull`` into ``503`` with ``Retry-After``.

With no lifespan (``TestClient(app)`` without ``with``, ``httpx.ASGITransport``,
``uvicorn --lifespan off``), or on an event loop that is not asyncio's (trio),
nothing starts with a request: the runtime starts on its own event-loop thread
the first time work is scheduled on it, as under WSGI (``bgtasks._loopthread``),
and drains when the process exits. Requests that do not use bgtasks never
start anything.

Starlette/FastAPI app patching lives in ``bgtasks._starlette``; Starlette is
imported only when it is needed (a ``@background`` endpoint's 202, an
``authorize`` hook's request), so a plain ASGI app can use the middleware
without it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from . import _context, _http
from ._dashboard import DEFAULT_DASHBOARD_PREFIX, DashboardRoutes
from ._errors import RegistryFull, RuntimeNotActive
from ._http import (
    DEFAULT_PREFIX,
    Authorize,
    Reply,
    _json,
    accepted,
    idempotency_key_from_header,
    overloaded,
)
from ._loopthread import LoopThread, host_for
from ._runtime import Runtime
from ._starlette import document_background_routes, prepare_app, response
from ._watch import DEFAULT_WATCH, WatchConfig
from ._watch_routes import Push, Watch, request_headers
from .stores.memory import MemoryStore

if TYPE_CHECKING:
    from ._handle import TaskHandle

__all__ = [
    "BackgroundMiddleware",
    "accepted_response",
    "document_background_routes",
    "stop_runtime",
]

logger = logging.getLogger("bgtasks")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_IDEMPOTENCY_HEADER = b"idempotency-key"
_get_running_loop = asyncio._get_running_loop  # None, not an error, off asyncio (trio)


class BackgroundMiddleware:
    """Run background work for an ASGI app: ``app.add_middleware(BackgroundMiddleware)``.

    ``runtime`` is the ``bgtasks.Runtime`` to run (a default one if None; a
    default runtime is renewed for each lifespan, so a test client may start
    the app more than once). ``status_prefix`` is where ``GET``/``DELETE
    <prefix>/<id>`` are served. ``authorize(request, record, action)`` (sync
    or async; ``action`` is ``"read"`` or ``"cancel"``) may refuse a status
    request, which then answers 404; ``request`` is a
    ``starlette.requests.Request``, or the raw ASGI scope when Starlette is not
    installed. ``include_result=False`` leaves ``result`` out of the status JSON;
    ``include_error_message=False`` hides error messages (they may carry secrets).

    ``GET <status_url>?wait=N`` and ``GET <status_url>/events`` push a task's
    changes (``watch``: a ``bgtasks.WatchConfig`` with their bounds).
    ``dashboard(request) -> bool`` (sync or async) turns on the dashboard and
    its API under ``dashboard_prefix`` for the requests it answers True;
    ``dashboard_read_only=True`` hides and refuses its Cancel.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        runtime: Runtime | None = None,
        status_prefix: str = DEFAULT_PREFIX,
        authorize: Authorize | None = None,
        include_result: bool = True,
        include_error_message: bool = True,
        dashboard: Callable[[Any], bool | Awaitable[bool]] | None = None,
        dashboard_read_only: bool = False,
        dashboard_prefix: str = DEFAULT_DASHBOARD_PREFIX,
        watch: WatchConfig | None = None,
    ) -> None:
        if runtime is not None and not isinstance(runtime, Runtime):
            msg = f"runtime must be a bgtasks.Runtime, got {type(runtime).__name__}."
            raise TypeError(msg)
        if authorize is not None and not callable(authorize):
            msg = (
                "authorize must be a function (request, record, action) -> bool, "
                f"got {type(authorize).__name__}."
            )
            raise TypeError(msg)
        self.app = app
        self._owns_runtime = runtime is None
        self.runtime = runtime if runtime is not None else Runtime()
        self.routes = _http.Router(
            prefix=status_prefix,
            authorize=authorize,
            include_result=include_result,
            include_error_message=include_error_message,
        )
        board = None
        if dashboard is not None:
            board = DashboardRoutes(
                dashboard,
                prefix=dashboard_prefix,
                read_only=dashboard_read_only,
                include_result=include_result,
                live="sse",
            )
        self.watch = Watch(dashboard=board, config=watch or DEFAULT_WATCH)
        self.watch.install(self.routes)
        # "lifespan": a lifespan started self.runtime on the server's asyncio loop.
        # None: no lifespan runs it; it starts on its own loop thread when first used.
        self._mode: str | None = None
        self._prepared = False
        self._warned_wrong_loop = False
        self._hosted(self.runtime)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._serve_http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        elif kind == "websocket":
            token = _context.active_runtime.set(self._runtime_for_request(scope))
            try:
                await self.app(scope, receive, send)
            finally:
                _context.active_runtime.reset(token)
        else:
            await self.app(scope, receive, send)

    # ------------------------------------------------------------------ requests
    def _runtime_for_request(self, scope: Scope) -> Runtime | None:
        """The runtime a request gets; None when it cannot have one (see ``_wrong_loop``)."""
        rt = self.runtime
        if self._mode == "lifespan":
            loop = rt._loop
            if loop is not _get_running_loop() and loop is not None and not loop.is_running():
                self._wrong_loop()
                return None
            return rt
        if not self._prepared:
            self._prepared = True
            prepare_app(scope.get("app"), self.app)
        if rt._state != "new" and self._owns_runtime and rt._state != "started":
            # A lifespan ran and shut the default runtime down (a `with TestClient`
            # block that ended): a fresh one for the requests that follow.
            rt = self.runtime = Runtime()
            self._hosted(rt)
        return rt

    def _hosted(self, rt: Runtime) -> None:
        """Let ``rt`` start on its own loop thread when first used (if nothing starts it)."""
        if rt._state != "new" or rt.autostart is not None:
            return
        host = host_for(rt)
        rt.autostart = _Autostart(host)
        if self._owns_runtime:
            # A dropped app (a test's app factory) lets its runtime and thread go.
            weakref.finalize(self, host.release).atexit = False

    def _wrong_loop(self) -> None:
        """The lifespan started the runtime on an event loop that is not running, and
        this request runs on another one (in the same thread): no task could run.
        The request goes to the app untouched, with no active runtime."""
        if self._warned_wrong_loop:
            return
        self._warned_wrong_loop = True
        logger.warning(
            "bgtasks: a request runs on another event loop than the one the ASGI lifespan "
            "started the runtime on, and that loop is not running, so no task could run: "
            "requests get no active runtime. Serve requests on the loop that ran the "
            "lifespan (enter asgi_lifespan.LifespanManager(app) in the same event loop as "
            "the requests), or do not run the lifespan: the runtime then starts on its own "
            "thread."
        )

    async def _serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.runtime
        if self._mode != "lifespan" or rt._loop is not _get_running_loop():
            found = self._runtime_for_request(scope)
            if found is None:
                await self.app(scope, receive, send)
                return
            rt = found
        root_path: str = scope.get("root_path", "")
        path: str = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        if self.routes.owns(path):
            await self._serve_route(scope, receive, send, rt, path)
            return
        request = _Request(self.routes, scope, root_path, send)
        rt_token = _context.active_runtime.set(rt)
        responder_token = _context.responder.set(request)
        try:
            await self.app(scope, receive, request.send)
        except Exception as exc:
            full = _registry_full(exc)
            if full is None or request.started:
                raise
            await _send_reply(send, overloaded(full), head=scope["method"] == "HEAD")
        finally:
            _context.responder.reset(responder_token)
            _context.active_runtime.reset(rt_token)

    async def _serve_route(
        self, scope: Scope, receive: Receive, send: Send, rt: Runtime, path: str
    ) -> None:
        """Serve a bgtasks route (``GET``/``HEAD``/``DELETE <prefix>/<id>``, ...)."""
        method: str = scope["method"]
        if rt._state == "new" and rt.autostart is not None:
            import anyio.to_thread

            await anyio.to_thread.run_sync(rt.autostart)
        query = scope.get("query_string", b"").decode("latin-1")
        gated = self.watch.gated(path)
        if gated and not await self._dashboard_allows(scope, receive):
            await _send_reply(send, self.watch.refused(), head=method == "HEAD")
            return
        headers = request_headers(scope["headers"]) if gated else None
        found = self.routes.dispatch(rt, method, path, query, headers)

        async def decide(ask: _http.Ask) -> bool | Reply:
            return await self._authorize(scope, receive, ask, method)

        # Any store but the plain memory one may read a file, and the dashboard
        # lists and counts: keep that off the loop.
        in_thread = gated or type(rt.store) is not MemoryStore
        reply = await _http.run_async(found, decide, in_thread=in_thread)
        if isinstance(reply, Push):
            await self.watch.serve_asgi(rt, reply, receive, send, head=method == "HEAD")
            return
        await _send_reply(send, reply, head=method == "HEAD")

    async def _dashboard_allows(self, scope: Scope, receive: Receive) -> bool:
        """Ask the app's ``dashboard`` callable (sync ones in a thread, as endpoints run)."""
        board = self.watch.dashboard
        assert board is not None
        request: Any
        try:
            from starlette.requests import Request
        except ImportError:
            request = scope
        else:
            request = Request(scope, receive)
        allow = board.allow
        if _is_async(allow):
            return bool(await allow(request))
        import anyio.to_thread

        verdict = await anyio.to_thread.run_sync(allow, request)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    async def _authorize(
        self, scope: Scope, receive: Receive, ask: _http.Ask, method: str
    ) -> bool | Reply:
        """Ask the ``authorize`` hook; an ``HTTPException`` it raises is answered as is."""
        hook = self.routes.authorize
        assert hook is not None
        request: Any
        http_exception: type[BaseException] | None
        try:
            from starlette.exceptions import HTTPException
            from starlette.requests import Request
        except ImportError:
            request, http_exception = scope, None
        else:
            request, http_exception = Request(scope, receive), HTTPException
        verdict: Any
        try:
            if _is_async(hook):
                verdict = await hook(request, ask.record, ask.action)  # type: ignore[misc]
            else:
                # Like a sync Starlette endpoint: it may block (a database lookup).
                import anyio.to_thread

                verdict = await anyio.to_thread.run_sync(hook, request, ask.record, ask.action)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
        except Exception as exc:
            if http_exception is not None and isinstance(exc, http_exception):
                status: int = getattr(exc, "status_code", 500)
                headers = list((getattr(exc, "headers", None) or {}).items())
                return _json(status, {"detail": getattr(exc, "detail", "")}, headers)
            raise
        return bool(verdict)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop a runtime that runs on its own thread (no lifespan), now.

        The process exit does this by itself; use it in tests. Returns False if
        it was still shutting down after ``timeout`` seconds. Call it from
        outside the event loop (a lifespan's runtime is drained by the lifespan).
        """
        return stop_runtime(self.runtime, timeout)

    # ------------------------------------------------------------------ lifespan
    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the runtime before the app's startup; drain it before the app's shutdown.

        The app's own lifespan (FastAPI ``lifespan=``, startup handlers) runs
        with the runtime started and active, so it may schedule work; its
        shutdown code runs after the runtime has drained, so tasks can still
        use what the app's lifespan set up. An app that does not speak the
        lifespan protocol (it raises or returns without reading it) is
        answered by the middleware itself. Off asyncio (trio), the runtime
        runs on its own loop thread for the lifespan's length.
        """
        message = await receive()
        if message["type"] != "lifespan.startup":  # not the protocol we know: stay out
            await self.app(scope, _replay(message, receive), send)
            return
        rt, host = self._runtime_for_lifespan()
        try:
            if host is not None:
                import anyio.to_thread

                await anyio.to_thread.run_sync(host.ensure_started)
            else:
                await rt.start()
        except Exception as exc:
            text = f"bgtasks: the runtime failed to start: {type(exc).__name__}: {exc}"
            await send({"type": "lifespan.startup.failed", "message": text})
            raise  # as Starlette does: servers and test clients expect both
        if host is None:
            self._mode = "lifespan"
        self._prepared = True
        prepare_app(scope.get("app"), self.app)
        state = _LifespanState()

        async def stop() -> None:
            self._mode = None
            if host is None:
                await _shutdown(rt)
            else:
                import anyio.to_thread

                await anyio.to_thread.run_sync(host.stop)

        async def app_receive() -> Message:
            if not state.startup_given:
                state.startup_given = True
                return message
            msg = await receive()
            if msg["type"] == "lifespan.shutdown":
                state.shutdown_seen = True
                await stop()
            return msg

        async def app_send(msg: Message) -> None:
            kind = msg["type"]
            if kind == "lifespan.startup.complete":
                state.startup_reported = True
            elif kind == "lifespan.startup.failed":
                state.startup_reported = True
                await stop()
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                state.shutdown_reported = True
            await send(msg)

        token = _context.active_runtime.set(rt)
        try:
            await self.app(scope, app_receive, app_send)
        except Exception as exc:
            if state.startup_given and not state.startup_reported:
                # The app read the startup event and failed in its startup code.
                await stop()
                text = f"{type(exc).__name__}: {exc}"
                await send({"type": "lifespan.startup.failed", "message": text})
                raise
            if state.startup_reported:
                await stop()
                raise
            logger.debug(
                "bgtasks: the app does not support the lifespan protocol (%s: %s); "
                "BackgroundMiddleware answers it",
                type(exc).__name__,
                exc,
            )
        except BaseException:
            await stop()
            raise
        finally:
            _context.active_runtime.reset(token)
        # The app returned without finishing the protocol (or never spoke it).
        if not state.startup_reported:
            await send({"type": "lifespan.startup.complete"})
        if not state.shutdown_seen:
            await receive()  # lifespan.shutdown
            await stop()
        if not state.shutdown_reported:
            await send({"type": "lifespan.shutdown.complete"})

    def _runtime_for_lifespan(self) -> tuple[Runtime, LoopThread | None]:
        """The runtime this lifespan runs, and its loop thread if it runs on one."""
        rt = self.runtime
        if self._owns_runtime and rt._state != "new":
            # A default runtime runs once per lifespan: a new one for each. One that
            # a request started on its own thread drains there and lets go.
            if isinstance(rt.autostart, _Autostart):
                rt.autostart.host.release()
            rt = self.runtime = Runtime()
        if _get_running_loop() is None:  # trio, or another loop than asyncio's
            self._hosted(rt)
            return rt, host_for(rt)
        if rt._state == "started" and isinstance(rt.autostart, _Autostart):
            return rt, rt.autostart.host  # your runtime, already on its own thread
        return rt, None


def stop_runtime(runtime: Runtime, timeout: float | None = None) -> bool:
    """Drain and stop ``runtime`` now if it runs on its own thread (no lifespan ran it).

    For tests that use ``TestClient(app)`` without ``with`` or
    ``httpx.ASGITransport`` and want every task finished at a point; the
    process exit does it by itself. Returns False if it was still shutting
    down after ``timeout`` seconds; True at once for a runtime no thread runs.
    Call it from outside the runtime's own thread.
    """
    autostart = runtime.autostart
    if isinstance(autostart, _Autostart):
        return autostart.host.stop(timeout)
    return True


class _Autostart:
    """``Runtime.autostart`` for a runtime no lifespan runs: start it on a loop thread."""

    __slots__ = ("host",)

    def __init__(self, host: LoopThread) -> None:
        self.host = host

    def __call__(self) -> None:
        host = self.host
        first = not host.running
        host.ensure_started()
        if first and threading.current_thread() is threading.main_thread():
            # A server's own loop (a test client runs requests on another thread).
            logger.warning(
                "bgtasks: no ASGI lifespan started the runtime, so the first task started "
                "it on its own thread. It drains when the process exits normally or on "
                "Ctrl-C, but not when the server ends the process with a signal "
                "(uvicorn --lifespan off re-raises SIGTERM). Run the server with lifespan "
                "on (uvicorn's default)."
            )


class _LifespanState:
    __slots__ = ("shutdown_reported", "shutdown_seen", "startup_given", "startup_reported")

    def __init__(self) -> None:
        self.startup_given = False
        self.startup_reported = False
        self.shutdown_seen = False
        self.shutdown_reported = False


class _Request:
    """One HTTP request: the responder ``@background`` endpoints answer through."""

    __slots__ = ("_root_path", "_routes", "_scope", "_send", "started")

    def __init__(self, routes: _http.Router, scope: Scope, root_path: str, send: Send) -> None:
        self._routes = routes
        self._scope = scope
        # Captured now: a Mount rewrites scope["root_path"] on the way in, but the
        # status routes are served here, at this middleware's own root.
        self._root_path = root_path
        self._send = send
        self.started = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    @property
    def idempotency_key(self) -> str | None:
        for name, value in self._scope["headers"]:
            if name == _IDEMPOTENCY_HEADER:
                return idempotency_key_from_header(value)
        return None

    @idempotency_key.setter
    def idempotency_key(self, value: str | None) -> None:  # the Responder protocol's shape
        msg = "the request's idempotency key comes from its Idempotency-Key header."
        raise AttributeError(msg)

    def is_endpoint(self, fn: Any) -> bool:
        # Starlette's router writes the matched endpoint into this very scope dict.
        return self._scope.get("endpoint") is fn

    def accepted(self, handle: TaskHandle) -> Any:
        url = self._root_path + self._routes.url_path(handle.id)
        return response(accepted(handle, url))


def accepted_response(handle: TaskHandle) -> Any:
    """The ``202 Accepted`` response for ``handle``, for an endpoint that schedules itself.

    A ``@background`` endpoint answers this way on its own; use this in an
    endpoint that checks something first, or in a plain Starlette endpoint:
    ``return accepted_response(build_report.submit(user.id))``.
    """
    request = _context.responder.get()
    if not isinstance(request, _Request):
        msg = (
            "accepted_response() answers a request served through "
            "bgtasks.asgi.BackgroundMiddleware, and none is being served here; add the "
            "middleware to the app (app.add_middleware(BackgroundMiddleware))."
        )
        raise RuntimeNotActive(msg)
    return request.accepted(handle)


async def _send_reply(send: Send, reply: Reply, *, head: bool = False) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})


async def _shutdown(rt: Runtime) -> None:
    try:
        await rt.shutdown()
    except Exception:
        logger.exception("bgtasks: the runtime's shutdown failed")


def _replay(message: Message, receive: Receive) -> Receive:
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return message
        return await receive()

    return replay


def _registry_full(exc: BaseException) -> RegistryFull | None:
    """The ``RegistryFull`` behind ``exc``, also inside an exception group."""
    if isinstance(exc, RegistryFull):
        return exc
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException):
        found: RegistryFull | None = _registry_full(inner[0])
        return found
    return None


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )


