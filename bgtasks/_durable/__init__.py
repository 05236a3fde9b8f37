"""The runtime's durable part: durable calls, idempotency keys and replay.

- ``codec.py``: what a durable call stores, checked at decoration time;
- ``submit.py``: journal first, then launch (durable calls, idempotency keys);
- ``replay.py``: claim and run journaled work again; cancel requests from
  other processes; release at shutdown. Against any durable Store.
"""

from __future__ import annotations

from .codec import Codec as Codec
from .codec import check_durable as check_durable
from .replay import Replay as Replay
from .submit import RemoteHandle as RemoteHandle
from .submit import submit_durable as submit_durable
from .submit import submit_durable_async as submit_durable_async

__all__ = [
    "Codec",
    "RemoteHandle",
    "Replay",
    "check_durable",
    "submit_durable",
    "submit_durable_async",
]
