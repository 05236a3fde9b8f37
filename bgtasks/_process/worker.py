"""One worker process seen from the parent's event loop: its socket, its exit, its inbox.

The socket is non-blocking and driven by the loop's reader and writer
callbacks; each message read goes to ``inbox`` as (meta, blob), and None marks
the end of the channel. The process's sentinel tells when it exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from .wire import HEADER

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from .pool import ProcessPool

__all__ = ["Worker"]

_RETIRE_GRACE = 5.0  # seconds a retired worker has to exit before it is killed
_LARGE = 1 << 20  # a message body past this size is read into a buffer of its own


class Worker:
    """One worker process seen from the event loop: its socket, its exit, its inbox."""

    def __init__(
        self,
        pool: ProcessPool,
        loop: asyncio.AbstractEventLoop,
        proc: BaseProcess,
        sock: socket.socket,
    ) -> None:
        assert proc.pid is not None
        pool._started += 1
        self.pool = pool
        self.loop = loop
        self.proc = proc
        self.pid: int = proc.pid
        self.sentinel = proc.sentinel
        self.tasks = 0
        self.idle_since = 0.0
        self.busy = False
        self.exited: asyncio.Future[int | None] = loop.create_future()
        # (meta, blob) of each message from the worker; None once the channel closed
        self.inbox: asyncio.Queue[tuple[tuple[Any, ...], memoryview] | None] = asyncio.Queue()
        self._sock: socket.socket | None = sock
        self._fd = sock.fileno()
        self._in = bytearray()  # received bytes not yet parsed
        self._large: bytearray | None = None  # the body of a large message being read
        self._large_meta = 0
        self._got = 0
        self._out: deque[memoryview] = deque()  # pieces not yet written
        self._writing = False
        sock.setblocking(False)
        loop.add_reader(self._fd, self._on_readable)
        loop.add_reader(self.sentinel, self._on_exit)

    @property
    def alive(self) -> bool:
        return not self.exited.done() and self._sock is not None

    # -- the socket
    def send(self, parts: list[bytes]) -> None:
        """Queue a message (the pieces from ``wire.encode``) and write what fits now."""
        if self._sock is None:
            return  # the inbox already holds the end-of-channel marker
        self._out.extend(memoryview(part) for part in parts)
        if not self._writing:
            self._flush()
            if self._out and self._sock is not None:
                self._writing = True
                self.loop.add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        sock = self._sock
        out = self._out
        while out and sock is not None:
            part = out[0]
            try:
                sent = sock.send(part)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close_channel()
                return
            if sent < len(part):
                out[0] = part[sent:]
                return
            out.popleft()
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        large = self._large
        try:
            if large is not None:
                # A large message: read straight into its own buffer, no copies.
                got = sock.recv_into(memoryview(large)[self._got :])
            else:
                data = sock.recv(1 << 18)
                got = len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = 0
        if got == 0:
            self.close_channel()
            return
        if large is not None:
            self._got += got
            if self._got == len(large):
                self._large = None
                self._deliver(self._large_meta, large)
            return
        buf = self._in
        buf += data
        head = HEADER.size
        while len(buf) >= head:
            meta_size, blob_size = HEADER.unpack_from(buf)
            end = head + meta_size + blob_size
            if len(buf) >= end:
                body = buf[head:end]
                del buf[:end]
                self._deliver(meta_size, body)
                continue
            if end - head > _LARGE:
                large = bytearray(end - head)
                self._got = len(buf) - head
                large[: self._got] = memoryview(buf)[head:]
                self._large, self._large_meta = large, meta_size
                buf.clear()
            break

    def _deliver(self, meta_size: int, body: bytearray) -> None:
        view = memoryview(body)
        try:
            meta = pickle.loads(view[:meta_size])
        except Exception as exc:
            meta = ("corrupt", f"{type(exc).__name__}: {exc}")
        self.inbox.put_nowait((meta, view[meta_size:]))

    def close_channel(self) -> None:
        """Close our end (the worker then exits) and mark the end of its messages."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self.loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self._fd)
        self._out.clear()
        self._large = None
        sock.close()
        self.inbox.put_nowait(None)

    # -- the process
    def _on_exit(self) -> None:
        self.loop.remove_reader(self.sentinel)
        # The sentinel is ready, so the process has exited: join() returns at once.
        self.proc.join()
        code = self.proc.exitcode
        self.proc.close()
        self.exited.set_result(code)
        self.pool._forget(self)
        if not self.busy:
            self.close_channel()
        elif self._sock is not None:
            # What it wrote before dying is still in the socket: let the reader
            # drain it; the end of the channel normally follows at once.
            self.loop.call_later(0.5, self.close_channel)

    def signal(self, sig: int) -> None:
        if self.exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def retire(self) -> None:
        """Let the worker exit on its own; kill it if it has not after a grace period."""
        self.close_channel()
        if not self.exited.done():
            self.loop.call_later(_RETIRE_GRACE, self.signal, signal.SIGKILL)

    async def wait_exit(self, grace: float) -> int | None:
        """The exit code, killing the worker if it has not exited within ``grace`` seconds."""
        if not self.exited.done():
            done, _ = await asyncio.wait((self.exited,), timeout=grace)
            if not done:
                self.kill()
                await asyncio.wait((self.exited,), timeout=grace)
        return self.exited.result() if self.exited.done() else None

    def kill_now(self) -> None:
        """Last resort outside the event loop (interpreter exit)."""
        if not self.exited.done():
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
