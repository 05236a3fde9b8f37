"""The dashboard at ``<dashboard_prefix>/``: its files (package data) and its routes.

Framework-free: an adapter checks ``allow(request)`` (the app's
``dashboard=`` callable), then asks ``DashboardRoutes.handle`` what to answer:
a ``Reply``, or a ``StreamRequest`` for an event stream, which the adapter
drives with ``bgtasks._watch``.

Routes under the prefix (every one 404 unless ``allow`` said yes):

- ``GET /`` the page; ``GET /static/<file>`` its script and style sheet;
- ``GET /api/tasks`` a page of the list; ``GET /api/stats`` the counts;
- ``GET /api/tasks/<id>`` one record; ``GET /api/tasks/<id>/events`` its stream;
- ``GET /api/events`` one ``change`` event per burst of changes of any task;
- ``POST /api/tasks/<id>/cancel`` cancel (refused in read-only mode and from
  another site).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from .._http import Reply
from .._ids import is_valid_id
from .._listing import QueryError, list_tasks, page_payload, parse_list_query, stats_payload
from .._task import FINISHED, TaskRecord

__all__ = ["DEFAULT_DASHBOARD_PREFIX", "DashboardRoutes", "StreamRequest", "asset"]

DEFAULT_DASHBOARD_PREFIX = "/_bgtasks"

#: Sent with every dashboard answer. The page loads its own script and style
#: only (no inline script, no third party); ids in URLs are capabilities, so
#: no Referer carries them away.
SECURITY_HEADERS: list[tuple[str, str]] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("referrer-policy", "no-referrer"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("cache-control", "no-store"),
]

#: Seconds the counts are reused: every open page asks for them on each change,
#: and counting a big registry or a store's table is not free.
STATS_TTL = 1.0

_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: The header a cancel must carry: a cross-site form cannot send it, and a
#: cross-site script cannot without a CORS preflight this route never allows.
CANCEL_HEADER = "x-bgtasks-action"

_assets: dict[str, bytes] = {}


def asset(name: str) -> bytes:
    """A file of the page, read once from the package."""
    data = _assets.get(name)
    if data is None:
        data = _assets[name] = importlib.resources.files(__name__).joinpath(name).read_bytes()
    return data


@dataclasses.dataclass(frozen=True, slots=True)
class StreamRequest:
    """An event stream to open: one task's records, or change events of every task."""

    task_id: str | None


def _reply(
    status: int, body: bytes, content_type: str, extra: Sequence[tuple[str, str]] = ()
) -> Reply:
    headers = [("content-type", content_type), ("content-length", str(len(body)))]
    return Reply(status, [*headers, *SECURITY_HEADERS, *extra], body)


def _json(status: int, payload: object) -> Reply:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _reply(status, body, "application/json")


def not_found() -> Reply:
    return _json(404, {"detail": "Not Found"})


class DashboardRoutes:
    """What to answer under ``prefix``, once the app's ``dashboard`` callable said yes.

    ``live`` is how the page follows changes: ``"sse"`` (ASGI: event streams)
    or ``"poll"`` (WSGI: a stream would hold a server thread per open tab).
    """

    def __init__(
        self,
        allow: Callable[[Any], Any],
        *,
        prefix: str = DEFAULT_DASHBOARD_PREFIX,
        read_only: bool = False,
        include_result: bool = True,
        live: Literal["sse", "poll"] = "sse",
    ) -> None:
        if not callable(allow):
            msg = (
                "dashboard must be a function (request) -> bool that says who may see the "
                f"dashboard, e.g. dashboard=lambda request: is_admin(request); got "
                f"{type(allow).__name__}."
            )
            raise TypeError(msg)
        if not isinstance(prefix, str) or not prefix.startswith("/") or prefix.endswith("/"):
            msg = f"dashboard_prefix must start with '/' and not end with one, got {prefix!r}."
            raise ValueError(msg)
        self.allow = allow
        self.prefix = prefix
        self.read_only = bool(read_only)
        self.include_result = include_result
        self.live = live
        self._counted: tuple[float, dict[str, Any]] | None = None

    def _stats(self, runtime: Any) -> dict[str, Any]:
        """The counts, computed at most once per ``STATS_TTL`` for every open page."""
        now = time.monotonic()
        counted = self._counted
        if counted is None or now - counted[0] > STATS_TTL:
            counted = self._counted = (now, stats_payload(runtime))
        return counted[1]

    def match(self, path: str) -> str | None:
        """The part of ``path`` after the prefix ("" for the prefix itself), or None."""
        prefix = self.prefix
        if path == prefix:
            return ""
        if path.startswith(prefix) and path[len(prefix)] == "/":
            return path[len(prefix) :]
        return None

    def handle(
        self,
        runtime: Any,
        method: str,
        sub: str,
        params: Mapping[str, Sequence[str]],
        headers: Mapping[str, str],
    ) -> Reply | StreamRequest:
        """Answer ``method sub`` (the path after the prefix). ``headers`` have lower-case names."""
        if sub.startswith("/api/tasks/") and sub.endswith("/cancel"):
            if method != "POST":
                return _allow("POST")
            return self._cancel(runtime, sub[len("/api/tasks/") : -len("/cancel")], headers)
        if method not in ("GET", "HEAD"):
            return _allow("GET, HEAD")
        if sub == "":
            # Relative URLs in the page need the slash.
            return Reply(
                308,
                [("location", self.prefix + "/"), ("content-length", "0"), *SECURITY_HEADERS],
                b"",
            )
        if sub == "/":
            return self._page(runtime)
        if sub.startswith("/static/"):
            name = sub[len("/static/") :]
            content_type = _TYPES.get(name)
            if content_type is None:
                return not_found()
            return _reply(200, asset(name), content_type)
        if sub == "/api/tasks":
            try:
                query = parse_list_query(params)
            except QueryError as exc:
                return _json(400, {"detail": str(exc)})
            page, scope = list_tasks(runtime, query)
            return _reply(200, page_payload(page, scope), "application/json")
        if sub == "/api/stats":
            return _json(200, self._stats(runtime))
        if sub == "/api/events":
            return self._stream(None)
        if sub.startswith("/api/tasks/"):
            rest = sub[len("/api/tasks/") :]
            if rest.endswith("/events"):
                task_id = rest[: -len("/events")]
                if not is_valid_id(task_id) or runtime.get(task_id) is None:
                    return not_found()
                return self._stream(task_id)
            record = runtime.get(rest) if is_valid_id(rest) else None
            if record is None:
                return not_found()
            return self._record(record)
        return not_found()

    def _stream(self, task_id: str | None) -> Reply | StreamRequest:
        if self.live != "sse":
            return _json(404, {"detail": "Not Found: this server's dashboard polls"})
        return StreamRequest(task_id)

    def _record(self, record: TaskRecord) -> Reply:
        exclude = None if self.include_result else {"result"}
        return _reply(200, record.model_dump_json(exclude=exclude).encode(), "application/json")

    def _page(self, runtime: Any) -> Reply:
        store = runtime.store
        shared = "yes" if getattr(store, "durable", False) else "no"
        values = {
            "prefix": self.prefix,
            "live": self.live,
            "read_only": "yes" if self.read_only else "no",
            "shared": shared,
        }
        html = asset("index.html").decode()
        for key, value in values.items():
            html = html.replace("{{" + key + "}}", _attr(value))
        return _reply(200, html.encode(), "text/html; charset=utf-8")

    def _cancel(self, runtime: Any, task_id: str, headers: Mapping[str, str]) -> Reply:
        refused = _cross_site(headers)
        if refused:
            return _json(403, {"detail": refused})
        if self.read_only:
            return _json(403, {"detail": "this dashboard is read-only (dashboard_read_only=True)"})
        record = runtime.get(task_id) if is_valid_id(task_id) else None
        if record is None:
            return not_found()
        if record.status in FINISHED or not runtime.cancel(task_id):
            status = (runtime.get(task_id) or record).status
            return _json(409, {"detail": f"Task already {status}", "status": status})
        return self._record(runtime.get(task_id) or record)


def _allow(methods: str) -> Reply:
    return Reply(405, [("allow", methods), ("content-length", "0"), *SECURITY_HEADERS], b"")


def _cross_site(headers: Mapping[str, str]) -> str:
    """Why a cancel looks forged by another site ("" if it does not)."""
    if headers.get(CANCEL_HEADER) != "cancel":
        return f"a cancel must carry the header {CANCEL_HEADER}: cancel (the dashboard sends it)"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return "cancels from another site are refused"
    origin = headers.get("origin")
    if origin is not None:
        host = headers.get("host", "")
        if origin.split("://", 1)[-1] != host:
            return "cancels from another origin are refused"
    return ""


def _attr(value: str) -> str:
    return (
        value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")
    )
