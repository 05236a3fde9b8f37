"""OpenTelemetry traces for background tasks: ``bgtasks.otel.instrument(runtime)``.

Each attempt of a task is one CONSUMER span named ``process <task name>``,
following the OpenTelemetry messaging semantic conventions. It is a child of
the span that was current where the task was submitted (the request's span)
and also linked to it, so a trace shows the request and the work it started.
A failed attempt has status ERROR and the exception recorded; a cancelled one
is marked ``bgtasks.outcome="cancelled"`` with no error status; a limit stop
is an error with ``bgtasks.limit`` naming the limit. A durable task replayed
after a crash starts a new trace linked to the submitter's span, whose
context was journaled with the call.

Needs ``opentelemetry-api`` only (``pip install 'bgtasks[otel]'``); exporting
the spans is up to the SDK you configure, as for any instrumentation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    msg = (
        "bgtasks.otel needs the OpenTelemetry API, which is not installed: "
        "pip install 'bgtasks[otel]' (and an SDK, such as opentelemetry-sdk, to export spans)."
    )
    raise ImportError(msg) from exc

from ._observe import ObservedTask, Observer, limit_name

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["TracingObserver", "instrument"]

_SYSTEM = "bgtasks"


def instrument(
    runtime: Runtime, *, tracer_provider: trace.TracerProvider | None = None
) -> Callable[[], None]:
    """Trace every task of ``runtime``; returns a function that stops it.

    ``tracer_provider`` defaults to the global one (``trace.set_tracer_provider``).
    """
    return runtime.observe(TracingObserver(tracer_provider))


class TracingObserver(Observer):
    """The observer behind ``instrument``: one span per attempt."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        from . import __version__

        self._tracer = trace.get_tracer("bgtasks", __version__, tracer_provider=tracer_provider)
        self._key = f"otel.{id(self)}"  # per-task state in ObservedTask.scratch

    def __repr__(self) -> str:
        return "<bgtasks.otel.TracingObserver>"

    def carrier(self) -> Mapping[str, str] | None:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        return headers or None

    def submitted(self, task: ObservedTask) -> None:
        # The submitter's context (the request's span), for every attempt's parent.
        task.scratch[self._key] = otel_context.get_current()

    def attempt_started(self, task: ObservedTask, attempt: int, queued_for: float) -> None:
        links: list[Link] = []
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.message.id": task.id,
            "messaging.destination.name": task.name,
            "bgtasks.attempt": attempt,
        }
        if task.replayed:
            # A new trace: the submitter's one ended with the process that crashed.
            parent = otel_context.Context()
            attributes["bgtasks.replayed"] = True
            origin = trace.get_current_span(propagate.extract(task.origin or {}))
            if origin.get_span_context().is_valid:
                links.append(Link(origin.get_span_context()))
        else:
            # None if the observer came after its submission: then what is current.
            parent = task.scratch.get(self._key) or otel_context.get_current()
            submitter = trace.get_current_span(parent).get_span_context()
            if submitter.is_valid:
                links.append(Link(submitter))
        span = self._tracer.start_span(
            f"process {task.name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        # Current for the attempt: spans the task's code starts are its children.
        token = otel_context.attach(trace.set_span_in_context(span))
        task.scratch[f"{self._key}.{attempt}"] = (span, token)

    def attempt_ended(
        self,
        task: ObservedTask,
        attempt: int,
        error: BaseException | None,
        *,
        will_retry: bool,
        duration: float,
    ) -> None:
        state = task.scratch.pop(f"{self._key}.{attempt}", None)
        if state is None:
            return
        span, token = state
        try:
            if error is None:
                span.set_attribute("bgtasks.outcome", "succeeded")
            elif isinstance(error, asyncio.CancelledError):
                span.set_attribute("bgtasks.outcome", "cancelled")
                span.add_event("cancelled")
            else:
                limit = limit_name(error)
                if limit is not None:
                    span.set_attribute("bgtasks.outcome", "limit_exceeded")
                    span.set_attribute("bgtasks.limit", limit)
                else:
                    span.set_attribute("bgtasks.outcome", "failed")
                span.set_attribute("bgtasks.will_retry", will_retry)
                span.set_attribute("error.type", _qualified(type(error)))
                span.record_exception(error, escaped=True)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        finally:
            span.end()
            otel_context.detach(token)

    def step_started(self, task: ObservedTask, step: str) -> None:
        # A child of the attempt's span, which is current where the step runs.
        span = self._tracer.start_span(
            f"step {step}",
            kind=SpanKind.INTERNAL,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.message.id": task.id,
                "bgtasks.step": step,
            },
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        task.scratch[f"{self._key}.step.{step}"] = (span, token)

    def step_ended(
        self, task: ObservedTask, step: str, error: BaseException | None, attempts: int
    ) -> None:
        state = task.scratch.pop(f"{self._key}.step.{step}", None)
        if state is None:
            return
        span, token = state
        try:
            span.set_attribute("bgtasks.step.attempts", attempts)
            if error is not None:
                span.set_attribute("error.type", _qualified(type(error)))
                span.record_exception(error, escaped=True)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        finally:
            span.end()
            otel_context.detach(token)

    def finished(self, task: ObservedTask, status: str, duration: float) -> None:
        task.scratch.pop(self._key, None)


def _qualified(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
