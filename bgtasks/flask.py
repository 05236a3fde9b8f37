"""Flask extension: ``BgTasks(app)`` or ``BgTasks()`` + ``init_app(app)``.

::

    from flask import Flask
    import bgtasks
    from bgtasks.flask import BgTasks

    app = Flask(__name__)
    BgTasks(app)

    @app.post("/reports")
    @bgtasks.background
    def build_report():               # answers 202 at once; runs in the background
        spec = request.get_json()     # the request, g, current_app, url_for all work
        ...

``init_app`` wraps ``app.wsgi_app`` in ``bgtasks.wsgi.BackgroundMiddleware``
(runtime per worker process, active runtime in every request) and registers
a ``RegistryFull`` error handler answering ``503`` + ``Retry-After``. The
status routes become the Flask view ``bgtasks.task_status`` (so your
``before_request``/``after_request`` hooks, CORS and error handlers apply to
them) as the app serves its first request, so the app's URL map is its own
until then. The middleware holds the app weakly: a dropped app is freed, and
its runtime drains and lets its thread go.

Work scheduled during a request (a ``@background`` view, a ``@background``
function called from a view, ``bgtasks.wait_until(fn, ...)`` or
``bgtasks.wait_until(coro)``) runs inside a fresh request context rebuilt
from the request with Flask's public API (``app.request_context(environ)``):
its body (read before the response is sent), its headers and URL, a shallow
copy of ``g``; ``teardown_request`` and ``teardown_appcontext`` run when the
task ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import io
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal

try:
    import flask
    from flask import current_app, g, has_request_context, request
    from werkzeug.datastructures import FileStorage, ImmutableMultiDict
    from werkzeug.wrappers import Response as WerkzeugResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "bgtasks.flask needs Flask: pip install 'bgtasks[flask]'."
    raise ImportError(msg) from exc

from . import _http
from ._dashboard import DEFAULT_DASHBOARD_PREFIX, DashboardRoutes
from ._errors import RegistryFull
from ._runtime import Runtime, is_async_callable
from ._watch import DEFAULT_WATCH, WatchConfig
from ._watch_routes import Push, Watch
from .wsgi import BackgroundMiddleware, call_authorize, call_dashboard

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from ._handle import TaskHandle
    from ._task import TaskRecord

__all__ = ["BgTasks", "BgTasksState", "FlaskAuthorize"]

#: ``authorize(request, record, action) -> bool``, sync; ``request`` is
#: ``flask.request`` and the whole request context is active.
FlaskAuthorize = Callable[[Any, "TaskRecord", _http.Action], bool]

EXTENSION_KEY = "bgtasks"
STATUS_ENDPOINT = "bgtasks.task_status"
#: The view of every other path under a bgtasks mount (404/405 from the route table).
ROUTES_ENDPOINT = "bgtasks.routes"

# Config keys read by init_app when no runtime is passed, and the Runtime
# argument each one sets.
_CONFIG = {
    "BGTASKS_SHUTDOWN_GRACE": "shutdown_grace",
    "BGTASKS_MAX_PENDING": "max_pending",
    "BGTASKS_MAX_CONCURRENCY": "max_concurrency",
    "BGTASKS_MEMORY_LIMIT": "memory_limit",
    "BGTASKS_STORE": "store",
    "BGTASKS_LIMITS": "limits",
    "BGTASKS_RETENTION": "retention",
    "BGTASKS_MAX_FINISHED": "max_finished",
    "BGTASKS_MAX_THREADS": "max_threads",
}
# Environ keys not carried into a task's rebuilt request.
_DROP = frozenset(
    {"wsgi.input", "wsgi.input_terminated", "werkzeug.request", "HTTP_TRANSFER_ENCODING"}
)


class _Default(enum.Enum):
    FROM_CONFIG = enum.auto()


#: ``BgTasks(status_prefix=...)``'s default: ``BGTASKS_STATUS_PREFIX``, else
#: ``"/_bgtasks/tasks"``.
_FROM_CONFIG: Final = _Default.FROM_CONFIG


@dataclasses.dataclass(frozen=True, slots=True)
class BgTasksState:
    """What ``init_app`` stores in ``app.extensions["bgtasks"]``."""

    runtime: Runtime
    middleware: BackgroundMiddleware
    #: Builds the status URLs of 202 answers; the status view is registered
    #: only if ``serves_status``.
    routes: _http.Router
    serves_status: bool = True
    #: Push and the dashboard (see ``bgtasks._watch_routes``).
    watch: Watch | None = None


class BgTasks:
    """The bgtasks Flask extension.

    ``runtime``: the Runtime to use for every app initialised with this
    extension; by default each app gets its own, built from its config
    (``BGTASKS_SHUTDOWN_GRACE``, ``BGTASKS_MAX_PENDING``,
    ``BGTASKS_MAX_CONCURRENCY``, ``BGTASKS_MEMORY_LIMIT``, ``BGTASKS_STORE``,
    ``BGTASKS_LIMITS``, ``BGTASKS_RETENTION``, ``BGTASKS_MAX_FINISHED``,
    ``BGTASKS_MAX_THREADS``). ``status_prefix``: the URL prefix of the status
    routes, or None to register none (202 answers still point under the
    default prefix); by default ``BGTASKS_STATUS_PREFIX`` (which may be None
    too), else ``"/_bgtasks/tasks"``. ``authorize(request, record, action)``, a
    sync callable run in the status request's context, may refuse a read or a
    cancel (the client gets 404). ``include_result``: whether the status JSON
    carries results; ``include_error_message``: whether it carries error
    messages (they may carry secrets).
    ``<status_url>?wait=N`` and ``<status_url>/events`` push a
    task's changes (bounded by ``watch``, a ``bgtasks.WatchConfig``; each holds
    a server thread while open). ``dashboard(request) -> bool``, sync, run in
    the request's context, turns on the dashboard under ``dashboard_prefix``;
    ``dashboard_read_only=True`` hides and refuses its Cancel.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        runtime: Runtime | None = None,
        status_prefix: str | Literal[_Default.FROM_CONFIG] | None = _FROM_CONFIG,
        authorize: FlaskAuthorize | None = None,
        include_result: bool = True,
        include_error_message: bool = True,
        dashboard: Callable[[Any], bool] | None = None,
        dashboard_read_only: bool = False,
        dashboard_prefix: str = DEFAULT_DASHBOARD_PREFIX,
        watch: WatchConfig | None = None,
    ) -> None:
        self._board = (
            None
            if dashboard is None
            else DashboardRoutes(
                dashboard,
                prefix=dashboard_prefix,
                read_only=dashboard_read_only,
                include_result=include_result,
                live="poll",
            )
        )
        self._watch_config = watch or DEFAULT_WATCH
        self._runtime = runtime
        self._status_prefix = status_prefix
        self._authorize = authorize
        self._include_result = include_result
        self._include_error_message = include_error_message
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Install bgtasks in ``app`` (once per app)."""
        if EXTENSION_KEY in app.extensions:
            msg = f"bgtasks is already installed in the Flask app {app.name!r}; call init_app once."
            raise RuntimeError(msg)
        runtime = self._runtime if self._runtime is not None else _runtime_from_config(app.config)
        prefix = self._status_prefix
        if prefix is _FROM_CONFIG:
            prefix = app.config.get("BGTASKS_STATUS_PREFIX", _http.DEFAULT_PREFIX)
        serves = prefix is not None
        routes = _http.Router(
            prefix=_http.DEFAULT_PREFIX if prefix is None else prefix,
            authorize=self._authorize,
            include_result=self._include_result,
            include_error_message=self._include_error_message,
        )
        watch = Watch(dashboard=self._board, config=self._watch_config)
        if not serves:  # no status rows; the dashboard's, if any
            routes.routes.clear()
            routes.mounts.clear()
        watch.install(routes, status=serves)
        middleware = _FlaskMiddleware(
            app, runtime=runtime, routes=routes, serves=bool(routes.mounts)
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION_KEY] = BgTasksState(runtime, middleware, routes, serves, watch)
        if self._runtime is None:
            # The app's own runtime: when the app is dropped (an app factory in a
            # test suite), its runtime drains and its loop thread and descriptors go.
            weakref.finalize(app, middleware._host.release).atexit = False
        # Leave a RegistryFull handler the app registered itself.
        if RegistryFull not in app.error_handler_spec[None][None]:
            app.register_error_handler(RegistryFull, _overloaded)

    def runtime_for(self, app: flask.Flask | None = None) -> Runtime:
        """The Runtime of ``app`` (default: ``current_app``)."""
        return _state(app).runtime

    def stop(self, app: flask.Flask | None = None, timeout: float | None = None) -> bool:
        """Drain and stop ``app``'s runtime in this process now.

        The process exit does this by itself; use it in tests or your own
        shutdown code. Returns False if it was still shutting down after
        ``timeout`` seconds.
        """
        return _state(app).middleware.stop(timeout)


def _add_views(app: flask.Flask, routes: _http.Router) -> None:
    """Flask views for the bgtasks routes, so the app's before_request/after_request
    hooks, CORS and error handlers apply; the route table in bgtasks._http answers."""
    methods = sorted({m for r in routes.routes for m in r.methods} - {"HEAD"})
    state = app.extensions[EXTENSION_KEY]
    if state.serves_status:
        app.add_url_rule(
            f"{routes.prefix}/<task_id>",
            endpoint=STATUS_ENDPOINT,
            view_func=_serve_route,
            methods=methods,
        )
    board = state.watch.dashboard if state.watch is not None else None
    if board is not None:
        # The dashboard's own root (the `<path:...>` rules below need a non-empty rest).
        for i, rule in enumerate((board.prefix, board.prefix + "/")):
            app.add_url_rule(
                rule, endpoint=f"{ROUTES_ENDPOINT}.dashboard{i}", view_func=_serve_route
            )
    for i, mount in enumerate(routes.mounts):
        app.add_url_rule(
            f"{mount}/<path:_rest>",
            endpoint=ROUTES_ENDPOINT if i == 0 else f"{ROUTES_ENDPOINT}{i}",
            view_func=_serve_route,
            methods=methods,
        )


class _WeakMethod:
    """A Flask app's own ``wsgi_app`` method, held without a reference to the app."""

    __slots__ = ("_method",)

    def __init__(self, method: Any) -> None:
        self._method = weakref.WeakMethod(method)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        method = self._method()
        if method is None:  # pragma: no cover - the app is gone
            msg = "the Flask app of this bgtasks middleware was garbage-collected."
            raise RuntimeError(msg)
        return method(environ, start_response)


def _state(app: flask.Flask | None) -> BgTasksState:
    app = app if app is not None else current_app._get_current_object()  # type: ignore[attr-defined]
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        msg = f"bgtasks is not installed in the Flask app {app.name!r}; call BgTasks(app) first."
        raise RuntimeError(msg)
    assert isinstance(state, BgTasksState)
    return state


def _runtime_from_config(config: flask.Config) -> Runtime:
    options = {arg: config[key] for key, arg in _CONFIG.items() if key in config}
    return Runtime(**options)


# --------------------------------------------------------------------------- requests
class _FlaskMiddleware(BackgroundMiddleware):
    """The WSGI middleware without its own status routes: Flask serves them.

    It holds the Flask app weakly (Flask apps are freed by reference counting
    alone, with no cycle), and adds the status views to the app as the app
    serves its first request, so the app's URL map (``flask routes``, tests of
    it) is the app's own until then.
    """

    def __init__(
        self, app: flask.Flask, *, runtime: Runtime, routes: _http.Router, serves: bool
    ) -> None:
        wsgi_app: Any = app.wsgi_app
        if getattr(wsgi_app, "__self__", None) is app:
            wsgi_app = _WeakMethod(wsgi_app)
        super().__init__(wsgi_app, runtime=runtime, status_prefix=None)
        self._flask_routes = routes
        self._flask_app = weakref.ref(app)
        self._views_added = not serves
        self._views_lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        if not self._views_added:
            self._add_views()
        return super().__call__(environ, start_response)

    def _add_views(self) -> None:
        with self._views_lock:
            app = self._flask_app()
            if self._views_added or app is None:
                return
            if ROUTES_ENDPOINT not in app.view_functions:
                _add_views(app, self._flask_routes)
            self._views_added = True

    def _responder(self, environ: WSGIEnvironment) -> _FlaskResponder:
        return _FlaskResponder(environ.get("HTTP_IDEMPOTENCY_KEY"), self._flask_routes)


class _FlaskResponder:
    """The Responder of one Flask request (see ``bgtasks._context.Responder``)."""

    __slots__ = ("_chain", "idempotency_key", "routes")

    def __init__(self, idempotency_key: str | None, routes: _http.Router) -> None:
        # The same normalisation as the ASGI adapter: a long key is hashed, not dropped.
        self.idempotency_key = _http.idempotency_key_from_header(idempotency_key)
        self.routes = routes
        # The request's view and what it wraps, found once (both the @background
        # wrapper and ``wrap`` ask).
        self._chain: tuple[Any, ...] | None = None

    def is_endpoint(self, fn: Any) -> bool:
        chain = self._chain
        if chain is None:
            if not has_request_context():
                return False
            chain = self._chain = _view_chain()
        return any(view is fn for view in chain)

    def accepted(self, handle: TaskHandle) -> flask.Response:
        status_url = request.script_root + self.routes.url_path(handle.id)
        return _response(_http.accepted(handle, status_url))

    def wrap(self, work: Any) -> Any:
        """Carry this request's app and request context into ``work``."""
        if not has_request_context():
            return work
        if inspect.iscoroutine(work):
            carry = _Carry(endpoint=False)
            coro: Any = _await_in_context(carry, work)
            coro.__qualname__ = work.__qualname__
            return coro
        if not callable(work):
            return work
        carry = _Carry(endpoint=self.is_endpoint(work))
        if is_async_callable(work):

            @functools.wraps(work)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with carry.pushed():
                    return carry.result(await work(*args, **kwargs))

            return run_async

        # Not functools.wraps: on every request, and nothing reads the copy's
        # metadata (the task is named before it is wrapped).
        def run(*args: Any, **kwargs: Any) -> Any:
            return carry.call(work, args, kwargs)

        run.__wrapped__ = work  # type: ignore[attr-defined]
        return run


def _view_chain() -> tuple[Any, ...]:
    """The request's view function and what it wraps (decorators above
    ``@background``, such as ``login_required``, wrap it with functools.wraps)."""
    endpoint = request.endpoint
    view = None if endpoint is None else current_app.view_functions.get(endpoint)
    chain: list[Any] = []
    while view is not None and len(chain) < 16:
        chain.append(view)
        view = getattr(view, "__wrapped__", None)
    return tuple(chain)


async def _await_in_context(carry: _Carry, coro: Any) -> Any:
    with carry.pushed():
        return await coro


class _Carry:
    """What a task needs to rebuild its request's context, taken in the request.

    Only Flask's public API: the task's context is ``app.request_context(environ)``
    for a copy of the request's environ with its body (read now: once the
    response is sent the server may discard it), ``g`` is copied into it, and a
    form the request parsed already is handed over.
    """

    __slots__ = ("app", "body", "endpoint", "environ", "files", "form", "g")

    def __init__(self, *, endpoint: bool) -> None:
        app: flask.Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        req: flask.Request = request._get_current_object()  # type: ignore[attr-defined]
        self.app = app
        self.endpoint = endpoint
        self.body: bytes = req.get_data(cache=True)
        self.environ = dict(req.environ)
        for key in _DROP:
            self.environ.pop(key, None)
        self.environ["CONTENT_LENGTH"] = str(len(self.body))
        self.form: ImmutableMultiDict[str, str] | None = None
        self.files: ImmutableMultiDict[str, FileStorage] | None = None
        if "form" in req.__dict__:
            # Parsed already (by a before_request hook, say): the stream is spent,
            # so carry the parsed form, with uploads copied out of their temp files
            # (the request closes those when it ends).
            self.form = req.form
            self.files = ImmutableMultiDict(
                [(k, _copy_file(f)) for k, f in req.files.items(multi=True)]
            )
        self.g = {name: g.get(name) for name in g}

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``fn(*args, **kwargs)`` inside the rebuilt context, as a task result."""
        with self.pushed():
            return self.result(fn(*args, **kwargs))

    @contextlib.contextmanager
    def pushed(self) -> Iterator[None]:
        """A fresh request context (the request's own has been torn down, or will
        be) holding a copy of ``g``; ``teardown_request`` and ``teardown_appcontext``
        run when it ends."""
        environ = dict(self.environ)
        environ["wsgi.input"] = io.BytesIO(self.body)  # fresh for every attempt
        with self.app.request_context(environ):
            for name, value in self.g.items():
                setattr(g, name, value)
            if self.form is not None and self.files is not None:
                request.form = self.form
                request.files = self.files
            yield

    def result(self, rv: Any) -> Any:
        """A view's return value as a task result: a response becomes its JSON or text."""
        if not self.endpoint or not isinstance(rv, (WerkzeugResponse, tuple)):
            return rv
        response = self.app.make_response(rv)
        if response.is_json:
            return response.get_json(silent=True)
        return response.get_data(as_text=True)


def _copy_file(f: FileStorage) -> FileStorage:
    stream = f.stream
    pos = stream.tell() if stream.seekable() else None
    if pos is not None:
        stream.seek(0)
    data = stream.read()
    if pos is not None:
        stream.seek(pos)
    return FileStorage(io.BytesIO(data), filename=f.filename, name=f.name, headers=f.headers.copy())


# --------------------------------------------------------------------------- responses
def _response(reply: _http.Reply) -> flask.Response:
    return flask.Response(reply.body, status=reply.status, headers=reply.headers)


def _overloaded(exc: RegistryFull) -> flask.Response:
    return _response(_http.overloaded(exc))


def _serve_route(**_: Any) -> flask.Response:
    """The Flask view of every bgtasks route: the route table in ``bgtasks._http`` answers."""
    state = _state(None)
    routes = state.routes
    method = request.method
    query = request.query_string.decode("latin-1")
    rt = state.runtime
    if rt._state == "new":  # nothing scheduled yet in this process: start it to look
        rt = state.middleware._host.ensure_started()
    watch = state.watch
    gated = watch is not None and watch.gated(request.path)
    if gated:
        assert watch is not None and watch.dashboard is not None
        if not call_dashboard(watch.dashboard.allow, request):
            return _response(watch.refused())
    headers = {k.lower(): v for k, v in request.headers.items()} if gated else None
    found = routes.dispatch(rt, method, request.path, query, headers)
    authorize = routes.authorize

    def decide(ask: _http.Ask) -> bool:
        assert authorize is not None
        return call_authorize(authorize, request, ask.record, ask.action)

    reply = _http.run_sync(found, decide)
    if isinstance(reply, Push):
        assert watch is not None
        start, body = watch.serve_wsgi(rt, reply, head=method == "HEAD")
        return flask.Response(body, status=start.status, headers=start.headers)
    return _response(reply)
