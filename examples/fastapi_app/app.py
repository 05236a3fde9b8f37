"""A small FastAPI app whose slow work runs in the background with bgtasks.

    bash scripts/example.sh                       # from the repository root: sets up and serves
    uvicorn examples.fastapi_app.app:app          # the same, with bgtasks[fastapi] installed
    python -m examples.fastapi_app                # the same, on port 8000

Routes (interactive docs at http://127.0.0.1:8000/docs):

- ``POST /reports``  builds a report with progress: 202 + ``Location``.
- ``POST /emails``   sends an email through a flaky provider, retried twice.
- ``POST /primes``   counts primes under a CPU-time limit of 2 s.
- ``POST /orders``   an ordinary endpoint: answers 201 at once and writes its
  audit-log entry with ``wait_until`` after the response.
- ``GET /_bgtasks/tasks/{id}``  reads a task (``DELETE`` cancels it).
- ``GET /metrics``   Prometheus metrics of the tasks (with ``bgtasks[prometheus]``).
"""

from __future__ import annotations

import os

# The embedded default: one SQLite file, created in the current directory,
# holds every task, so a 202 survives a crash and any worker (uvicorn
# --workers 4) answers any status URL. BGTASKS_STORE=memory keeps everything
# in memory instead.
STORE = os.environ.get("BGTASKS_STORE", "sqlite:///bgtasks-example.db")

import asyncio  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from typing import Annotated  # noqa: E402

from fastapi import Depends, FastAPI, Header, Response  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

import bgtasks  # noqa: E402
from bgtasks.asgi import BackgroundMiddleware  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
log = logging.getLogger("example")

runtime = bgtasks.Runtime(
    store=STORE,
    shutdown_grace=20.0,  # under uvicorn's and Kubernetes' own grace
    limits=bgtasks.Limits(wall_clock=300),  # nothing runs longer than 5 minutes
)
app = FastAPI(title="bgtasks example")
app.add_middleware(BackgroundMiddleware, runtime=runtime)


# ---------------------------------------------------------------------- metrics
try:
    import prometheus_client
    from prometheus_client import multiprocess

    import bgtasks.prometheus
except ImportError:  # pip install 'bgtasks[prometheus]' for /metrics
    log.info("example: prometheus-client is not installed; no /metrics")
else:
    bgtasks.prometheus.instrument(runtime)  # before the runtime starts

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics; every worker's with PROMETHEUS_MULTIPROC_DIR set."""
        registry = prometheus_client.REGISTRY
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # see docs/observability.md
            registry = prometheus_client.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        data = prometheus_client.generate_latest(registry)
        return Response(data, media_type=prometheus_client.CONTENT_TYPE_LATEST)


@runtime.on("beforeunload")
def unloading(event: bgtasks.BeforeUnloadEvent) -> None:
    task = f" for task {event.task.id}" if event.task else ""
    log.warning("example: beforeunload (%s)%s", event.reason, task)


@runtime.on("unhandledrejection")
def failed(event: bgtasks.UnhandledRejectionEvent) -> None:
    # Send it to your error tracker here; the default logs the traceback too.
    log.error("example: task %s (%s) failed: %r", event.task.id, event.task.name, event.error)


# ---------------------------------------------------------------------- a "database"
class Database:
    """Stands for a connection pool: each task opens its own session."""

    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []
        self.ids = itertools.count(1)

    def insert(self, table: str, **values: object) -> int:
        row_id = next(self.ids)
        self.rows.append({"table": table, "id": row_id, **values})
        return row_id


db = Database()


def current_user(x_user: Annotated[str, Header()] = "ada") -> str:
    """Who is calling: a real app reads a session or a token."""
    return x_user


# ---------------------------------------------------------------------- reports
class ReportRequest(BaseModel):
    org_id: int = Field(gt=0)
    year: int = Field(ge=2000, le=2100)
    sections: int = Field(default=5, ge=1, le=50)


@app.post("/reports", status_code=202)
@bgtasks.background(name="build_report")
async def build_report(
    body: ReportRequest, user: Annotated[str, Depends(current_user)]
) -> dict[str, object]:
    """Build a yearly report, one section at a time, reporting progress."""
    task = bgtasks.current_task()
    assert task is not None
    for section in range(body.sections):
        await asyncio.sleep(0.2)  # querying, rendering...
        task.report_progress(section + 1, body.sections, f"section {section + 1} done")
    url = f"/files/report-{body.org_id}-{body.year}.pdf"
    db.insert("reports", org_id=body.org_id, year=body.year, by=user, url=url)
    return {"url": url, "sections": body.sections}


# ---------------------------------------------------------------------- emails
class Email(BaseModel):
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    subject: str = Field(max_length=200)


class ProviderDown(Exception):
    pass


@app.post("/emails", status_code=202)
@bgtasks.background(name="send_email", retries=2, durable=True)
async def send_email(email: Email) -> str:
    """Send through a flaky provider; a failed attempt is retried (twice at most).

    ``durable=True``: the email is journaled in the SQLite file before the 202
    goes out, and sent by the next start if this process dies first.

    The fake provider always fails the first attempt for ``@flaky.example``
    addresses, and one call in ten otherwise.
    """
    task = bgtasks.current_task()
    first = task is not None and task.attempt == 1
    await asyncio.sleep(0.05)
    if (first and email.to.endswith("@flaky.example")) or random.random() < 0.1:
        raise ProviderDown("the email provider answered 503")
    return f"sent {email.subject!r} to {email.to}"


# ---------------------------------------------------------------------- CPU-bound work
@app.post("/primes", status_code=202)
@bgtasks.background(name="count_primes", limits=bgtasks.Limits(cpu_time=2.0))
def count_primes(below: int = 200_000) -> int:
    """A sync function: it runs in a worker thread, stopped after 2 CPU seconds.

    ``below=200000`` finishes; ``below=50000000`` fails with CPULimitExceeded.
    """
    sieve = bytearray([1]) * below
    sieve[:2] = b"\x00\x00"
    for i in range(2, int(below**0.5) + 1):
        if sieve[i]:
            for j in range(i * i, below, i):  # plain Python: no await, no I/O
                sieve[j] = 0
    return sum(sieve)


# ---------------------------------------------------------------------- wait_until
class Order(BaseModel):
    item: str
    quantity: int = Field(gt=0)


async def write_audit_log(action: str, user: str, order_id: int) -> None:
    await asyncio.sleep(0.05)  # a slow audit service
    db.insert("audit", action=action, user=user, order_id=order_id, at=time.time())


@app.post("/orders", status_code=201)
async def create_order(
    order: Order, user: Annotated[str, Depends(current_user)]
) -> dict[str, object]:
    order_id = db.insert("orders", item=order.item, quantity=order.quantity, by=user)
    # The client does not wait for the audit log; the task is still tracked,
    # bounded by the runtime's limits and drained on shutdown.
    audit = bgtasks.wait_until(write_audit_log("order.created", user, order_id))
    return {"id": order_id, "audit_task": audit.id}


@app.get("/")
async def index() -> dict[str, object]:
    return {"docs": "/docs", "tasks": runtime.stats(), "store": STORE}
