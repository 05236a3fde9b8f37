"""A pytest plugin that installs bgtasks in every Flask and FastAPI/Starlette app.

Loaded with ``-p bgtasks_adoption`` (this directory on ``PYTHONPATH``) into a
third-party test suite. With ``BGTASKS_ADOPT=1``, every ``Flask(...)`` gets
``BgTasks(app)`` and every ``FastAPI(...)``/``Starlette(...)`` gets
``app.add_middleware(BackgroundMiddleware)`` as its constructor returns, the
one line a user adds. Without it, the plugin only counts apps, so both runs
load the same code. The count is written to ``BGTASKS_ADOPT_REPORT``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

ADOPT = os.environ.get("BGTASKS_ADOPT") == "1"
_count = {"flask": 0, "asgi": 0}


def _patch(cls: Any, install: Any, kind: str) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if getattr(self, "_bgtasks_adopted", False):
            return
        self._bgtasks_adopted = True
        _count[kind] += 1
        if ADOPT:
            install(self)

    cls.__init__ = __init__


def _install_flask(app: Any) -> None:
    from bgtasks.flask import BgTasks

    BgTasks(app)


def _install_asgi(app: Any) -> None:
    from bgtasks.asgi import BackgroundMiddleware

    app.add_middleware(BackgroundMiddleware)


def pytest_configure(config: Any) -> None:
    try:
        import flask
    except ImportError:
        pass
    else:
        _patch(flask.Flask, _install_flask, "flask")
    try:
        import starlette.applications
    except ImportError:
        pass
    else:
        # FastAPI's __init__ does not call Starlette's: each is patched.
        _patch(starlette.applications.Starlette, _install_asgi, "asgi")
        try:
            import fastapi
        except ImportError:
            pass
        else:
            _patch(fastapi.FastAPI, _install_asgi, "asgi")


def pytest_unconfigure(config: Any) -> None:
    report = os.environ.get("BGTASKS_ADOPT_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as f:
            f.write(f"flask_apps={_count['flask']} asgi_apps={_count['asgi']}\n")
