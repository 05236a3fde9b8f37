"""Daemon worker threads for sync task functions.

Not ``concurrent.futures``: its threads are joined at interpreter exit, so a
task stuck in a blocking call would hang the process after shutdown gave up
on it. Ours are daemon threads, at most ``max_threads`` of them, reused while
there is work and retired when idle; work beyond the bound waits in order.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable

__all__ = ["ThreadPool"]

Work = Callable[[], None]


class ThreadPool:
    def __init__(
        self, *, max_threads: int = 40, idle_timeout: float = 30.0, name: str = "bgtasks-worker"
    ) -> None:
        self._idle: list[queue.SimpleQueue[Work]] = []
        self._backlog: collections.deque[Work] = collections.deque()
        self._lock = threading.Lock()
        self._max = max_threads
        self._idle_timeout = idle_timeout
        self._name = name
        self._threads = 0
        self._started = 0

    def submit(self, fn: Work) -> None:
        """Run ``fn`` (which must not raise) on a worker thread, soon."""
        with self._lock:
            if self._idle:
                self._idle.pop().put(fn)
                return
            if self._threads >= self._max:
                self._backlog.append(fn)
                return
            self._threads += 1
            self._started += 1
            number = self._started
        q: queue.SimpleQueue[Work] = queue.SimpleQueue()
        q.put(fn)
        threading.Thread(
            target=self._work, args=(q,), name=f"{self._name}-{number}", daemon=True
        ).start()

    def _work(self, q: queue.SimpleQueue[Work]) -> None:
        while True:
            try:
                fn = q.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if q in self._idle:
                        self._idle.remove(q)
                        self._threads -= 1
                        return
                continue  # someone took us off the idle list: work is on its way
            while True:
                fn()
                with self._lock:
                    if not self._backlog:
                        self._idle.append(q)
                        break
                    fn = self._backlog.popleft()
            del fn
