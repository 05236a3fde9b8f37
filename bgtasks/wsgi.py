"""WSGI middleware: a runtime per worker process, the active runtime in every
request, the status routes, and ``503`` + ``Retry-After`` on ``RegistryFull``.

::

    from bgtasks.wsgi import BackgroundMiddleware

    application = BackgroundMiddleware(application)

WSGI has no lifespan: the runtime runs on its own event-loop thread in each
worker process, started by the first work the process schedules (so it
starts after a fork, and never for an app that does not use it) and drained
when the process exits (see
``bgtasks._loopthread``). In a request, ``bgtasks.wait_until`` and
``@background`` functions schedule on it and return a ``TaskHandle``; a plain
WSGI app answers with ``accepted(handle, environ, start_response)`` when it
wants the standard 202. (Flask apps use ``bgtasks.flask.BgTasks``, which also
makes a ``@background`` view answer 202 by itself.)
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _context, _http
from ._dashboard import DEFAULT_DASHBOARD_PREFIX, DashboardRoutes
from ._errors import RegistryFull
from ._loopthread import host_for
from ._runtime import Runtime
from ._watch import DEFAULT_WATCH, WatchConfig
from ._watch_routes import Push, Watch, environ_headers

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from ._handle import TaskHandle
    from ._task import TaskRecord

__all__ = ["DEFAULT_PREFIX", "BackgroundMiddleware", "WSGIAuthorize", "accepted"]

DEFAULT_PREFIX = _http.DEFAULT_PREFIX
#: ``authorize(environ, record, action) -> bool``, sync: may this request read
#: (``"read"``) or cancel (``"cancel"``) this task?
WSGIAuthorize = Callable[[Any, "TaskRecord", _http.Action], bool]

_PREFIX_KEY = "bgtasks.status_prefix"


class BackgroundMiddleware:
    """Run a bgtasks runtime for a WSGI app.

    ``runtime``: the Runtime to host (default: a new ``Runtime()``).
    ``status_prefix``: where ``GET``/``DELETE <prefix>/<id>`` are served, or
    None to serve no status routes. ``authorize(environ, record, action)``, a
    sync callable, may refuse a read or a cancel (the client then gets 404);
    by default anyone who knows a task's id may read and cancel it.
    ``include_result``: whether the status JSON carries the task's result;
    ``include_error_message``: whether it carries error messages (they may carry secrets).

    ``GET <status_url>?wait=N`` and ``GET <status_url>/events`` push a task's
    changes; each holds a server thread while open, so ``watch`` (a
    ``bgtasks.WatchConfig``) bounds how many may be open (503 past it).
    ``dashboard(environ) -> bool`` turns on the dashboard and its API under
    ``dashboard_prefix`` for the requests it answers True (the page polls: no
    thread is held per open page); ``dashboard_read_only=True`` hides and
    refuses its Cancel.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        runtime: Runtime | None = None,
        status_prefix: str | None = DEFAULT_PREFIX,
        authorize: WSGIAuthorize | None = None,
        include_result: bool = True,
        include_error_message: bool = True,
        dashboard: Callable[[Any], bool] | None = None,
        dashboard_read_only: bool = False,
        dashboard_prefix: str = DEFAULT_DASHBOARD_PREFIX,
        watch: WatchConfig | None = None,
    ) -> None:
        self.app = app
        self.runtime = runtime if runtime is not None else Runtime()
        board = None
        if dashboard is not None:
            board = DashboardRoutes(
                dashboard,
                prefix=dashboard_prefix,
                read_only=dashboard_read_only,
                include_result=include_result,
                live="poll",
            )
        self.watch = Watch(dashboard=board, config=watch or DEFAULT_WATCH)
        self.routes = (
            None
            if status_prefix is None and board is None
            else _http.Router(
                prefix=DEFAULT_PREFIX if status_prefix is None else status_prefix,
                authorize=authorize,
                include_result=include_result,
                include_error_message=include_error_message,
            )
        )
        if self.routes is not None:
            if status_prefix is None:  # the dashboard's rows only
                self.routes.routes.clear()
                self.routes.mounts.clear()
            self.watch.install(self.routes, status=status_prefix is not None)
        host = self._host = host_for(self.runtime)
        rt = self.runtime
        if rt._state == "new" and rt.autostart is None:
            # Started by the first work scheduled on it, not by a request: an app
            # whose routes do not use bgtasks gets no thread.
            rt.autostart = host.autostart
        if runtime is None:
            # A dropped app (a test's app factory) lets its runtime and thread go.
            weakref.finalize(self, host.release).atexit = False

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        rt = self.runtime
        if rt._state != "new":
            # Started here or, before a fork, in the parent: ensure_started gives
            # this process its own thread, or the error that says why it cannot.
            rt = self._host.ensure_started()
        routes = self.routes
        if routes is not None:
            path = environ.get("PATH_INFO", "")
            if routes.owns(path):
                if rt._state == "new":
                    rt = self._host.ensure_started()
                return self._serve_route(rt, routes, path, environ, start_response)
            environ[_PREFIX_KEY] = routes.prefix
        started = False

        def start(status: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal started
            started = True
            return start_response(status, headers, exc_info)

        responder = self._responder(environ)
        rt_token = _context.active_runtime.set(rt)
        responder_token = _context.responder.set(responder)
        try:
            body = self.app(environ, start)
            if type(body) is list or type(body) is tuple:  # nothing runs while it is sent
                return body
            file_wrapper = environ.get("wsgi.file_wrapper")
            if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
                return body  # the server may sendfile() it: leave it as it is
            # A streamed body runs app code after this call returns: the request's
            # runtime is active for it too.
            return _ActiveBody(body, rt, responder)
        except RegistryFull as exc:
            # Once the app has called start_response, only exc_info may replace it.
            return _send(_http.overloaded(exc), start_response, sys.exc_info() if started else None)
        finally:
            _context.responder.reset(responder_token)
            _context.active_runtime.reset(rt_token)

    def _responder(self, environ: WSGIEnvironment) -> _context.Responder | None:
        """The request's responder; plain WSGI has none (no endpoint to answer for)."""
        return None

    def _serve_route(
        self,
        rt: Runtime,
        routes: _http.Router,
        path: str,
        environ: WSGIEnvironment,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        head = method == "HEAD"
        watch = self.watch
        gated = watch.gated(path)
        if gated and not self._dashboard_allows(environ):
            body = _send(watch.refused(), start_response)
            return [] if head else body
        headers = environ_headers(environ) if gated else None
        found = routes.dispatch(rt, method, path, environ.get("QUERY_STRING", ""), headers)
        authorize = routes.authorize

        def decide(ask: _http.Ask) -> bool:
            assert authorize is not None
            return call_authorize(authorize, environ, ask.record, ask.action)

        reply = _http.run_sync(found, decide)
        if isinstance(reply, Push):
            start, stream = watch.serve_wsgi(rt, reply, head=head)
            start_response(f"{start.status} {start.reason}", list(start.headers))
            return stream
        body = _send(reply, start_response)
        return [] if head else body

    def _dashboard_allows(self, environ: WSGIEnvironment) -> bool:
        """Ask the app's ``dashboard`` callable about this request (its environ)."""
        board = self.watch.dashboard
        assert board is not None
        return call_dashboard(board.allow, environ)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop this process's runtime now (process exit does it by itself).

        Returns False if it was still shutting down after ``timeout`` seconds.
        """
        return self._host.stop(timeout)


class _ActiveBody:
    """A streamed response body, with the request's runtime active while it runs.

    So ``bgtasks.wait_until`` in a streamed response's generator finds the
    request's runtime, as it would in the view. The body runs in the server's
    own context, exactly as without bgtasks (``flask.stream_with_context``
    pushes and pops Flask's context across calls): only the two bgtasks
    variables are set around each step, and reset after it.
    """

    __slots__ = ("_body", "_it", "_responder", "_rt")

    def __init__(
        self, body: Iterable[bytes], rt: Runtime, responder: _context.Responder | None
    ) -> None:
        self._body = body
        self._rt = rt
        self._responder = responder
        self._it: Iterator[bytes] | None = None

    def __iter__(self) -> _ActiveBody:
        return self

    def __next__(self) -> bytes:
        rt_token = _context.active_runtime.set(self._rt)
        responder_token = _context.responder.set(self._responder)
        try:
            it = self._it
            if it is None:
                it = self._it = iter(self._body)
            return next(it)
        finally:
            _context.responder.reset(responder_token)
            _context.active_runtime.reset(rt_token)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is None:
            return
        rt_token = _context.active_runtime.set(self._rt)
        responder_token = _context.responder.set(self._responder)
        try:
            close()
        finally:
            _context.responder.reset(responder_token)
            _context.active_runtime.reset(rt_token)


def call_authorize(authorize: Any, request: Any, record: TaskRecord, action: _http.Action) -> bool:
    """Run a sync ``authorize`` hook; refuse an async one with the fix in the message."""
    allowed = authorize(request, record, action)
    if inspect.isawaitable(allowed):
        if inspect.iscoroutine(allowed):
            allowed.close()
        msg = (
            "authorize must be a plain (sync) function under WSGI and Flask: it returned "
            "an awaitable. Define it with `def`, not `async def`."
        )
        raise TypeError(msg)
    return bool(allowed)


def call_dashboard(allow: Any, request: Any) -> bool:
    """Run a sync ``dashboard`` callable; refuse an async one with the fix in the message."""
    allowed = allow(request)
    if inspect.isawaitable(allowed):
        if inspect.iscoroutine(allowed):
            allowed.close()
        msg = (
            "dashboard must be a plain (sync) function under WSGI and Flask: it returned "
            "an awaitable. Define it with `def`, not `async def`."
        )
        raise TypeError(msg)
    return bool(allowed)


def _send(reply: _http.Reply, start_response: StartResponse, exc_info: Any = None) -> list[bytes]:
    start_response(f"{reply.status} {reply.reason}", list(reply.headers), exc_info)
    return [reply.body]


def accepted(
    handle: TaskHandle, environ: WSGIEnvironment, start_response: StartResponse
) -> Iterable[bytes]:
    """Answer a plain WSGI request with the standard 202 for ``handle``.

    JSON ``{"id", "status", "status_url"}`` and ``Location: <status_url>``; the
    status URL is under the middleware's ``status_prefix`` and the app's
    ``SCRIPT_NAME``.
    """
    prefix = environ.get(_PREFIX_KEY, DEFAULT_PREFIX)
    status_url = f"{environ.get('SCRIPT_NAME', '')}{prefix}/{handle.id}"
    return _send(_http.accepted(handle, status_url), start_response)
