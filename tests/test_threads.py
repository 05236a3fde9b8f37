"""The worker-thread pool behind sync tasks."""

from __future__ import annotations

import threading
import time

from bgtasks._threads import ThreadPool

WAIT = 5.0


def _until(cond: object, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.005)
    return False


def test_a_burst_of_short_tasks_runs_on_a_few_threads() -> None:
    pool = ThreadPool(max_threads=40)
    done: list[int] = []
    for i in range(2000):
        pool.submit(lambda i=i: done.append(i))  # type: ignore[misc]
    assert _until(lambda: len(done) == 2000)
    assert sorted(done) == list(range(2000))
    # Without batching this started a thread per task while the submitter held the GIL.
    assert pool.threads <= 8


def test_a_blocking_task_does_not_hold_up_the_rest() -> None:
    pool = ThreadPool(max_threads=4)
    release = threading.Event()
    ran = threading.Event()
    pool.submit(lambda: release.wait(WAIT) and None)
    for _ in range(5):
        pool.submit(lambda: None)
    pool.submit(ran.set)
    try:
        assert ran.wait(WAIT)
    finally:
        release.set()


def test_beyond_the_bound_work_waits_and_then_runs() -> None:
    pool = ThreadPool(max_threads=3)
    release = threading.Event()
    started = threading.Semaphore(0)
    later = threading.Event()

    def blocker() -> None:
        started.release()
        release.wait(WAIT)

    for _ in range(3):
        pool.submit(blocker)
    for _ in range(3):
        assert started.acquire(timeout=WAIT)
    pool.submit(later.set)
    assert not later.wait(0.2)  # all three threads are busy
    assert pool.threads == 3
    release.set()
    assert later.wait(WAIT)


def test_idle_threads_retire_and_come_back() -> None:
    pool = ThreadPool(max_threads=4, idle_timeout=0.05)
    first = threading.Event()
    pool.submit(first.set)
    assert first.wait(WAIT)
    assert _until(lambda: pool.threads == 0)
    again = threading.Event()
    pool.submit(again.set)
    assert again.wait(WAIT)
