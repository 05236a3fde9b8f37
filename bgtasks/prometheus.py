"""Prometheus metrics for background tasks: ``bgtasks.prometheus.instrument(runtime)``.

=====================================================  =========  ==============
metric                                                 type       labels
=====================================================  =========  ==============
``bgtasks_tasks_submitted_total``                      counter    name
``bgtasks_tasks_rejected_total``                       counter    reason
``bgtasks_tasks_finished_total``                       counter    name, status
``bgtasks_task_retries_total``                         counter    name
``bgtasks_task_limit_exceeded_total``                  counter    name, limit
``bgtasks_task_duration_seconds``                      histogram  name, status
``bgtasks_task_queue_wait_seconds``                    histogram  name
``bgtasks_tasks``                                      gauge      state
=====================================================  =========  ==============

``name`` is the task's name (a function's qualified name unless you gave
one), never its id. ``bgtasks_tasks{state="pending"|"running"}`` is read from
the runtime when Prometheus scrapes; under prometheus-client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR`` set, e.g. gunicorn with several workers)
one process cannot read another's runtime, so each worker keeps its own
counts in a ``livesum`` gauge instead. See docs/observability.md.

Needs ``prometheus-client`` (``pip install 'bgtasks[prometheus]'``).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    msg = (
        "bgtasks.prometheus needs prometheus-client, which is not installed: "
        "pip install 'bgtasks[prometheus]'."
    )
    raise ImportError(msg) from exc

from ._observe import ObservedTask, Observer, RejectReason, limit_name

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["MetricsObserver", "instrument"]

#: Background work runs from milliseconds to an hour: wider than HTTP's buckets.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"),
)  # fmt: skip
QUEUE_WAIT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, float("inf"),
)  # fmt: skip


def instrument(runtime: Runtime, registry: CollectorRegistry | None = None) -> Callable[[], None]:
    """Export ``runtime``'s task metrics to ``registry`` (default: the global
    ``prometheus_client.REGISTRY``); returns a function that stops it.

    Several runtimes (one per app lifetime, or per test) may be instrumented
    into one registry: the metrics are created once and shared.
    """
    metrics = _Metrics.of(REGISTRY if registry is None else registry)
    return metrics.add(runtime)


def _multiprocess() -> bool:
    # prometheus-client's own switch, read when it is imported.
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


class _Metrics:
    """The metric objects of one registry, shared by every runtime exported to it."""

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _Metrics:
        with _lock:
            metrics = _by_registry.get(registry)
            if metrics is None:
                metrics = _by_registry[registry] = cls(registry)
            return metrics

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.submitted = Counter("bgtasks_tasks_submitted", "Tasks admitted.", ["name"], registry=r)
        self.rejected = Counter(
            "bgtasks_tasks_rejected",
            "Tasks refused at admission (RegistryFull / 503), by reason: pending, memory, "
            "store, shutdown.",
            ["reason"],
            registry=r,
        )
        self.finished = Counter(
            "bgtasks_tasks_finished",
            "Tasks that reached a final status: succeeded, failed, cancelled.",
            ["name", "status"],
            registry=r,
        )
        self.retries = Counter(
            "bgtasks_task_retries", "Failed attempts followed by another.", ["name"], registry=r
        )
        self.limit_exceeded = Counter(
            "bgtasks_task_limit_exceeded",
            "Attempts stopped by a limit: wall_clock, cpu_time, memory.",
            ["name", "limit"],
            registry=r,
        )
        self.duration = Histogram(
            "bgtasks_task_duration_seconds",
            "Seconds from a task's first start to its final status.",
            ["name", "status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "bgtasks_task_queue_wait_seconds",
            "Seconds between a task's admission and its first attempt.",
            ["name"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.tasks: Gauge | None = None
        self.runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()
        if _multiprocess():
            # Another worker's runtime cannot be read at scrape time: each keeps its share.
            self.tasks = Gauge(
                "bgtasks_tasks",
                "Unfinished tasks, by state: pending, running.",
                ["state"],
                registry=r,
                multiprocess_mode="livesum",
            )
        else:
            r.register(_TasksCollector(self.runtimes))

    def add(self, runtime: Runtime) -> Callable[[], None]:
        self.runtimes.add(runtime)
        unsubscribe = runtime.observe(MetricsObserver(self))

        def stop() -> None:
            unsubscribe()
            self.runtimes.discard(runtime)

        return stop


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _TasksCollector(Collector):
    """``bgtasks_tasks{state}``, counted from the runtimes when scraped."""

    def __init__(self, runtimes: weakref.WeakSet[Runtime]) -> None:
        self._runtimes = runtimes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "bgtasks_tasks", "Unfinished tasks, by state: pending, running.", labels=["state"]
        )
        pending = running = 0
        for rt in list(self._runtimes):
            counts = rt.stats()
            pending += counts["pending"]
            running += counts["running"]
        family.add_metric(["pending"], pending)
        family.add_metric(["running"], running)
        yield family


class MetricsObserver(Observer):
    """The observer behind ``instrument``: counts into ``_Metrics``."""

    def __init__(self, metrics: _Metrics) -> None:
        self._m = metrics
        # Each metric's child per label set, so that a task pays labels() once per name.
        self._submitted: dict[str, Any] = {}
        self._queue_wait: dict[str, Any] = {}
        self._finished: dict[tuple[str, str], tuple[Any, Any]] = {}
        gauge = metrics.tasks
        self._pending = gauge.labels("pending") if gauge is not None else None
        self._running = gauge.labels("running") if gauge is not None else None

    def __repr__(self) -> str:
        return "<bgtasks.prometheus.MetricsObserver>"

    def submitted(self, task: ObservedTask) -> None:
        child = self._submitted.get(task.name)
        if child is None:
            child = self._submitted[task.name] = self._m.submitted.labels(task.name)
        child.inc()
        if self._pending is not None:
            self._pending.inc()
            task.scratch["prometheus"] = "pending"

    def rejected(self, name: str, reason: RejectReason) -> None:
        self._m.rejected.labels(reason).inc()

    def attempt_started(self, task: ObservedTask, attempt: int, queued_for: float) -> None:
        if attempt == 1 and not task.replayed:
            child = self._queue_wait.get(task.name)
            if child is None:
                child = self._queue_wait[task.name] = self._m.queue_wait.labels(task.name)
            child.observe(queued_for)
        if self._running is not None and task.scratch.get("prometheus") != "running":
            if task.scratch.get("prometheus") == "pending":
                self._pending.dec()  # type: ignore[union-attr]
            self._running.inc()
            task.scratch["prometheus"] = "running"

    def attempt_ended(
        self,
        task: ObservedTask,
        attempt: int,
        error: BaseException | None,
        *,
        will_retry: bool,
        duration: float,
    ) -> None:
        if error is None:
            return
        if will_retry:
            self._m.retries.labels(task.name).inc()
        limit = limit_name(error)
        if limit is not None:
            self._m.limit_exceeded.labels(task.name, limit).inc()

    def finished(self, task: ObservedTask, status: str, duration: float) -> None:
        key = (task.name, status)
        children = self._finished.get(key)
        if children is None:
            m = self._m
            children = self._finished[key] = (m.finished.labels(*key), m.duration.labels(*key))
        children[0].inc()
        children[1].observe(duration)
        state = task.scratch.pop("prometheus", None)
        if state == "pending":
            self._pending.dec()  # type: ignore[union-attr]
        elif state == "running":
            self._running.dec()  # type: ignore[union-attr]
