"""The HTTP side shared by every adapter, with no framework in it.

Both the ASGI and the WSGI adapter turn a request into ``(method, path,
headers)``, ask this module what to answer, and write the ``Reply`` in their
own protocol. Authorisation, status codes and bodies are decided here once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import pydantic

from ._errors import RegistryFull, StoreError
from ._handle import TaskHandle
from ._ids import is_valid_id
from ._task import FINISHED, TaskRecord, TaskStatus

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_IDEMPOTENCY_KEY",
    "Action",
    "Authorize",
    "Reply",
    "StatusRoutes",
    "TaskAccepted",
    "accepted",
    "idempotency_key_from_header",
    "overloaded",
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
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    503: "Service Unavailable",
}


def _json(status: int, payload: object, headers: list[tuple[str, str]] | None = None) -> Reply:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Reply(status, [_JSON, ("content-length", str(len(body))), *(headers or [])], body)


def _record(status: int, record: TaskRecord, *, include_result: bool) -> Reply:
    exclude = None if include_result else {"result"}
    body = record.model_dump_json(exclude=exclude).encode()
    return Reply(status, [_JSON, ("content-length", str(len(body)))], body)


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


class StatusRoutes:
    """``GET``/``DELETE <prefix>/<id>``: read or cancel a task."""

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        authorize: Authorize | None = None,
        include_result: bool = True,
    ) -> None:
        if not prefix.startswith("/") or prefix.endswith("/"):
            msg = f"status_prefix must start with '/' and not end with one, got {prefix!r}."
            raise ValueError(msg)
        self.prefix = prefix
        self._with_slash = prefix + "/"
        self.authorize = authorize
        self.include_result = include_result

    def url_path(self, task_id: str) -> str:
        return self._with_slash + task_id

    def match(self, path: str) -> str | None:
        """The id part if ``path`` is under the prefix (valid or not), else None."""
        if path.startswith(self._with_slash):
            return path[len(self._with_slash) :]
        return None

    def lookup(self, runtime: Any, method: str, task_id: str) -> Reply | TaskRecord:
        """First half of a request: a final reply, or the record to authorise."""
        if method not in ("GET", "HEAD", "DELETE"):
            return Reply(405, [("allow", "GET, HEAD, DELETE"), ("content-length", "0")], b"")
        if not is_valid_id(task_id):
            return not_found()
        try:
            record: TaskRecord | None = runtime.get(task_id)
        except StoreError as exc:  # a shared store is down: try again, not a server error
            return overloaded(RegistryFull(str(exc)))
        if record is None:
            return not_found()
        return record

    def act(self, runtime: Any, method: str, record: TaskRecord, allowed: bool) -> Reply:
        """Second half: answer once ``authorize`` has had its say."""
        if not allowed:
            # 404, not 403: a refused reader learns nothing, not even that the id exists.
            return not_found()
        if method == "DELETE":
            try:
                return self._cancel(runtime, record)
            except StoreError as exc:
                return overloaded(RegistryFull(str(exc)))
        return _record(200, record, include_result=self.include_result)

    def _cancel(self, runtime: Any, record: TaskRecord) -> Reply:
        if record.status in FINISHED or not runtime.cancel(record.id):
            # Finished before (or while) we looked: there is nothing to cancel.
            status = (runtime.get(record.id) or record).status
            return _json(409, {"detail": f"Task already {status}", "status": status})
        return _record(202, runtime.get(record.id) or record, include_result=self.include_result)

    @staticmethod
    def action(method: str) -> Action:
        return "cancel" if method == "DELETE" else "read"
