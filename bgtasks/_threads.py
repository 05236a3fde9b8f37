"""Daemon worker threads for sync task functions.

Not ``concurrent.futures``: its threads are joined at interpreter exit, so a
task stuck in a blocking call would hang the process after shutdown gave up
on it. Ours are daemon threads, reused while busy and retired when idle.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

__all__ = ["ThreadPool"]


class ThreadPool:
    def __init__(self, *, idle_timeout: float = 30.0, name: str = "bgtasks-worker") -> None:
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._idle_timeout = idle_timeout
        self._name = name
        self._count = 0

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            q = self._idle.pop() if self._idle else None
        if q is None:
            q = queue.SimpleQueue()
            self._count += 1
            t = threading.Thread(
                target=self._work, args=(q,), name=f"{self._name}-{self._count}", daemon=True
            )
            q.put(fn)
            t.start()
        else:
            q.put(fn)

    def _work(self, q: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            try:
                fn = q.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if q in self._idle:
                        self._idle.remove(q)
                        return
                continue  # someone took us off the idle list: work is on its way
            fn()  # fn never raises: the runtime wraps it
            del fn
            with self._lock:
                self._idle.append(q)
