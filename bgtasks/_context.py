"""Context variables: the active runtime, the current task, the responder."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import RuntimeNotActive

if TYPE_CHECKING:
    from ._handle import TaskHandle
    from ._runtime import Runtime

__all__ = ["active", "active_runtime", "current_task_var", "responder", "wrap_work"]

#: The runtime ``bgtasks.wait_until`` and ``@background`` use.
active_runtime: contextvars.ContextVar[Runtime | None] = contextvars.ContextVar(
    "bgtasks.active_runtime", default=None
)

#: The task whose code is running, for ``current_task()``.
current_task_var: contextvars.ContextVar[TaskHandle | None] = contextvars.ContextVar(
    "bgtasks.current_task", default=None
)


class Responder(Protocol):
    """Set by a framework adapter for the length of a request.

    A ``@background`` function that is the request's endpoint answers with
    ``accepted(handle)`` (the framework's 202 response); called anywhere else it
    returns the handle.
    """

    #: the request's ``Idempotency-Key`` header, if any
    idempotency_key: str | None

    def is_endpoint(self, fn: Any) -> bool: ...

    def accepted(self, handle: TaskHandle) -> Any: ...

    # Optional: ``wrap(work) -> work``. When the responder has it, work scheduled
    # during the request (a function, or a coroutine object) passes through it
    # first, so the adapter can carry request state into the task (the WSGI/Flask
    # adapter runs it inside a copy of Flask's app and request context). It must
    # keep a function's kind: a sync function stays sync, an async one async.


responder: contextvars.ContextVar[Responder | None] = contextvars.ContextVar(
    "bgtasks.responder", default=None
)


def wrap_work(work: Any) -> Any:
    """``work`` passed through the current responder's optional ``wrap``."""
    r = responder.get()
    if r is None:
        return work
    wrap = getattr(r, "wrap", None)
    return work if wrap is None else wrap(work)


def active() -> Runtime:
    """The runtime of the current context, or raise RuntimeNotActive."""
    rt = active_runtime.get()
    if rt is None:
        msg = (
            "no bgtasks runtime is active here. Install one in your app: "
            "app.add_middleware(bgtasks.asgi.BackgroundMiddleware) for FastAPI/Starlette, "
            "bgtasks.flask.BgTasks(app) for Flask, bgtasks.wsgi.BackgroundMiddleware(app) for "
            "WSGI; or run your code inside `async with bgtasks.Runtime():`."
        )
        raise RuntimeNotActive(msg)
    return rt
