"""Rows <-> values: a snapshot as the row it upserts, a row as a record or a claim."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pydantic

from ..._task import ErrorInfo, Progress, StepRecord, TaskSnapshot
from ..base import ClaimedTask, JournalEntry

__all__ = [
    "LIST_COLUMNS",
    "RECORD_COLUMNS",
    "claimed",
    "dumps",
    "entry_row",
    "snapshot",
    "snapshot_row",
]

#: The columns of a record, in the order ``snapshot`` reads them.
RECORD_COLUMNS = (
    "id, name, status, created_at, started_at, finished_at, attempts, error, result, "
    "progress, wake_at, steps"
)
#: The same without the result (a listing never carries results).
LIST_COLUMNS = RECORD_COLUMNS.replace(" result,", " NULL,")
#: The columns of a claim, in the order ``claimed`` reads them.
CLAIM_COLUMNS = (
    "id, name, created_at, attempts, target, payload, options, idempotency_key, wake_at, "
    "progress, steps"
)

T = TypeVar("T")

_steps = pydantic.TypeAdapter(list[StepRecord])


def dumps(value: Any) -> str | None:
    """JSON text of a result, or None if there is none (or it is not JSON)."""
    if value is None:
        return None
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        return None


def snapshot_row(s: TaskSnapshot, owner: str | None, now: float) -> tuple[Any, ...]:
    """The parameters of the store's upsert for ``s``."""
    error, progress, steps = s.error, s.progress, s.steps
    return (
        s.id,
        s.name,
        s.status,
        s.created_at,
        s.started_at,
        s.finished_at,
        s.attempts,
        None if error is None else error.model_dump_json(),
        dumps(s.result),
        None if progress is None else progress.model_dump_json(),
        owner,
        now,
        s.wake_at,
        _steps.dump_json(list(steps)).decode() if steps else None,
    )


def snapshot(row: Sequence[Any]) -> TaskSnapshot:
    """The snapshot of a row read with ``RECORD_COLUMNS`` (or ``LIST_COLUMNS``).

    A column that does not parse (a row written by another program, or a
    damaged file) reads as empty, and as an error saying so if the error
    column is the one: a bad row never breaks a status route or a page.
    """
    (task_id, name, status, created, started, finished, attempts, error, result, progress) = row[
        :10
    ]
    wake_at, steps = row[10], row[11]
    return TaskSnapshot(
        id=task_id,
        name=name,
        status=status,
        created_at=created,
        started_at=started,
        finished_at=finished,
        attempts=attempts,
        error=_parsed(error, ErrorInfo.model_validate_json, _UNREADABLE_ERROR),
        result=_parsed(result, json.loads, None),
        progress=_parsed(progress, Progress.model_validate_json, None),
        wake_at=wake_at,
        steps=tuple(_parsed(steps, _steps.validate_json, None) or ()),
    )


_UNREADABLE_ERROR = ErrorInfo(type="StoreError", message="the stored error cannot be read")


def _parsed(text: str | None, parse: Callable[[str], T], bad: T | None) -> T | None:
    """``parse(text)``; None for no text, ``bad`` for text that does not parse."""
    if not text:
        return None
    try:
        return parse(text)
    except ValueError:
        return bad


def entry_row(entry: JournalEntry, owner: str | None, now: float) -> tuple[Any, ...]:
    """The parameters of the store's journal insert for ``entry``."""
    options: str | None = None
    if entry.durable or entry.context:
        body: dict[str, Any] = {
            "retries": entry.retries,
            "limits": None if entry.limits is None else dict(entry.limits),
            "isolation": entry.isolation,
        }
        if entry.context:
            body["context"] = dict(entry.context)
        options = json.dumps(body, separators=(",", ":"))
    return (
        entry.id,
        entry.name,
        entry.created_at,
        owner,
        now,
        int(entry.durable),
        entry.target,
        entry.payload,
        options,
        entry.idempotency_key,
        entry.wake_at,
    )


def claimed(row: Sequence[Any]) -> ClaimedTask:
    """The claim of a row read with ``CLAIM_COLUMNS``. Raises ValueError, saying
    what is wrong, for a row that cannot be run again as it stands."""
    (task_id, name, created, attempts, target, payload, options, key, wake_at, progress, steps) = (
        row
    )
    if not target or ":" not in target:
        msg = f"its target {target!r} is not a function's 'module:qualname'"
        raise ValueError(msg)
    try:
        body = json.loads(options or "{}")
    except ValueError as exc:
        msg = f"its options are not JSON ({exc})"
        raise ValueError(msg) from None
    if not isinstance(body, dict):
        msg = f"its options are not a JSON object (got {type(body).__name__})"
        raise ValueError(msg)
    limits = body.get("limits")
    context = body.get("context")
    retries = body.get("retries", 0)
    isolation = body.get("isolation", "inline")
    if limits is not None and not _is_limits(limits):
        msg = f"its limits {limits!r} are not a mapping of limit names to numbers"
        raise ValueError(msg)
    if context is not None and not _is_str_map(context):
        msg = "its tracing context is not a mapping of strings to strings"
        raise ValueError(msg)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        msg = f"its retries {retries!r} are not an int >= 0"
        raise ValueError(msg)
    if isolation not in ("inline", "process"):
        msg = f"its isolation {isolation!r} is not 'inline' or 'process'"
        raise ValueError(msg)
    entry = JournalEntry(
        id=task_id,
        name=name,
        created_at=created,
        target=target,
        payload=payload or "{}",
        retries=retries,
        limits=limits,
        isolation=isolation,
        idempotency_key=key,
        wake_at=wake_at,
        context=context,
    )
    return ClaimedTask(entry=entry, attempts=attempts, progress=progress, steps=steps)


def _is_limits(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str)
        and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
        for k, v in value.items()
    )


def _is_str_map(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )
