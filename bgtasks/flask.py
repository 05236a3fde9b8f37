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
(runtime per worker process, active runtime in every request), registers the
status routes as the Flask view ``bgtasks.task_status`` (so your
``before_request``/``after_request`` hooks, CORS and error handlers apply to
them) and a ``RegistryFull`` error handler answering ``503`` + ``Retry-After``.

Work scheduled during a request (a ``@background`` view, a ``@background``
function called from a view, ``bgtasks.wait_until(fn, ...)`` or
``bgtasks.wait_until(coro)``) runs inside a fresh app and request context
rebuilt from the request: its body (read before the response is sent), its
headers and URL, a shallow copy of ``g``; ``teardown_request`` and
``teardown_appcontext`` run when the task ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import io
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal

try:
    import flask
    from flask import current_app, g, has_request_context, request
    from flask.ctx import RequestContext
    from flask.globals import request_ctx
    from werkzeug.datastructures import EnvironHeaders, FileStorage, ImmutableMultiDict
    from werkzeug.wrappers import Response as WerkzeugResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    msg = "bgtasks.flask needs Flask: pip install 'bgtasks[flask]'."
    raise ImportError(msg) from exc

from . import _http
from ._errors import RegistryFull
from ._runtime import Runtime, is_async_callable
from .wsgi import BackgroundMiddleware, call_authorize

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication, WSGIEnvironment

    from ._handle import TaskHandle
    from ._task import TaskRecord

__all__ = ["BgTasks", "BgTasksState", "FlaskAuthorize"]

#: ``authorize(request, record, action) -> bool``, sync; ``request`` is
#: ``flask.request`` and the whole request context is active.
FlaskAuthorize = Callable[[Any, "TaskRecord", _http.Action], bool]

EXTENSION_KEY = "bgtasks"
STATUS_ENDPOINT = "bgtasks.task_status"

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
    routes: _http.StatusRoutes
    serves_status: bool = True


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
    carries results.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        runtime: Runtime | None = None,
        status_prefix: str | Literal[_Default.FROM_CONFIG] | None = _FROM_CONFIG,
        authorize: FlaskAuthorize | None = None,
        include_result: bool = True,
    ) -> None:
        self._runtime = runtime
        self._status_prefix = status_prefix
        self._authorize = authorize
        self._include_result = include_result
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
        routes = _http.StatusRoutes(
            prefix=_http.DEFAULT_PREFIX if prefix is None else prefix,
            authorize=self._authorize,
            include_result=self._include_result,
        )
        middleware = _FlaskMiddleware(app.wsgi_app, runtime=runtime, routes=routes)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION_KEY] = BgTasksState(runtime, middleware, routes, serves)
        if serves:
            app.add_url_rule(
                f"{routes.prefix}/<task_id>",
                endpoint=STATUS_ENDPOINT,
                view_func=_task_status,
                methods=["GET", "DELETE"],
            )
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
    """The WSGI middleware without its own status routes: Flask serves them."""

    def __init__(
        self, app: WSGIApplication, *, runtime: Runtime, routes: _http.StatusRoutes
    ) -> None:
        super().__init__(app, runtime=runtime, status_prefix=None)
        self._flask_routes = routes

    def _responder(self, environ: WSGIEnvironment) -> _FlaskResponder:
        return _FlaskResponder(environ.get("HTTP_IDEMPOTENCY_KEY"), self._flask_routes)


class _FlaskResponder:
    """The Responder of one Flask request (see ``bgtasks._context.Responder``)."""

    __slots__ = ("_chain", "idempotency_key", "routes")

    def __init__(self, idempotency_key: str | None, routes: _http.StatusRoutes) -> None:
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
            chain = self._chain = _view_chain(request_ctx._get_current_object())  # type: ignore[attr-defined]
        return any(view is fn for view in chain)

    def accepted(self, handle: TaskHandle) -> flask.Response:
        status_url = request.script_root + self.routes.url_path(handle.id)
        return _response(_http.accepted(handle, status_url))

    def wrap(self, work: Any) -> Any:
        """Carry this request's app and request context into ``work``."""
        if not has_request_context():
            return work
        ctx: RequestContext = request_ctx._get_current_object()  # type: ignore[attr-defined]
        if inspect.iscoroutine(work):
            carry = _Carry(ctx, endpoint=False)
            coro: Any = _await_in_context(carry, work)
            coro.__qualname__ = work.__qualname__
            return coro
        if not callable(work):
            return work
        carry = _Carry(ctx, endpoint=self.is_endpoint(work))
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


def _view_chain(ctx: RequestContext) -> tuple[Any, ...]:
    """The request's view function and what it wraps (decorators above
    ``@background``, such as ``login_required``, wrap it with functools.wraps)."""
    view = ctx.app.view_functions.get(ctx.request.endpoint)  # type: ignore[arg-type]
    chain: list[Any] = []
    while view is not None and len(chain) < 16:
        chain.append(view)
        view = getattr(view, "__wrapped__", None)
    return tuple(chain)


async def _await_in_context(carry: _Carry, coro: Any) -> Any:
    with carry.pushed():
        return await coro


# Request attributes a task's request does not take over from its request's:
# bound to the request's environ or input stream, per-attempt state, or
# mutable values (the parsed JSON) the two threads must not share.
_NOT_CARRIED = frozenset(
    ("environ", "headers", "stream", "files", "form", "_cached_json", "url_rule", "view_args")
)

# What RequestContext.__init__ sets in the Flask versions _TaskRequestContext
# knows; any other layout takes the general path (app.request_context).
_CTX_ATTRS = frozenset(
    (
        "app",
        "request",
        "url_adapter",
        "flashes",
        "_session",
        "_after_request_functions",
        "_cv_tokens",
    )
)


class _Carry:
    """What a task needs to rebuild its request's context, taken in the request."""

    __slots__ = (
        "app",
        "body",
        "endpoint",
        "environ",
        "fast",
        "files",
        "form",
        "g",
        "request_state",
        "routing_exception",
        "session",
        "url_adapter",
        "url_rule",
        "view_args",
    )

    def __init__(self, ctx: RequestContext, *, endpoint: bool) -> None:
        app = ctx.app
        req = ctx.request
        self.app = app
        self.endpoint = endpoint
        # Read the body now: once the response is sent the server may discard it.
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
        self.g = dict(vars(g._get_current_object()))
        # The request's URL adapter (read-only once bound) and routing result:
        # the task's context reuses them instead of binding and matching again.
        self.fast = type(ctx) is RequestContext and vars(ctx).keys() == _CTX_ATTRS
        self.url_adapter = ctx.url_adapter
        self.url_rule = req.url_rule
        view_args = req.view_args
        self.view_args = None if view_args is None else dict(view_args)
        self.routing_exception = req.routing_exception
        self.request_state: dict[str, Any] | None = None
        self.session: Any = None
        if self.fast and type(req) is app.request_class:
            # What the request computed already (its parsed URL, args, cookies,
            # cached body...), for the task's request to start from instead of
            # parsing the environ again; and its session, already opened (as
            # Flask's own RequestContext.copy() does). Everything tied to the
            # request's environ or streams is left out and made afresh.
            state = dict(vars(req))
            for key in _NOT_CARRIED:
                state.pop(key, None)
            self.request_state = state
            self.session = ctx._session

    def new_request(self, environ: WSGIEnvironment) -> flask.Request:
        """The task's request object, for one attempt."""
        state = self.request_state
        if state is None:
            req = self.app.request_class(environ)
            req.json_module = self.app.json
            return req
        cls = self.app.request_class  # the request's own class (checked in __init__)
        req = cls.__new__(cls)
        d = vars(req)
        d.update(state)
        d["environ"] = environ
        d["headers"] = EnvironHeaders(environ)
        environ["werkzeug.request"] = req
        return req

    def contexts(self) -> tuple[flask.ctx.AppContext, RequestContext]:
        """A fresh app context (the request's own has been torn down, or will be)
        holding a copy of ``g``, and a fresh request context; neither pushed."""
        app = self.app
        environ = dict(self.environ)
        environ["wsgi.input"] = io.BytesIO(self.body)  # fresh for every attempt
        app_ctx = app.app_context()
        vars(app_ctx.g).update(self.g)
        ctx = _TaskRequestContext(self, environ) if self.fast else app.request_context(environ)
        if self.form is not None and self.files is not None:
            ctx.request.form = self.form
            ctx.request.files = self.files
        return app_ctx, ctx

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``fn(*args, **kwargs)`` inside the rebuilt contexts, as a task result."""
        app_ctx, ctx = self.contexts()
        with app_ctx, ctx:
            return self.result(fn(*args, **kwargs))

    @contextlib.contextmanager
    def pushed(self) -> Iterator[None]:
        app_ctx, ctx = self.contexts()
        with app_ctx, ctx:
            yield

    def result(self, rv: Any) -> Any:
        """A view's return value as a task result: a response becomes its JSON or text."""
        if not self.endpoint or not isinstance(rv, (WerkzeugResponse, tuple)):
            return rv
        response = self.app.make_response(rv)
        if response.is_json:
            return response.get_json(silent=True)
        return response.get_data(as_text=True)


class _TaskRequestContext(RequestContext):
    """A task's request context: the request's bound URL adapter and routing
    result are reused rather than computed again (they do not change)."""

    def __init__(self, carry: _Carry, environ: WSGIEnvironment) -> None:
        # RequestContext.__init__ without create_url_adapter (Flask 2.3 to 3.1;
        # _Carry.fast checked the layout on the request's own context).
        app = carry.app
        request = carry.new_request(environ)
        self.app = app
        self.request = request
        self.url_adapter = carry.url_adapter
        self.flashes = None
        self._session = carry.session  # None: opened on push, as usual
        self._after_request_functions = []
        self._cv_tokens = []
        self._carry = carry
        if carry.url_adapter is None and carry.routing_exception is not None:
            request.routing_exception = carry.routing_exception

    def match_request(self) -> None:
        carry = self._carry
        request = self.request
        if carry.routing_exception is not None:
            request.routing_exception = carry.routing_exception
        else:
            request.url_rule = carry.url_rule
            request.view_args = None if carry.view_args is None else dict(carry.view_args)


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


def _task_status(task_id: str) -> flask.Response:
    state = _state(None)
    routes = state.routes
    rt = state.runtime
    found = routes.lookup(rt, request.method, task_id)
    if isinstance(found, _http.Reply):
        return _response(found)
    allowed = True
    if routes.authorize is not None:
        allowed = call_authorize(routes.authorize, request, found, routes.action(request.method))
    return _response(routes.act(rt, request.method, found, allowed))
