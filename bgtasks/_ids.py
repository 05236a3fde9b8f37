"""Task ids: 128 random bits, URL-safe base64 (22 characters)."""

from __future__ import annotations

import base64
import os
import re
import threading

__all__ = ["is_valid_id", "new_id"]

_BATCH = 256
_lock = threading.Lock()
_buf = b""
_pos = 0
_VALID = re.compile(r"^[A-Za-z0-9_-]{22}$")


def _reset_after_fork() -> None:
    # A child must never hand out ids from its parent's buffer.
    global _buf, _pos
    _buf, _pos = b"", 0


os.register_at_fork(after_in_child=_reset_after_fork)


def new_id() -> str:
    """A fresh id from the OS's CSPRNG, read in batches to keep it cheap."""
    global _buf, _pos
    with _lock:
        if _pos >= len(_buf):
            _buf, _pos = os.urandom(16 * _BATCH), 0
        raw = _buf[_pos : _pos + 16]
        _pos += 16
    return base64.urlsafe_b64encode(raw)[:22].decode("ascii")


def is_valid_id(value: str) -> bool:
    """Whether ``value`` has the shape of a task id (cheap; no lookup)."""
    return len(value) == 22 and _VALID.match(value) is not None
