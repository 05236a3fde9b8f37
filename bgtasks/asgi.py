"""The ASGI adapter: a pure ASGI middleware for FastAPI, Starlette or any ASGI app.

``BackgroundMiddleware`` runs a ``Runtime`` for the app's lifetime from the
``lifespan`` scope, makes it the active runtime in every request, serves the
status routes, answers ``202 Accepted`` for ``@background`` endpoints and turns
``RegistryFull`` into ``503`` with ``Retry-After``.

Starlette is imported only when it is needed (a ``@background`` endpoint's
202, an ``authorize`` hook's request), so a plain ASGI app can use the
middleware without it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from . import _context
from ._errors import RegistryFull, RuntimeNotActive
from ._http import (
    DEFAULT_PREFIX,
    Authorize,
    Reply,
    StatusRoutes,
    _json,
    accepted,
    idempotency_key_from_header,
    overloaded,
)
from ._runtime import Runtime
from .stores.memory import MemoryStore

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from ._task import TaskRecord

__all__ = ["BackgroundMiddleware", "accepted_response", "document_background_routes"]

logger = logging.getLogger("bgtasks")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_IDEMPOTENCY_HEADER = b"idempotency-key"
# How far the middleware looks down a chain of middleware or mounted apps.
_MAX_DEPTH = 32
_ACCEPTED_DESCRIPTION = "Accepted: the work is scheduled; follow Location for its status."


class BackgroundMiddleware:
    """Run background work for an ASGI app: ``app.add_middleware(BackgroundMiddleware)``.

    ``runtime`` is the ``bgtasks.Runtime`` to run (a default one if None; a
    default runtime is renewed for each lifespan, so a test client may start
    the app more than once). ``status_prefix`` is where ``GET``/``DELETE
    <prefix>/<id>`` are served. ``authorize(request, record, action)`` (sync
    or async; ``action`` is ``"read"`` or ``"cancel"``) may refuse a status
    request, which then answers 404; ``request`` is a
    ``starlette.requests.Request``, or the raw ASGI scope when Starlette is not
    installed. ``include_result=False`` leaves ``result`` out of the status JSON.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        runtime: Runtime | None = None,
        status_prefix: str = DEFAULT_PREFIX,
        authorize: Authorize | None = None,
        include_result: bool = True,
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
        self.runtime = runtime if runtime is not None else Runtime()
        self._owns_runtime = runtime is None
        self.routes = StatusRoutes(
            prefix=status_prefix, authorize=authorize, include_result=include_result
        )
        # True once a lifespan or a first request has started the runtime.
        self._ready = False
        self._lazy = False
        self._lock: asyncio.Lock | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        elif kind == "websocket":
            rt = self.runtime if self._ready else await self._start_lazily(scope)
            token = _context.active_runtime.set(rt)
            try:
                await self.app(scope, receive, send)
            finally:
                _context.active_runtime.reset(token)
        else:
            await self.app(scope, receive, send)

    # ------------------------------------------------------------------ requests
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        rt = self.runtime if self._ready else await self._start_lazily(scope)
        if self._lazy:
            self._check_loop(rt)
        root_path: str = scope.get("root_path", "")
        path: str = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        task_id = self.routes.match(path)
        if task_id is not None:
            await self._status(scope, receive, send, rt, task_id)
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

    async def _status(
        self, scope: Scope, receive: Receive, send: Send, rt: Runtime, task_id: str
    ) -> None:
        """Serve ``GET``/``HEAD``/``DELETE <prefix>/<id>``."""
        routes = self.routes
        method: str = scope["method"]
        # Any store but the plain memory one may read a file: keep that off the loop.
        in_thread = type(rt.store) is not MemoryStore
        if in_thread:
            import anyio.to_thread

            found = await anyio.to_thread.run_sync(routes.lookup, rt, method, task_id)
        else:
            found = routes.lookup(rt, method, task_id)
        if isinstance(found, Reply):
            reply = found
        else:
            allowed = True
            if routes.authorize is not None:
                verdict = await self._authorize(scope, receive, found, method)
                if isinstance(verdict, Reply):
                    await _send_reply(send, verdict, head=method == "HEAD")
                    return
                allowed = verdict
            if in_thread:
                import anyio.to_thread

                reply = await anyio.to_thread.run_sync(routes.act, rt, method, found, allowed)
            else:
                reply = routes.act(rt, method, found, allowed)
        await _send_reply(send, reply, head=method == "HEAD")

    async def _authorize(
        self, scope: Scope, receive: Receive, record: TaskRecord, method: str
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
        action = self.routes.action(method)
        verdict: Any
        try:
            if _is_async(hook):
                verdict = await hook(request, record, action)  # type: ignore[misc]
            else:
                # Like a sync Starlette endpoint: it may block (a database lookup).
                import anyio.to_thread

                verdict = await anyio.to_thread.run_sync(hook, request, record, action)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
        except Exception as exc:
            if http_exception is not None and isinstance(exc, http_exception):
                status: int = getattr(exc, "status_code", 500)
                headers = list((getattr(exc, "headers", None) or {}).items())
                return _json(status, {"detail": getattr(exc, "detail", "")}, headers)
            raise
        return bool(verdict)

    # ------------------------------------------------------------------ lifespan
    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the runtime before the app's startup; drain it before the app's shutdown.

        The app's own lifespan (FastAPI ``lifespan=``, startup handlers) runs
        with the runtime started and active, so it may schedule work; its
        shutdown code runs after the runtime has drained, so tasks can still
        use what the app's lifespan set up. An app that does not speak the
        lifespan protocol (it raises or returns without reading it) is
        answered by the middleware itself.
        """
        message = await receive()
        if message["type"] != "lifespan.startup":  # not the protocol we know: stay out
            await self.app(scope, _replay(message, receive), send)
            return
        rt = self._runtime_for_lifespan()
        try:
            await rt.start()
        except Exception as exc:
            text = f"bgtasks: the runtime failed to start: {type(exc).__name__}: {exc}"
            await send({"type": "lifespan.startup.failed", "message": text})
            raise  # as Starlette does: servers and test clients expect both
        self._ready = True
        self._lazy = False
        self._prepare_app(scope)
        state = _LifespanState()

        async def app_receive() -> Message:
            if not state.startup_given:
                state.startup_given = True
                return message
            msg = await receive()
            if msg["type"] == "lifespan.shutdown":
                state.shutdown_seen = True
                await _shutdown(rt)
            return msg

        async def app_send(msg: Message) -> None:
            kind = msg["type"]
            if kind == "lifespan.startup.complete":
                state.startup_reported = True
            elif kind == "lifespan.startup.failed":
                state.startup_reported = True
                await _shutdown(rt)
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                state.shutdown_reported = True
            await send(msg)

        token = _context.active_runtime.set(rt)
        try:
            await self.app(scope, app_receive, app_send)
        except Exception as exc:
            if state.startup_given and not state.startup_reported:
                # The app read the startup event and failed in its startup code.
                await _shutdown(rt)
                text = f"{type(exc).__name__}: {exc}"
                await send({"type": "lifespan.startup.failed", "message": text})
                raise
            if state.startup_reported:
                await _shutdown(rt)
                raise
            logger.debug(
                "bgtasks: the app does not support the lifespan protocol (%s: %s); "
                "BackgroundMiddleware answers it",
                type(exc).__name__,
                exc,
            )
        except BaseException:
            await _shutdown(rt)
            raise
        finally:
            _context.active_runtime.reset(token)
        # The app returned without finishing the protocol (or never spoke it).
        if not state.startup_reported:
            await send({"type": "lifespan.startup.complete"})
        if not state.shutdown_seen:
            await receive()  # lifespan.shutdown
            await _shutdown(rt)
        if not state.shutdown_reported:
            await send({"type": "lifespan.shutdown.complete"})

    def _runtime_for_lifespan(self) -> Runtime:
        rt = self.runtime
        if self._owns_runtime and rt._state != "new":
            # A default runtime runs once per lifespan: a new one for each.
            rt = self.runtime = Runtime()
        return rt

    async def _start_lazily(self, scope: Scope) -> Runtime:
        """No lifespan (``uvicorn --lifespan off``): start on the first request."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            rt = self.runtime
            if self._ready:
                return rt
            if rt._state == "new":
                await rt.start()
            self._ready = True
            self._lazy = True
            self._prepare_app(scope)
            logger.warning(
                "bgtasks: the ASGI server did not run the lifespan protocol, so the runtime "
                "was started by the first request and shutdown cannot drain it: tasks still "
                "running when the process exits are lost. Run the server with lifespan on "
                "(uvicorn's default; not --lifespan off)."
            )
            return rt

    def _prepare_app(self, scope: Scope) -> None:
        """Get the app ready as the runtime starts: 202 in OpenAPI, 503 in every Starlette app.

        ``scope["app"]`` is the Starlette app when the middleware was added
        with ``app.add_middleware``; wrapped directly
        (``BackgroundMiddleware(app)``), the middleware is outside the app and
        the scope carries none yet, so the wrapped app is looked for too.
        """
        outer = scope.get("app")
        try:
            inner = _framework_app(self.app)
            for app in (outer, inner) if inner is not outer else (outer,):
                if app is not None:
                    document_background_routes(app)
            # A Starlette app's ServerErrorMiddleware sends a 500 for any exception
            # and re-raises it, so a RegistryFull raised in a Starlette app this
            # middleware is outside of (the wrapped app, mounted sub-applications)
            # must be answered in that app, by an exception handler.
            for app in _starlette_apps(inner):
                _answer_overload(app)
        except Exception:  # like documentation, this must never stop an app from starting
            logger.exception("bgtasks: could not prepare the app (202 in OpenAPI, 503 handlers)")

    @staticmethod
    def _check_loop(rt: Runtime) -> None:
        if rt._loop is not None and rt._loop is not asyncio.get_running_loop():
            msg = (
                "this request runs on another event loop than the one the bgtasks runtime "
                "was started on, so its tasks could not run. Starlette's TestClient runs "
                "each request on a new loop unless it is used as a context manager: write "
                "`with TestClient(app) as client:`."
            )
            raise RuntimeError(msg)


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

    def __init__(self, routes: StatusRoutes, scope: Scope, root_path: str, send: Send) -> None:
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
        return _response(accepted(handle, url))


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


_Response: Any = None


def _response(reply: Reply) -> Any:
    """A ``starlette.responses.Response`` for ``reply``."""
    global _Response
    if _Response is None:
        try:
            from starlette.responses import Response
        except ImportError as exc:  # pragma: no cover - an endpoint implies a router
            msg = (
                "a @background endpoint needs Starlette to build its 202 response: "
                "pip install 'bgtasks[fastapi]' (or 'bgtasks[starlette]')."
            )
            raise ImportError(msg) from exc
        _Response = Response
    response = _Response(reply.body, status_code=reply.status)
    response.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    return response


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


def _framework_app(app: Any) -> Any:
    """The app with routes under ``app``'s chain of middleware (``.app``), or ``app``."""
    node = app
    for _ in range(_MAX_DEPTH):
        if node is None:
            break
        if getattr(node, "routes", None) is not None:
            return node
        node = getattr(node, "app", None)
    return app


def _starlette_apps(app: Any) -> list[Any]:
    """``app`` if it is a Starlette app, and every Starlette app mounted under it."""
    applications = sys.modules.get("starlette.applications")
    routing = sys.modules.get("starlette.routing")
    if applications is None or routing is None:  # no Starlette app can exist
        return []
    starlette: type = applications.Starlette
    mounts = (routing.Mount, routing.Host)
    found: list[Any] = []
    seen: set[int] = set()

    def visit(node: Any, depth: int) -> None:
        node = _framework_app(node)
        if id(node) in seen or depth > _MAX_DEPTH:
            return
        seen.add(id(node))
        if isinstance(node, starlette):
            found.append(node)
        for route in getattr(node, "routes", None) or ():
            if isinstance(route, mounts):
                visit(route.app, depth + 1)

    visit(app, 0)
    return found


def _answer_overload(app: Any) -> None:
    """Answer ``RegistryFull`` in the Starlette app ``app`` with 503, unless it does already."""
    for key, handler in app.exception_handlers.items():
        if (
            isinstance(key, type)
            and key is not Exception  # the 500 handler: ServerErrorMiddleware's, too late
            and issubclass(RegistryFull, key)
            and handler is not _overload_handler
        ):
            return  # the app's own handler for RegistryFull (or a base class) decides
    app.add_exception_handler(RegistryFull, _overload_handler)
    node = app.middleware_stack
    if node is None:  # built on the app's first call, with the handler
        return
    # Built already: its ExceptionMiddleware copied the handlers; tell it too.
    from starlette.middleware.exceptions import ExceptionMiddleware

    for _ in range(_MAX_DEPTH):
        if node is None or node is app.router:
            break
        if isinstance(node, ExceptionMiddleware):
            node.add_exception_handler(RegistryFull, _overload_handler)
            return
        node = getattr(node, "app", None)
    logger.warning(
        "bgtasks: %s was started before BackgroundMiddleware saw it and its exception "
        "middleware was not found, so RegistryFull raised in it answers 500, not 503; "
        "add the middleware with app.add_middleware(BackgroundMiddleware) instead.",
        type(app).__name__,
    )


async def _overload_handler(request: Any, exc: Exception) -> Any:
    """A Starlette exception handler: ``RegistryFull`` -> 503 with ``Retry-After``."""
    assert isinstance(exc, RegistryFull)
    reply = overloaded(exc)
    if request.method == "HEAD":
        reply = Reply(reply.status, reply.headers, b"")
    return _response(reply)


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )


def document_background_routes(app: Any) -> int:
    """Document each FastAPI ``@background`` route as ``202 Accepted``; return how many.

    A ``@background`` endpoint's signature already gives FastAPI the 202 body
    (``TaskAccepted``) as its response model; the status code is the route's
    own, 200 unless the route says ``status_code=202``. The middleware calls
    this when the app starts, for routes that set no status code. Call it
    yourself before exporting ``app.openapi()`` without starting the app (or
    write ``status_code=202`` on those routes).
    """
    try:
        from fastapi.routing import APIRoute
    except ImportError:
        return 0
    count = 0
    seen: set[int] = set()

    def walk(routes: Any) -> None:
        nonlocal count
        for route in routes:
            if isinstance(route, APIRoute):
                if route.status_code is None and hasattr(route.endpoint, "__bgtasks__"):
                    route.status_code = 202
                    if route.response_description == "Successful Response":
                        route.response_description = _ACCEPTED_DESCRIPTION
                    count += 1
                continue
            sub = getattr(route, "routes", None)  # Mount, Host, a sub-application
            if sub and id(sub) not in seen:
                seen.add(id(sub))
                walk(sub)

    try:
        walk(getattr(app, "routes", None) or ())
    except Exception:  # documentation must never stop an app from starting
        logger.exception("bgtasks: could not document the app's @background routes")
        return count
    if count and getattr(app, "openapi_schema", None) is not None:
        app.openapi_schema = None  # generated before: generate it again
    return count
