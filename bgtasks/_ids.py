"""Task ids: 144 random bits from the OS's CSPRNG, URL-safe base64 (24 characters)."""

from __future__ import annotations

import base64
import os
import re

__all__ = ["is_valid_id", "new_id"]

_BATCH = 512
_ID_BYTES = 18  # a multiple of 3: base64 without padding, 24 characters
_ID_LEN = 24
_VALID = re.compile(r"[A-Za-z0-9_-]{24}")
_pool: list[str] = []


_SLICES = [slice(i, i + _ID_LEN) for i in range(0, _ID_LEN * _BATCH, _ID_LEN)]


def _refill() -> None:
    text = base64.urlsafe_b64encode(os.urandom(_ID_BYTES * _BATCH)).decode("ascii")
    _pool.extend(map(text.__getitem__, _SLICES))


def _reset_after_fork() -> None:
    # A child must never hand out ids its parent (or a sibling) may also use.
    _pool.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def new_id() -> str:
    """A fresh id. Ids are made in batches: one ``os.urandom`` call per 512."""
    # list.pop is atomic under the GIL, so threads never share an id; two
    # threads refilling at once only make the pool bigger.
    try:
        return _pool.pop()
    except IndexError:
        _refill()
        return _pool.pop()


def is_valid_id(value: str) -> bool:
    """Whether ``value`` has the shape of a task id (cheap; no lookup)."""
    return len(value) == _ID_LEN and _VALID.fullmatch(value) is not None
