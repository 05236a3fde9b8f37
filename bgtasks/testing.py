"""Helpers for testing code that uses bgtasks.

::

    from bgtasks.testing import running, Rejections, NO_BACKOFF

    async def test_signup_sends_email():
        async with running(backoff=NO_BACKOFF) as rt:
            rejections = Rejections(rt)
            handle = send_welcome.submit("a@example.com")
            record = await handle.wait(5)
        assert record.status == "succeeded"
        assert rejections.errors == []

The decorated function's original is ``fn.__wrapped__``: call it inline to
test the work itself without the runtime.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ._hooks import UnhandledRejectionEvent
from ._runtime import Backoff, Runtime

__all__ = ["NO_BACKOFF", "Rejections", "running"]

#: Retries without waiting: ``Runtime(backoff=NO_BACKOFF)``.
NO_BACKOFF = Backoff(initial=0.0, max=0.0, jitter=0.0)


@contextlib.asynccontextmanager
async def running(
    runtime: Runtime | None = None, *, drain_timeout: float = 10.0, **options: Any
) -> AsyncIterator[Runtime]:
    """A started runtime, active in the current context; drained on exit.

    ``options`` are passed to ``Runtime(...)`` when ``runtime`` is None.
    Raises ``TimeoutError`` if tasks are still unfinished after
    ``drain_timeout`` seconds, so a hung task fails the test instead of
    hanging it.
    """
    rt = runtime if runtime is not None else Runtime(**options)
    async with rt:
        yield rt
        if not await rt.drain(drain_timeout):
            msg = f"tasks still unfinished after {drain_timeout}s: {rt.stats()}"
            raise TimeoutError(msg)


class Rejections:
    """Collects ``unhandledrejection`` events of a runtime and keeps them out of the log."""

    def __init__(self, runtime: Runtime) -> None:
        self.events: list[UnhandledRejectionEvent] = []
        runtime.on("unhandledrejection", self._collect)

    def _collect(self, event: UnhandledRejectionEvent) -> None:
        event.prevent_default()
        self.events.append(event)

    @property
    def errors(self) -> list[BaseException]:
        return [event.error for event in self.events]
