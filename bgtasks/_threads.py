"""Daemon worker threads for sync task functions.

Not ``concurrent.futures``: its threads are joined at interpreter exit, so a
task stuck in a blocking call would hang the process after shutdown gave up
on it. Ours are daemon threads, at most ``max_threads`` of them, reused while
there is work and retired when idle; work beyond the bound waits in order.

Work goes to an idle thread when there is one. When there is none, a new
thread is started only if no thread is already on its way to run something
(handed work, but not yet running it: under the GIL a woken thread can wait
milliseconds for its turn while the submitter goes on). Otherwise the work
waits in the backlog, which every thread drains before it goes idle; a thread
that begins work while more waits behind it, with nobody on the way, starts
one more thread, so a task that blocks never holds up the rest for long. A
burst of short tasks thus runs on a few threads, each draining many, instead
of waking a new thread per task.
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
        self._idle: list[queue.SimpleQueue[Work | None]] = []
        self._backlog: collections.deque[Work] = collections.deque()
        self._lock = threading.Lock()
        self._max = max_threads
        self._idle_timeout = idle_timeout
        self._name = name
        self._threads = 0
        self._waking = 0  # threads handed work (or started) that have not begun it
        self._started = 0
        self._closed = False

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self._threads

    def submit(self, fn: Work) -> None:
        """Run ``fn`` (which must not raise) on a worker thread, soon."""
        with self._lock:
            if self._idle:
                self._waking += 1
                self._idle.pop().put(fn)
                return
            if self._waking or self._threads >= self._max:
                self._backlog.append(fn)
                return
            number = self._reserve()
        self._start(fn, number)

    def _reserve(self) -> int:
        # Under the lock: count a thread about to be started.
        self._threads += 1
        self._waking += 1
        self._started += 1
        return self._started

    def close(self) -> None:
        """Retire idle threads now, and busy ones once their work ends (the runtime ended)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for q in idle:
            q.put(None)

    def _start(self, fn: Work | None, number: int) -> None:
        # In a list the thread empties: a Thread keeps its args while it runs, and
        # the first work (and all it holds: an app, a request) must not live on.
        threading.Thread(
            target=self._work, args=([fn],), name=f"{self._name}-{number}", daemon=True
        ).start()

    def _work(self, first: list[Work | None]) -> None:
        fn = first.pop()
        q: queue.SimpleQueue[Work | None] = queue.SimpleQueue()
        handed = True  # counted in _waking until it begins
        while True:
            helper = 0
            with self._lock:
                if handed:
                    self._waking -= 1
                    handed = False
                if fn is None and self._backlog:
                    fn = self._backlog.popleft()
                if fn is None:
                    if self._closed:
                        self._threads -= 1
                        return
                    self._idle.append(q)
                elif self._backlog and not self._waking and self._threads < self._max:
                    helper = self._reserve()
            if helper:
                self._start(None, helper)
            if fn is not None:
                fn()
                fn = None
                continue
            try:
                fn = q.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if q in self._idle:
                        self._idle.remove(q)
                        self._threads -= 1
                        return
                fn = q.get()  # someone took us off the idle list: work is on its way
            if fn is None:  # closed
                with self._lock:
                    self._threads -= 1
                return
            handed = True
