"""An instrumented FastAPI app for the observability tests: ``observed_apps:app``.

Traces go to an in-memory exporter that ``GET /spans`` reads back; a tiny
ASGI middleware gives each request a SERVER span, continuing the caller's
``traceparent`` as any tracing middleware would. ``GET /metrics`` serves
Prometheus metrics, from every worker when ``PROMETHEUS_MULTIPROC_DIR`` is set.
``BGTASKS_MAX_PENDING`` bounds the runtime (default 100).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import prometheus_client
from fastapi import FastAPI, Response
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import multiprocess

import bgtasks
import bgtasks.otel
import bgtasks.prometheus
from bgtasks.asgi import BackgroundMiddleware

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("observed_apps")

rt = bgtasks.Runtime(
    max_pending=int(os.environ.get("BGTASKS_MAX_PENDING", "100")),
    backoff=bgtasks.Backoff(initial=0, max=0, jitter=0),
)
bgtasks.otel.instrument(rt, tracer_provider=provider)
bgtasks.prometheus.instrument(rt)


class RequestSpans:
    """One SERVER span per HTTP request, child of the caller's ``traceparent``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = propagate.extract(headers)
        name = f"{scope['method']} {scope['path']}"
        with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER):
            await self.app(scope, receive, send)


app = FastAPI()
app.add_middleware(BackgroundMiddleware, runtime=rt)
app.add_middleware(RequestSpans)  # outermost: the request's span is current inside

release = asyncio.Event()
attempts: dict[str, int] = {}


@bgtasks.background(name="ok")
async def ok() -> str:
    return "ok"


@bgtasks.background(name="fails")
async def fails() -> None:
    raise ValueError("fails")


@bgtasks.background(name="flaky", retries=2)
def flaky(key: str) -> str:  # sync: runs in a worker thread
    attempts[key] = attempts.get(key, 0) + 1
    if attempts[key] < 3:
        raise ValueError(f"attempt {attempts[key]} fails")
    return "ok"


@bgtasks.background(name="slow", limits=bgtasks.Limits(wall_clock=0.05))
async def slow() -> None:
    await asyncio.sleep(30)


@bgtasks.background(name="held")
async def held() -> None:
    await release.wait()


@app.post("/submit/{kind}")
async def submit(kind: str, key: str = "") -> dict[str, Any]:
    handle = flaky(key) if kind == "flaky" else {"ok": ok, "fails": fails, "slow": slow}[kind]()
    return {"id": handle.id, "pid": os.getpid()}


@app.post("/hold")
async def hold() -> dict[str, Any]:
    release.clear()
    return {"id": held().id, "pid": os.getpid()}


@app.post("/release")
async def do_release() -> None:
    release.set()


@app.get("/idle")
async def idle() -> dict[str, bool]:
    return {"idle": await rt.drain(5)}


@app.get("/spans")
async def spans() -> list[dict[str, Any]]:
    out = []
    for s in exporter.get_finished_spans():
        assert s.context is not None
        out.append(
            {
                "name": s.name,
                "kind": s.kind.name,
                "trace_id": f"{s.context.trace_id:032x}",
                "span_id": f"{s.context.span_id:016x}",
                "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
                "links": [f"{link.context.span_id:016x}" for link in s.links],
                "attributes": dict(s.attributes or {}),
                "status": s.status.status_code.name,
            }
        )
    return out


@app.get("/metrics")
def metrics() -> Response:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        # Every worker's counts, from the files they write: a fresh registry per scrape.
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus_client.REGISTRY
    return Response(
        prometheus_client.generate_latest(registry),
        media_type=prometheus_client.CONTENT_TYPE_LATEST,
    )
