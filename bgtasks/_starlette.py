"""Starlette and FastAPI app patching, apart from the pure ASGI middleware.

``bgtasks.asgi.BackgroundMiddleware`` speaks plain ASGI. When the app behind
it is a Starlette or FastAPI app, it calls ``prepare_app`` once, as the
runtime becomes available: ``@background`` routes are documented as ``202
Accepted`` in OpenAPI, and ``RegistryFull`` raised inside any Starlette app of
the tree answers ``503`` with ``Retry-After``. Nothing here imports Starlette
unless a Starlette app is already loaded.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ._errors import RegistryFull
from ._http import Reply, overloaded

__all__ = ["document_background_routes", "prepare_app", "response"]

logger = logging.getLogger("bgtasks")

# How far we look down a chain of middleware or mounted apps.
_MAX_DEPTH = 32
_ACCEPTED_DESCRIPTION = "Accepted: the work is scheduled; follow Location for its status."

_Response: Any = None


def response(reply: Reply) -> Any:
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
    resp = _Response(reply.body, status_code=reply.status)
    resp.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    return resp


def prepare_app(outer: Any, wrapped: Any) -> None:
    """Get the app ready: 202 in OpenAPI, 503 in every Starlette app.

    ``outer`` is ``scope["app"]``: the Starlette app when the middleware was
    added with ``app.add_middleware``. Wrapped directly
    (``BackgroundMiddleware(app)``), the middleware is outside the app and the
    scope carries none yet, so ``wrapped`` (the middleware's app) is looked at too.
    """
    if "starlette.applications" not in sys.modules:  # no Starlette app can exist
        return
    try:
        inner = _framework_app(wrapped)
        for app in (outer, inner) if inner is not outer else (outer,):
            if app is not None:
                document_background_routes(app)
        # A Starlette app's ServerErrorMiddleware sends a 500 for any exception
        # and re-raises it, so a RegistryFull raised in a Starlette app the
        # middleware is outside of (the wrapped app, mounted sub-applications)
        # must be answered in that app, by an exception handler.
        for app in _starlette_apps(inner):
            _answer_overload(app)
    except Exception:  # like documentation, this must never stop an app from starting
        logger.exception("bgtasks: could not prepare the app (202 in OpenAPI, 503 handlers)")


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
    return response(reply)


def document_background_routes(app: Any) -> int:
    """Document each FastAPI ``@background`` route as ``202 Accepted``; return how many.

    A ``@background`` endpoint's signature already gives FastAPI the 202 body
    (``TaskAccepted``) as its response model; the status code is the route's
    own, 200 unless the route says ``status_code=202``. The middleware calls
    this when the app starts, for routes that set no status code. Call it
    yourself before exporting ``app.openapi()`` without starting the app (or
    write ``status_code=202`` on those routes).
    """
    if "fastapi" not in sys.modules:
        return 0
    try:
        from fastapi.routing import APIRoute
    except ImportError:  # pragma: no cover
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
