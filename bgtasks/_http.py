"""The HTTP side shared by every adapter, with no framework in it.

Every adapter (ASGI, WSGI, Flask) turns a request into ``(method, path,
query)``, asks the ``Router`` what to answer, and writes the ``Reply`` in its
own protocol. Routes, authorisation, status codes and bodies are decided here
once; the routes are rows in a table (``Router.add``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Literal

import pydantic

from ._errors import RegistryFull, StoreError
from ._handle import TaskHandle
from ._ids import is_valid_id
from ._task import FINISHED, ErrorInfo, TaskRecord, TaskStatus

logger = logging.getLogger("bgtasks")

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_IDEMPOTENCY_KEY",
    "Action",
    "Ask",
    "Authorize",
    "Call",
    "Reply",
    "Route",
    "Router",
    "StatusRoutes",
    "TaskAccepted",
    "accepted",
    "idempotency_key_from_header",
    "overloaded",
    "run_async",
    "run_sync",
]

DEFAULT_PREFIX = "/_bgtasks/tasks"
Action = Literal["read", "cancel"]
#: ``authorize(request, record, action) -> bool``: may this request read or
#: cancel this task? ``request`` is the framework's own request object.
Authorize = Callable[[Any, TaskRecord, Action], bool | Awaitable[bool]]

_JSON = ("content-type", "application/json")

#: Longest idempotency key stored as sent; a longer header value is hashed.
MAX_IDEMPOTENCY_KEY = 255


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def reason(self) -> str:
        return _REASONS.get(self.status, "")


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


def _json(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> Reply:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Reply(status, [_JSON, ("content-length", str(len(body))), *(headers or [])], body)


#: What the status JSON shows instead of an error's message when the app hides them.
HIDDEN_MESSAGE = "(hidden: include_error_message=False)"


def _record(
    status: int, record: TaskRecord, *, include_result: bool, include_error_message: bool = True
) -> Reply:
    exclude = None if include_result else {"result"}
    if not include_error_message:
        record = hide_error_messages(record)
    body = record.model_dump_json(exclude=exclude).encode()
    return Reply(status, [_JSON, ("content-length", str(len(body)))], body)


def hide_error_messages(record: TaskRecord) -> TaskRecord:
    """``record`` with the messages of its error and its steps' errors hidden
    (they may carry secrets: a database URL, a token), their types kept."""
    update: dict[str, object] = {}
    if record.error is not None:
        update["error"] = ErrorInfo(type=record.error.type, message=HIDDEN_MESSAGE)
    if any(s.error is not None for s in record.steps):
        update["steps"] = [
            s
            if s.error is None
            else s.model_copy(
                update={"error": ErrorInfo(type=s.error.type, message=HIDDEN_MESSAGE)}
            )
            for s in record.steps
        ]
    return record.model_copy(update=update) if update else record


def store_unavailable() -> Reply:
    """503 for a status request the task store cannot answer now (detail in the log)."""
    body = {"detail": "the task store is unavailable; retry later."}
    return _json(503, body, [("retry-after", "1")])


class TaskAccepted(pydantic.BaseModel):
    """The JSON body of a ``202 Accepted`` answer, as OpenAPI documents it."""

    id: str
    status: TaskStatus
    status_url: str


def idempotency_key_from_header(value: str | bytes | None) -> str | None:
    """The idempotency key an ``Idempotency-Key`` header value asks for, or None.

    Surrounding whitespace is dropped and an empty value means no key. A value
    longer than ``MAX_IDEMPOTENCY_KEY`` characters becomes ``"sha256:<hex>"`` of
    its bytes: the same header always gives the same key, within the store's
    bound. ``value`` is the raw header (ASGI) or its latin-1 text (WSGI's
    ``environ["HTTP_IDEMPOTENCY_KEY"]``); both give the same key.
    """
    if value is None:
        return None
    key = value.decode("latin-1").strip() if isinstance(value, bytes) else value.strip()
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY:
        # Servers strip a header's surrounding whitespace, so for what they pass on
        # this is the hash of the value as sent.
        try:
            raw = key.encode("latin-1")
        except UnicodeEncodeError:  # not from a server: any text will do
            raw = key.encode("utf-8", "surrogatepass")
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    return key


def not_found() -> Reply:
    return _json(404, {"detail": "Task not found"})


def accepted(handle: TaskHandle, status_url: str) -> Reply:
    """The 202 a ``@background`` endpoint answers with."""
    # On every @background request: built by hand, the same bytes as _json gives.
    # Ids are URL-safe and statuses are plain words; only the URL needs escaping.
    body = (
        f'{{"id":"{handle.id}","status":"{handle.status}","status_url":{json.dumps(status_url)}}}'
    ).encode()
    return Reply(
        202,
        [_JSON, ("content-length", str(len(body))), ("location", status_url)],
        body,
    )


def accepted_body(handle: TaskHandle, status_url: str) -> dict[str, str]:
    return {"id": handle.id, "status": handle.status, "status_url": status_url}


def overloaded(exc: RegistryFull) -> Reply:
    """503 with ``Retry-After`` for work the runtime refused."""
    retry_after = max(1, round(exc.retry_after))
    return _json(503, {"detail": str(exc)}, [("retry-after", str(retry_after))])


# --------------------------------------------------------------------------- routes
# A route is a row in a table: a path pattern under one of the router's mounts,
# the methods it answers and a handler. A handler is a generator: it yields an
# ``Ask`` when it needs the app's ``authorize`` hook to decide, receives the
# verdict, and returns the ``Reply``. The adapters drive it (``run_sync`` under
# WSGI/Flask, ``run_async`` under ASGI), so a route is written once, with no
# framework and no event loop in it.


@dataclasses.dataclass(frozen=True, slots=True)
class Ask:
    """A route's question to the app: may this request do ``action`` on ``record``?"""

    record: TaskRecord
    action: Action


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One request to a bgtasks route, as a handler sees it."""

    router: Router
    runtime: Any
    method: str
    params: dict[str, str]
    query: str = ""
    #: Request headers, lower-case names (given to routes that need them).
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)


Step = Generator[Ask, bool, Reply]
Handler = Callable[[Call], Step]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """``pattern`` is a path under ``mount`` with ``{name}`` segments (no ``/`` in them)."""

    mount: str
    pattern: str
    methods: frozenset[str]
    handler: Handler
    regex: re.Pattern[str] = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        parts = re.split(r"\{(\w+)\}", self.pattern)
        rx = "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
        )
        object.__setattr__(self, "regex", re.compile(rx))


class Router:
    """The bgtasks routes an adapter serves: a table, matched in order.

    Every path under one of ``mounts`` belongs to bgtasks (404 if no row
    matches), so an app's own routes never shadow them. ``add`` appends a row.
    """

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        authorize: Authorize | None = None,
        include_result: bool = True,
        include_error_message: bool = True,
    ) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            msg = f"status_prefix must start with '/' and not end with one, got {prefix!r}."
            raise ValueError(msg)
        self.prefix = prefix
        self._with_slash = prefix + "/"
        self.authorize = authorize
        self.include_result = include_result
        self.include_error_message = include_error_message
        self.routes: list[Route] = []
        self.mounts: list[str] = []
        self._under: tuple[str, ...] = ()
        self._exact: frozenset[str] = frozenset()
        self.add(Route(prefix, "/{task_id}", frozenset(("GET", "HEAD", "DELETE")), task_status))

    def add(self, route: Route) -> None:
        """Serve ``route`` (after the rows already in the table)."""
        unknown = route.methods.difference(_METHOD_ORDER)
        if unknown:
            msg = f"a bgtasks route cannot serve {sorted(unknown)}; methods: {_METHOD_ORDER}."
            raise ValueError(msg)
        self.routes.append(route)
        if route.mount not in self.mounts:
            self.mounts.append(route.mount)
            self._under = tuple(m + "/" for m in self.mounts)
            self._exact = frozenset(self.mounts)

    def url_path(self, task_id: str) -> str:
        """The status path of a task (under the app's root path)."""
        return self._with_slash + task_id

    def owns(self, path: str) -> bool:
        """True if ``path`` is a bgtasks path (served here, even if only with a 404)."""
        # On every request: one C call in the common case.
        return path.startswith(self._under) or path in self._exact

    def dispatch(
        self,
        runtime: Any,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Step | Reply:
        """The handler's steps for a request to a path ``owns`` accepted, or a final reply."""
        allowed: set[str] = set()
        for route in self.routes:
            if not path.startswith(route.mount):
                continue
            m = route.regex.fullmatch(path, len(route.mount))
            if m is None:
                continue
            if method not in route.methods:
                allowed |= route.methods
                continue
            return route.handler(
                Call(self, runtime, method, m.groupdict(), query, headers or {})
            )
        if allowed:
            allow = ", ".join(sorted(allowed, key=_METHOD_ORDER.index))
            return Reply(405, [("allow", allow), ("content-length", "0")], b"")
        return not_found()

    @staticmethod
    def action(method: str) -> Action:
        return "cancel" if method == "DELETE" else "read"


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

#: The old name, kept for code that imported it.
StatusRoutes = Router


def advance(step: Step, verdict: bool | None = None) -> Ask | Reply:
    """Run ``step`` to its next question (an ``Ask``) or to its reply."""
    try:
        return next(step) if verdict is None else step.send(verdict)
    except StopIteration as stop:
        reply: Reply = stop.value
        return reply


def run_sync(found: Step | Reply, decide: Callable[[Ask], bool]) -> Reply:
    """Drive a route with a sync ``decide(ask) -> bool`` (WSGI, Flask)."""
    if isinstance(found, Reply):
        return found
    out = advance(found)
    while isinstance(out, Ask):
        out = advance(found, decide(out))
    return out


async def run_async(
    found: Step | Reply,
    decide: Callable[[Ask], Awaitable[bool | Reply]],
    *,
    in_thread: bool,
) -> Reply:
    """Drive a route from an event loop; ``decide`` may answer with a final reply.

    ``in_thread``: run the route's own steps (store reads) in a worker thread.
    """
    if isinstance(found, Reply):
        return found
    step = found
    if in_thread:
        import anyio.to_thread

        out = await anyio.to_thread.run_sync(advance, step)
    else:
        out = advance(step)
    while isinstance(out, Ask):
        verdict = await decide(out)
        if isinstance(verdict, Reply):
            step.close()
            return verdict
        if in_thread:
            out = await anyio.to_thread.run_sync(advance, step, verdict)
        else:
            out = advance(step, verdict)
    return out


def task_status(call: Call) -> Step:
    """``GET``/``HEAD``/``DELETE <prefix>/<id>``: read or cancel a task."""
    rt = call.runtime
    task_id = call.params["task_id"]
    if not is_valid_id(task_id):
        return not_found()
    try:
        record: TaskRecord | None = rt.get(task_id)
    except StoreError as exc:
        logger.error("bgtasks: the status of task %s could not be read: %s", task_id, exc)
        return store_unavailable()
    if record is None:
        return not_found()
    router = call.router
    if router.authorize is not None:
        allowed = yield Ask(record, router.action(call.method))
        if not allowed:
            # 404, not 403: a refused reader learns nothing, not even that the id exists.
            return not_found()
    shown = {
        "include_result": router.include_result,
        "include_error_message": router.include_error_message,
    }
    if call.method == "DELETE":
        try:
            if record.status in FINISHED or not rt.cancel(record.id):
                # Finished before (or while) we looked: there is nothing to cancel.
                status = (rt.get(record.id) or record).status
                return _json(409, {"detail": f"Task already {status}", "status": status})
            return _record(202, rt.get(record.id) or record, **shown)
        except StoreError as exc:
            logger.error("bgtasks: task %s could not be cancelled: %s", task_id, exc)
            return store_unavailable()
    return _record(200, record, **shown)
