from __future__ import annotations

import pytest

import bgtasks
from bgtasks.testing import NO_BACKOFF, Rejections, running

pytestmark = pytest.mark.anyio


async def test_running_drains_and_rejections_collects() -> None:
    calls = 0

    @bgtasks.background(retries=2)
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("nope")

    async with running(backoff=NO_BACKOFF) as rt:
        rejections = Rejections(rt)
        handle = flaky.submit()
    assert handle.status == "failed"
    assert calls == 3
    assert [type(e) for e in rejections.errors] == [ValueError]


async def test_running_fails_on_hung_task() -> None:
    import anyio

    with pytest.raises(TimeoutError, match="unfinished"):
        async with running(drain_timeout=0.05, shutdown_grace=0) as rt:
            rt.wait_until(anyio.sleep(30))
