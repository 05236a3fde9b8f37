"""The store's own event loop, in a thread: every database call runs there.

Neither the runtime's loop nor a WSGI thread then waits on a socket it does
not own, and ``submit``/``call`` work from any thread but this one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..._errors import StoreError

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str, wrap_error: Callable[[BaseException], BaseException]) -> None:
        self.name = name
        self._wrap = wrap_error
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                # Whatever is left ends here, not half-way through a later call.
                left = asyncio.all_tasks(loop)
                for task in left:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(10)
        self.loop = loop

    def stop(self) -> None:
        loop, thread = self.loop, self._thread
        self.loop = None
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)

    @property
    def here(self) -> bool:
        return self._thread is threading.current_thread()

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closing
                loop.call_soon_threadsafe(fn, *args)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        loop = self.loop
        if loop is None:
            coro.close()
            fut: concurrent.futures.Future[T] = concurrent.futures.Future()
            fut.set_exception(StoreError(f"the store ({self.name}) is not open"))
            return fut
        return asyncio.run_coroutine_threadsafe(self.guard(coro), loop)

    async def guard(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro``; what the driver raises comes out as a StoreError."""
        try:
            return await coro
        except StoreError:
            raise
        except Exception as exc:
            wrapped = self._wrap(exc)
            if wrapped is exc:
                raise
            raise wrapped from exc

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` there and wait for it (never from that thread)."""
        if self.here:
            coro.close()
            msg = "a blocking store call was made from the store's own loop"
            raise RuntimeError(msg)
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            msg = f"the database did not answer within {timeout:g}s"
            raise StoreError(msg) from None
