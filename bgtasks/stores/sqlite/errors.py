"""What sqlite3 raised, told as a StoreError that says what to do; settling futures."""

from __future__ import annotations

import concurrent.futures
import sqlite3
from typing import Any

from ..._errors import StoreError

__all__ = ["settle", "store_error"]


def store_error(exc: BaseException, path: str) -> BaseException:
    """Turn what sqlite3 raised into a StoreError that says what to do."""
    if isinstance(exc, StoreError) or not isinstance(exc, sqlite3.Error):
        return exc
    text = str(exc)
    if "locked" in text or "busy" in text:
        msg = (
            f"the task store {path!r} stayed locked by another connection for longer than "
            f"busy_timeout ({text}). Another process holds a long write transaction on it; "
            "end that process, or raise ?busy_timeout= in the store URL."
        )
    elif "not a database" in text or "malformed" in text or "corrupt" in text:
        msg = (
            f"the task store {path!r} is not a SQLite database or is corrupt ({text}). Move "
            "the file aside (it may hold unfinished work worth inspecting) and start again, "
            "or point store= at another file."
        )
    elif "unable to open" in text or "readonly" in text or "read-only" in text:
        msg = (
            f"cannot open the task store {path!r} for writing ({text}). Check that the file "
            "and its directory exist and are writable by this process (SQLite also creates "
            f"{path}-wal and {path}-shm beside it), or point store= at another path."
        )
    elif "disk" in text and ("full" in text or "I/O" in text):
        msg = (
            f"the task store {path!r} could not be written ({text}); free disk space or "
            "check the disk."
        )
    elif "no such table" in text or "no such column" in text:
        msg = (
            f"the task store {path!r} has lost its tables ({text}): the file was removed or "
            "replaced while this process had it open. Restart the process to create it again."
        )
    else:
        msg = f"the task store {path!r} failed: {type(exc).__name__}: {text}"
    err = StoreError(msg)
    err.__cause__ = exc
    return err


def settle(fut: concurrent.futures.Future[Any], ok: bool, value: Any) -> None:
    """Give a write's caller its outcome, unless it stopped waiting.

    A caller that awaited the write through ``asyncio.wrap_future`` and was
    cancelled cancels this future too; the write itself may still have been
    committed (at-least-once), and the writer thread must go on.
    """
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled (or settled) by the caller meanwhile
