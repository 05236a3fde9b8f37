"""The task list and the counts, with no framework in it.

``GET <dashboard_prefix>/api/tasks?status=…&name=…&limit=50&cursor=…`` answers
``{"items": [TaskRecord without result], "next_cursor": str | null}``,
newest first; following ``next_cursor`` visits every task exactly once.
``GET <dashboard_prefix>/api/stats`` answers counts per status and per name.

Where the records come from: a durable store holds every process's tasks,
so it is asked (``store.list(query)`` / ``store.stats()`` when the store has
them); otherwise the runtime's own registry is read, and the answer says it
covers this process only (``"scope": "process"``).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, get_args

from ._task import TaskRecord, TaskStatus
from .stores.base import MAX_LIMIT, ListQuery, Page, decode_cursor, encode_cursor

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "ListQuery",
    "Page",
    "QueryError",
    "decode_cursor",
    "encode_cursor",
    "list_registry",
    "list_tasks",
    "parse_list_query",
    "stats_payload",
]

DEFAULT_LIMIT = 50
MAX_NAME = 200
STATUSES: tuple[str, ...] = get_args(TaskStatus)


class QueryError(ValueError):
    """A list query the client got wrong: answered with 400 and this message."""


def parse_list_query(params: Mapping[str, Sequence[str]]) -> ListQuery:
    """``ListQuery`` from a query string's parameters (each a list of values)."""
    statuses = tuple(dict.fromkeys(params.get("status", ())))
    for status in statuses:
        if status not in STATUSES:
            msg = f"status must be one of {', '.join(STATUSES)}; got {status!r}"
            raise QueryError(msg)
    names = tuple(dict.fromkeys(params.get("name", ())))
    for name in names:
        if not name or len(name) > MAX_NAME:
            msg = f"name must be 1 to {MAX_NAME} characters long"
            raise QueryError(msg)
    limit = DEFAULT_LIMIT
    given = params.get("limit", ())
    if len(given) > 1:
        msg = "give limit at most once"
        raise QueryError(msg)
    if given:
        try:
            limit = int(given[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            msg = f"limit must be a whole number from 1 to {MAX_LIMIT}; got {given[0]!r}"
            raise QueryError(msg)
    cursors = params.get("cursor", ())
    if len(cursors) > 1:
        msg = "give cursor at most once"
        raise QueryError(msg)
    try:
        return ListQuery(
            statuses=statuses,  # type: ignore[arg-type]  # checked above
            names=names,
            limit=limit,
            cursor=cursors[0] if cursors and cursors[0] else None,
        )
    except ValueError as exc:  # a cursor that is not one of ours
        raise QueryError(str(exc)) from None


def list_registry(registry: dict[str, Any], query: ListQuery) -> Page:
    """A page of the tasks a runtime holds (``Runtime._registry``), newest first.

    Newest first is the reverse of admission order (the registry's order),
    which never changes for a task, so paging on from the cursor's task sees
    every task once. Safe from any thread: a first page reads the registry
    as it is and starts again on a copy of its keys if another thread changed
    it meanwhile; a later page finds its cursor's task in such a copy.
    """
    after = query.after
    if after is None:
        try:
            return _page(registry, reversed(registry), query)
        except RuntimeError:  # "dictionary changed size during iteration"
            pass
    keys = list(registry)  # one C-level copy: consistent, whatever other threads do
    start = len(keys)
    if after is not None:
        created, last_id = after
        try:
            start = keys.index(last_id)
        except ValueError:  # the cursor's task expired: go on by time
            start = _first_older(registry, keys, created, last_id)
    return _page(registry, itertools.islice(reversed(keys), len(keys) - start, None), query)


def _page(registry: Mapping[str, Any], keys: Iterator[str], query: ListQuery) -> Page:
    statuses = query.statuses
    names = query.names
    items: list[TaskRecord] = []
    last: Any = None
    more = False
    for key in keys:
        t = registry.get(key)
        if t is None:
            continue
        if statuses and t._status not in statuses:
            continue
        if names and t._name not in names:
            continue
        if len(items) == query.limit:
            more = True
            break
        items.append(t.record)
        last = t
    cursor = encode_cursor(last._created_at, last._id) if more and last is not None else None
    return Page(items, cursor)


def _first_older(registry: Mapping[str, Any], keys: list[str], created: float, task_id: str) -> int:
    """The position up to which the tasks are older than ``(created, task_id)``."""
    for i in range(len(keys) - 1, -1, -1):
        t = registry.get(keys[i])
        if t is not None and (t._created_at, t._id) < (created, task_id):
            return i + 1
    return 0


def list_tasks(runtime: Any, query: ListQuery) -> tuple[Page, str]:
    """A page of tasks and its scope: ``"store"`` (every process's) or ``"process"``."""
    store = runtime.store
    if getattr(store, "durable", False) and callable(getattr(store, "list", None)):
        page: Page = store.list(query)
        return page, "store"
    return list_registry(runtime._registry, query), "process"


def registry_stats(registry: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Counts of the tasks a runtime holds, per status and per name."""
    by_status = dict.fromkeys(STATUSES, 0)
    by_name: dict[str, int] = {}
    for key in list(registry):
        t = registry.get(key)
        if t is None:
            continue
        by_status[t._status] += 1
        by_name[t._name] = by_name.get(t._name, 0) + 1
    return {"by_status": by_status, "by_name": by_name}


def stats_payload(runtime: Any) -> dict[str, Any]:
    """``{"by_status": {status: n}, "by_name": {name: n}, "total", "scope", "pid"}``."""
    store = runtime.store
    scope = "process"
    if getattr(store, "durable", False) and callable(getattr(store, "stats", None)):
        found = store.stats()
        scope = "store"
    else:
        found = registry_stats(runtime._registry)
    by_status = {**dict.fromkeys(STATUSES, 0), **found["by_status"]}
    by_name = found["by_name"]
    return {
        "by_status": by_status,
        "by_name": by_name,
        "total": sum(by_status.values()),
        "scope": scope,
        "pid": os.getpid(),
    }


def page_payload(page: Page, scope: str) -> bytes:
    items = ",".join(r.model_dump_json(exclude={"result"}) for r in page.items)
    tail = json.dumps({"next_cursor": page.next_cursor, "scope": scope}, separators=(",", ":"))[1:]
    return f'{{"items":[{items}],{tail}'.encode()
