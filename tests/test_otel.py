"""bgtasks.otel: one CONSUMER span per attempt, under the submitter's span."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import anyio
import durable_apps
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import bgtasks
import bgtasks.otel
from bgtasks import Limits, Runtime

pytestmark = pytest.mark.anyio


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    yield exp
    exp.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    yield p
    p.shutdown()


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


async def test_an_attempt_is_a_consumer_span_under_the_submitters_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    inner_parent: list[int] = []
    async with Runtime() as rt:
        bgtasks.otel.instrument(rt, tracer_provider=provider)

        async def job() -> None:
            with tracer.start_as_current_span("inside") as inside:
                assert inside.parent is not None
                inner_parent.append(inside.parent.span_id)

        with tracer.start_as_current_span("request") as request:
            handle = rt.wait_until(job(), name="job")
        await handle.wait(5)
        await rt.drain(5)
    (span,) = spans(exporter, "process job")
    ctx = request.get_span_context()
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is not None and span.parent.span_id == ctx.span_id
    assert span.context is not None and span.context.trace_id == ctx.trace_id
    assert [link.context.span_id for link in span.links] == [ctx.span_id]
    assert attrs(span) == {
        "messaging.system": "bgtasks",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.message.id": handle.id,
        "messaging.destination.name": "job",
        "bgtasks.attempt": 1,
        "bgtasks.outcome": "succeeded",
    }
    assert span.status.status_code is StatusCode.UNSET
    # The attempt's span is current in the task: its own spans are children.
    assert inner_parent == [span.context.span_id]


async def test_failed_attempts_are_errors_with_the_exception_recorded(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    calls = 0
    async with Runtime(backoff=bgtasks.Backoff(initial=0, max=0, jitter=0)) as rt:
        bgtasks.otel.instrument(rt, tracer_provider=provider)

        @rt.background(retries=1, name="flaky")
        def flaky() -> str:  # sync: runs in a worker thread
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ValueError("first try fails")
            return "ok"

        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("request") as request:
            flaky()
        await rt.drain(5)
    first, second = sorted(spans(exporter, "process flaky"), key=lambda s: s.start_time or 0)
    for span in (first, second):
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
    assert (attrs(first)["bgtasks.attempt"], attrs(second)["bgtasks.attempt"]) == (1, 2)
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "ValueError: first try fails"
    assert attrs(first)["bgtasks.outcome"] == "failed"
    assert attrs(first)["bgtasks.will_retry"] is True
    assert attrs(first)["error.type"] == "ValueError"
    (event,) = first.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.message"] == "first try fails"
    assert second.status.status_code is StatusCode.UNSET
    assert attrs(second)["bgtasks.outcome"] == "succeeded"


async def test_cancellation_and_limit_stops_are_recorded_distinctly(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    async with Runtime() as rt:
        bgtasks.otel.instrument(rt, tracer_provider=provider)
        h = rt.wait_until(hang(), name="cancelled")
        await asyncio.wait_for(started.wait(), 5)
        h.cancel()
        rt.wait_until(hang(), name="limited", limits=Limits(wall_clock=0.05))
        await rt.drain(5)
    (cancelled,) = spans(exporter, "process cancelled")
    assert cancelled.status.status_code is StatusCode.UNSET
    assert attrs(cancelled)["bgtasks.outcome"] == "cancelled"
    assert [e.name for e in cancelled.events] == ["cancelled"]
    (limited,) = spans(exporter, "process limited")
    assert limited.status.status_code is StatusCode.ERROR
    assert attrs(limited)["bgtasks.outcome"] == "limit_exceeded"
    assert attrs(limited)["bgtasks.limit"] == "wall_clock"
    assert attrs(limited)["bgtasks.will_retry"] is False
    assert attrs(limited)["error.type"] == "bgtasks._errors.WallClockLimitExceeded"


async def test_a_sync_task_submitted_from_a_thread_joins_that_threads_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = provider.get_tracer("test")
    seen: list[int] = []

    def job() -> None:  # the direct path: its whole life on a worker thread
        seen.append(trace.get_current_span().get_span_context().span_id)

    async with Runtime() as rt:
        bgtasks.otel.instrument(rt, tracer_provider=provider)

        def view() -> int:  # a sync endpoint, on a thread of its own
            with tracer.start_as_current_span("request") as request:
                rt.wait_until(job, name="direct").wait_sync(5)
            return request.get_span_context().span_id

        request_id = await anyio.to_thread.run_sync(view)
        await rt.drain(5)
    (span,) = spans(exporter, "process direct")
    assert span.parent is not None and span.parent.span_id == request_id
    assert span.context is not None and seen == [span.context.span_id]


async def test_a_replayed_durable_task_starts_a_new_trace_linked_to_the_original(
    provider: TracerProvider, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path / 't.db'}"
    tracer = provider.get_tracer("test")
    rt = Runtime(store=store, shutdown_grace=0.1)
    stop = bgtasks.otel.instrument(rt, tracer_provider=provider)
    async with rt:
        token = bgtasks._context.active_runtime.set(rt)
        try:
            with tracer.start_as_current_span("request") as request:
                handle = await durable_apps.forever.submit_async(1)
        finally:
            bgtasks._context.active_runtime.reset(token)
        await rt.drain(0.05)
    stop()
    # The first process stopped it at shutdown: one span, cancelled, in the request's trace.
    name = f"process {handle.name}"
    (original,) = spans(exporter, name)
    origin = request.get_span_context()
    assert original.context is not None and original.context.trace_id == origin.trace_id

    exporter.clear()
    rt2 = Runtime(store=store, shutdown_grace=0.1)
    bgtasks.otel.instrument(rt2, tracer_provider=provider)
    async with rt2:  # replays the journal as it starts
        with anyio.fail_after(5):
            while rt2.stats()["running"] == 0:
                await asyncio.sleep(0.01)
    (replayed,) = spans(exporter, name)
    assert replayed.parent is None  # a new trace ...
    assert replayed.context is not None and replayed.context.trace_id != origin.trace_id
    (link,) = replayed.links  # ... linked to the submitter's span
    assert (link.context.trace_id, link.context.span_id) == (origin.trace_id, origin.span_id)
    assert attrs(replayed)["bgtasks.replayed"] is True
    assert attrs(replayed)["bgtasks.attempt"] == 2
    assert attrs(replayed)["messaging.message.id"] == handle.id


def test_importing_bgtasks_imports_neither_opentelemetry_nor_prometheus() -> None:
    import subprocess
    import sys

    code = (
        "import sys, bgtasks, bgtasks.asgi, bgtasks.wsgi, bgtasks.flask\n"
        "bad = [m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus_client'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_flask_view_and_its_background_task_share_a_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from flask import Flask

    from bgtasks.flask import BgTasks

    tracer = provider.get_tracer("test")
    rt = Runtime()
    bgtasks.otel.instrument(rt, tracer_provider=provider)
    app = Flask("t")
    BgTasks(app, runtime=rt)
    seen: list[int] = []

    def audit(n: int) -> None:  # a sync task, on a worker thread
        seen.append(trace.get_current_span().get_span_context().span_id)

    @app.post("/orders")
    def create_order() -> dict[str, str]:
        with tracer.start_as_current_span("POST /orders"):  # stands for flask instrumentation
            handle = bgtasks.wait_until(audit, 7, name="audit")
        return {"id": handle.id}

    try:
        task_id = app.test_client().post("/orders").get_json()["id"]
        handle = rt.handle(task_id)
        assert handle is not None
        assert handle.wait_sync(5).status == "succeeded"
    finally:
        assert app.extensions["bgtasks"].middleware.stop(10)
    (request,) = spans(exporter, "POST /orders")
    (task,) = spans(exporter, "process audit")
    assert request.context is not None and task.parent is not None
    assert task.parent.span_id == request.context.span_id
    assert task.context is not None and seen == [task.context.span_id]


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("bgtasks.otel", "opentelemetry", "otel"),
        ("bgtasks.prometheus", "prometheus_client", "prometheus"),
    ],
)
def test_a_missing_extra_names_the_install_command(module: str, blocked: str, extra: str) -> None:
    import subprocess
    import sys

    code = f"import sys; sys.modules[{blocked!r}] = None; import {module}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"pip install 'bgtasks[{extra}]'" in proc.stderr


async def test_each_step_is_a_child_span_of_its_attempt(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with Runtime(backoff=bgtasks.Backoff(0, 0, 0)) as rt:
        bgtasks.otel.instrument(rt, tracer_provider=provider)
        failures: list[int] = []

        def flaky() -> str:
            if not failures:
                failures.append(1)
                raise ConnectionError("once")
            return "ok"

        async def job() -> None:
            await bgtasks.step.run("fetch", asyncio.sleep, 0)
            await asyncio.gather(
                bgtasks.step.run("a", asyncio.sleep, 0), bgtasks.step.run("b", flaky, retries=1)
            )
            await bgtasks.step.run("fetch", asyncio.sleep, 0)  # fetch#2

        await rt.wait_until(job(), name="stepped").wait(5)
        await rt.drain(5)
    (attempt,) = spans(exporter, "process stepped")
    assert attempt.context is not None
    names = ["step fetch", "step a", "step b", "step fetch#2"]
    for name in names:
        (span,) = spans(exporter, name)
        assert span.parent is not None and span.parent.span_id == attempt.context.span_id
        assert span.kind is SpanKind.INTERNAL
        assert attrs(span)["bgtasks.step"] == name.removeprefix("step ")
    (b,) = spans(exporter, "step b")
    assert attrs(b)["bgtasks.step.attempts"] == 2
    assert b.status.status_code is StatusCode.UNSET
