"""A Flask app with background work: run it with ``flask`` or gunicorn.

    flask --app examples.flask_app.app run                   # from the repository root
    gunicorn -k gthread --threads 4 -w 2 --graceful-timeout 30 examples.flask_app.app:app

Then (port 5000 for ``flask run``, 8000 for gunicorn):

    curl -i -X POST localhost:5000/reports -H 'content-type: application/json' -d '{"rows": 5}'
    curl localhost:5000/_bgtasks/tasks/<id>          # the Location of the 202
    curl -X POST localhost:5000/signup -d email=ada@example.com
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Flask, g, request, url_for

import bgtasks
from bgtasks.flask import BgTasks

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(message)s")
log = logging.getLogger("example")

app = Flask(__name__)
app.config.update(
    # One SQLite file holds every task, so any gunicorn worker (-w 2) answers
    # any status URL. BGTASKS_STORE=memory keeps them in each worker's memory.
    BGTASKS_STORE=os.environ.get("BGTASKS_STORE", "sqlite:///bgtasks-flask-example.db"),
    # Below gunicorn's graceful_timeout (30 s by default): the drain must end
    # before gunicorn kills the worker.
    BGTASKS_SHUTDOWN_GRACE=20.0,
    BGTASKS_MAX_PENDING=1_000,
)
tasks = BgTasks(app)


@app.before_request
def identify() -> None:
    g.user = request.headers.get("X-User", "anonymous")


@app.get("/")
def index() -> dict[str, str]:
    return {
        "POST /reports": "build a report in the background (JSON {'rows': n}); answers 202",
        "POST /signup": "sign up (form field email); the welcome email goes out in the background",
    }


@app.post("/reports")
@bgtasks.background(retries=1)
def build_report() -> dict[str, Any]:
    """Answers 202 at once; this body runs afterwards in a worker thread."""
    rows = int((request.get_json(silent=True) or {}).get("rows", 3))
    task = bgtasks.current_task()
    for done in range(rows):
        time.sleep(0.5)  # the slow part
        if task is not None:
            task.report_progress(done + 1, rows, f"row {done + 1} of {rows}")
    return {
        "rows": rows,
        "requested_by": g.user,
        "download": url_for("download", name=f"report-{rows}.csv"),
    }


@app.get("/downloads/<name>")
def download(name: str) -> str:
    return f"(the contents of {name})\n"


@bgtasks.background
def send_welcome_email(address: str) -> str:
    time.sleep(1.0)  # talk to the mail server
    log.info("welcome email sent to %s (signed up from %s)", address, request.remote_addr)
    return address


@app.post("/signup")
def signup() -> tuple[dict[str, str], int]:
    address = request.form.get("email", "someone@example.com")
    handle = send_welcome_email(address)  # not the endpoint: a TaskHandle
    status_url = url_for("bgtasks.task_status", task_id=handle.id)
    return {"welcome_email": status_url}, 201


@tasks.runtime_for(app).on("beforeunload")
def draining(event: bgtasks.BeforeUnloadEvent) -> None:
    if event.task is None:
        log.info("worker stopping (%s): finishing background work", event.reason)
