"""Durable steps: ``await step.run(name, fn, *args)``, ``await step.sleep(name, seconds)``.

Inside a task, a step is retried on its own and its result is kept, so running
the task again (a task-level retry, a replay after a crash, a resume after a
sleep) skips the steps that already succeeded. See docs/steps.md.
"""

from __future__ import annotations

from ._steps import run, sleep, sleep_until

__all__ = ["run", "sleep", "sleep_until"]
