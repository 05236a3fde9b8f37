"""The messages between a worker process and its parent, on a socket.

A message is a header (two 8-byte lengths), a small pickled tuple, the *meta*,
and a *blob* of bytes that may be empty: large pickles travel as blobs so they
are neither pickled twice nor copied into a bigger frame.

The request is ``("run", task_id, name, attempt, cpu_time, memory, watch_cpu)``
with the blob ``pickle((ref, fn, args, kwargs))``. The worker answers with any
number of ``("progress", done, total, message)``, with ``("started",
cpu_seconds)`` (its CPU time as the task began) if ``watch_cpu``, then exactly
one of (blob in brackets)::

    ("ok",) [result pickle]
    ("err", type_name, message, traceback_text, reason) [exception pickle or empty]
    ("memory", traceback_text)                    MemoryError under a memory limit
    ("load", type_name, message, traceback_text)  the request could not be unpickled
    ("bad_result", type_name, reason)             the result cannot be pickled

This module imports only the standard library: both sides use it.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

__all__ = ["HEADER", "PROTOCOL", "encode"]

HEADER = struct.Struct("!QQ")  # length of the meta pickle, length of the blob
PROTOCOL = pickle.HIGHEST_PROTOCOL
_SMALL = 1 << 16  # a blob up to this size is sent in one piece with its header


def encode(meta: tuple[Any, ...], blob: bytes = b"") -> list[bytes]:
    """One message as the pieces that go on the wire, in order."""
    head = pickle.dumps(meta, PROTOCOL)
    first = HEADER.pack(len(head), len(blob)) + head
    if len(blob) <= _SMALL:
        return [first + blob]
    return [first, blob]
