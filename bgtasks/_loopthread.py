"""The event-loop thread that hosts a Runtime inside a WSGI worker process.

A WSGI server has no event loop and no lifespan, so each worker process gets
a daemon thread running ``asyncio.run``: it starts the runtime, waits for a
stop signal, then shuts the runtime down gracefully (``beforeunload``, up to
``shutdown_grace``, cancel the rest).

Start: lazily, by the first work a process schedules (``Runtime.autostart``).
The thread is tied to the pid that started it, so a fork (``gunicorn
--preload``, a pre-fork server) makes the child start its own.

Stop early: an adapter that owns its runtime ends it when its app is dropped
(``release``, from ``weakref.finalize``): the runtime drains, the thread ends
and its loop's descriptors close, with no ``stop()`` call.

Stop: on every ordinary exit of the process, from a hook registered with
``threading._register_atexit``. Python runs those hooks when the main thread
finishes (``sys.exit``, ``KeyboardInterrupt``, the end of the script), before
it joins non-daemon threads and before ``atexit``. Gunicorn workers leave with
``sys.exit`` on every path (SIGTERM, SIGQUIT/SIGINT, ``max_requests``, a
reload), and so do Flask's and Werkzeug's development servers, so the drain
runs without installing a signal handler of our own. Running before
``concurrent.futures``' own hook (registered earlier, so run later) keeps
``run_in_executor`` usable while tasks drain. ``os._exit`` and SIGKILL skip
every hook: nothing can drain then (a durable store replays the work).

Under gunicorn the drain must also fit the master's two clocks. On a stop of
the master (SIGTERM), it kills workers still alive after ``graceful_timeout``:
the grace is shortened to fit. At every other time (a worker recycled by
``max_requests``, a HUP, fewer workers) it kills a worker whose heartbeat is
older than ``timeout``; a worker out of its run loop no longer beats by itself,
so the drain keeps the heartbeat going (``GunicornWorker.heartbeat``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401 - its exit hook must be registered before ours
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import _context

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["GunicornWorker", "LoopThread", "gunicorn_worker", "host_for", "server_graceful_timeout"]

logger = logging.getLogger("bgtasks")

#: Seconds kept between the end of the drain and the server's kill: cancelling,
#: unwinding threads and leaving the interpreter.
EXIT_MARGIN = 3.0
_START_TIMEOUT = 30.0

_hosts: weakref.WeakKeyDictionary[Runtime, LoopThread] = weakref.WeakKeyDictionary()
_hosts_lock = threading.Lock()
_all_hosts: weakref.WeakSet[LoopThread] = weakref.WeakSet()


def host_for(runtime: Runtime) -> LoopThread:
    """The one loop thread host of ``runtime`` (adapters that share it share this)."""
    with _hosts_lock:
        host = _hosts.get(runtime)
        if host is None:
            host = _hosts[runtime] = LoopThread(runtime)
        return host


class LoopThread:
    """Runs one Runtime on a daemon event-loop thread in the current process."""

    def __init__(self, runtime: Runtime) -> None:
        # Weak while idle: an app that is dropped before serving frees its runtime.
        # The running thread holds it strongly.
        self._runtime_ref = weakref.ref(runtime)
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process whose thread this is
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._started_in: int | None = None  # pid that started the runtime, ever
        self._server: GunicornWorker | None = None  # the gunicorn worker of this process
        _all_hosts.add(self)

    @property
    def runtime(self) -> Runtime:
        rt = self._runtime_ref()
        if rt is None:  # pragma: no cover - the adapter holds it
            msg = "the bgtasks Runtime of this loop thread was garbage-collected."
            raise RuntimeError(msg)
        return rt

    @property
    def running(self) -> bool:
        """True if this process's loop thread is alive."""
        t = self._thread
        return self._pid == os.getpid() and t is not None and t.is_alive()

    def ensure_started(self) -> Runtime:
        """The runtime, started on this process's loop thread (first call starts it)."""
        if self._pid == os.getpid():  # the hot path: one syscall and a compare
            if self._error is not None:
                raise self._error.with_traceback(None)
            return self.runtime
        with self._lock:
            if self._pid != os.getpid():
                self._start()
        if self._error is not None:
            raise self._error.with_traceback(None)
        return self.runtime

    def autostart(self) -> None:
        """``Runtime.autostart`` for the runtime hosted here: the first work scheduled
        on it starts it on this process's loop thread."""
        self.ensure_started()

    def _start(self) -> None:
        rt = self.runtime
        pid = os.getpid()
        if self._started_in == pid:  # this process's thread: nothing to start
            self._pid = pid
            self._error = None
            return
        # A new process: the parent's thread, loop and errors do not exist here.
        self._thread = self._loop = self._stop_event = None
        self._error = None
        if self._started_in is not None:
            self._pid = pid
            self._error = RuntimeError(
                f"this bgtasks Runtime was started in process {self._started_in} before "
                f"process {pid} was forked from it, and a Runtime cannot move across a fork. "
                "Let the adapter start it in each worker: do not serve requests or call "
                "wait_until in the parent (e.g. at import time under gunicorn --preload)."
            )
            return
        self._server = gunicorn_worker()
        _clamp_grace(rt, self._server)
        ready = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(rt, ready), name="bgtasks-loop", daemon=True
        )
        thread.start()
        if not ready.wait(_START_TIMEOUT):
            self._error = RuntimeError(
                f"the bgtasks runtime did not start within {_START_TIMEOUT:g}s; "
                "check the store (a locked SQLite file?) and the logs."
            )
        self._thread = thread
        self._pid = pid
        if self._error is None:
            self._started_in = pid
            _register_exit_hook_once()

    def _run(self, rt: Runtime, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(rt, ready))
        except BaseException as exc:  # never let the thread die silently
            if self._error is None and not ready.is_set():
                self._error = exc
            logger.exception("bgtasks: the event-loop thread stopped with an error")
        finally:
            ready.set()

    async def _main(self, rt: Runtime, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        _context.active_runtime.set(rt)
        try:
            await rt.start()
        except BaseException as exc:
            self._error = exc
            ready.set()
            return
        ready.set()
        try:
            await self._stop_event.wait()
        finally:
            try:
                await rt.shutdown()
            finally:
                # The runtime has ended: its idle worker threads need not wait out
                # their idle timeout (an app factory drops runtimes by the hundred).
                rt._threads.close()

    def release(self) -> None:
        """Ask the runtime to shut down gracefully, without waiting for it.

        For an app that is dropped (``weakref.finalize``): callable from any
        thread, the loop's own included, and from a garbage collection, so it
        takes no lock and joins nothing. The thread drains the runtime (up to
        ``shutdown_grace``), then ends and closes its loop and descriptors.
        """
        loop, event = self._loop, self._stop_event
        if self._pid != os.getpid() or loop is None or event is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(event.set)

    def stop(self, timeout: float | None = None) -> bool:
        """Shut the runtime down gracefully and join the thread.

        Callable from any thread but the loop's. Returns False if the thread
        was still running after ``timeout`` seconds (it is a daemon thread: it
        does not keep the process alive).
        """
        return self._stop(timeout, None)

    def _stop(self, timeout: float | None, server: GunicornWorker | None) -> bool:
        with self._lock:
            thread, loop, event = self._thread, self._loop, self._stop_event
            if self._pid != os.getpid() or thread is None:
                return True
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(event.set)
        if thread is threading.current_thread():
            msg = "LoopThread.stop() cannot be called from the loop thread itself."
            raise RuntimeError(msg)
        interval = None if server is None else server.heartbeat_interval
        if server is None or interval is None:
            thread.join(timeout)
            return not thread.is_alive()
        # Join in steps, beating between them, so the master sees a live worker.
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            server.heartbeat()
            step = interval
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    break
            thread.join(step)
            if not thread.is_alive():
                break
        return not thread.is_alive()

    def _at_exit(self) -> None:
        """The process is exiting: drain within the grace, then let it go."""
        if self._pid != os.getpid():  # inherited by a forked child that never started
            return
        try:
            grace = self.runtime.shutdown_grace
        except RuntimeError:  # pragma: no cover
            return
        try:
            if not self._stop(grace + EXIT_MARGIN, self._server):
                logger.warning(
                    "bgtasks: the runtime did not finish shutting down within %.1fs; "
                    "exiting anyway",
                    grace + EXIT_MARGIN,
                )
        finally:
            if self._server is not None:
                self._server.close()


def _after_fork_in_child() -> None:
    # A lock held by another thread at the moment of the fork stays held forever
    # in the child: give every host a fresh one.
    for host in list(_all_hosts):
        host._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_exit_hook_pid: int | None = None


def _register_exit_hook_once() -> None:
    """One exit hook per process drains every host started in it (not one per host:
    an app factory makes hosts by the hundred)."""
    global _exit_hook_pid
    with _hosts_lock:
        if _exit_hook_pid == os.getpid():
            return
        _exit_hook_pid = os.getpid()
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_drain_all_at_exit)
            return
        except RuntimeError:  # the interpreter is already shutting down
            pass
    import atexit

    atexit.register(_drain_all_at_exit)


def _drain_all_at_exit() -> None:
    hosts = [host for host in list(_all_hosts) if host.running]
    for host in hosts:  # every runtime drains at once, not one after the other
        host.release()
    for host in hosts:
        host._at_exit()


def _seconds(value: object) -> float | None:
    """A gunicorn timeout setting in seconds; None if unset, 0 or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(value)


class GunicornWorker:
    """The gunicorn worker object serving this process, as the drain needs it.

    ``graceful_timeout``: seconds the master gives workers once it is told to
    stop. ``timeout``: seconds the master lets a worker's heartbeat go stale
    (None: ``--timeout 0``, no check). ``heartbeat()`` refreshes it.
    """

    def __init__(self, worker: Any) -> None:
        cfg = getattr(worker, "cfg", None)
        self.graceful_timeout = _seconds(getattr(cfg, "graceful_timeout", None))
        self.timeout = _seconds(getattr(cfg, "timeout", None))
        self._worker = worker
        self._fd: int | None = None
        if self.timeout is not None:
            # Gunicorn closes the worker's heartbeat file (worker.tmp) as the
            # worker leaves, before the exit hooks run: keep a descriptor of our
            # own to the same file, so the drain can still beat.
            with contextlib.suppress(AttributeError, OSError, ValueError):
                self._fd = os.dup(worker.tmp.fileno())

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between beats while draining; None when none is needed or possible."""
        if self.timeout is None or self._fd is None:
            return None
        return min(1.0, self.timeout / 4)

    @property
    def drain_limit(self) -> float | None:
        """Seconds a drain may take before the master kills this worker (None: no limit)."""
        if self.timeout is not None and self.heartbeat_interval is None:
            # No heartbeat: the stale-heartbeat kill can come first.
            if self.graceful_timeout is None:
                return self.timeout
            return min(self.graceful_timeout, self.timeout)
        return self.graceful_timeout

    def stopping(self) -> bool:
        """True once gunicorn has told this worker to stop (its ``alive`` flag is down)."""
        return not getattr(self._worker, "alive", True)

    def close(self) -> None:
        """Let go of the heartbeat file (once the drain is over)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def heartbeat(self) -> None:
        """Tell the master this worker is alive (what its run loop does between requests)."""
        try:
            self._worker.notify()
        except Exception:  # its file is closed once the worker has left its run loop
            if self._fd is None:
                return
            # What gunicorn's WorkerTmp.notify does: the master reads the file's
            # mtime as a monotonic time (the change refreshes its ctime too, which
            # older gunicorns read).
            now = time.monotonic()
            with contextlib.suppress(OSError):
                os.utime(self._fd, (now, now))


def gunicorn_worker() -> GunicornWorker | None:
    """The gunicorn worker serving this process, or None outside gunicorn.

    Gunicorn does not publish its worker to the app; it is found on the main
    thread's stack (its ``run``/``handle_request`` frame).
    """
    base = sys.modules.get("gunicorn.workers.base")
    worker_cls = getattr(base, "Worker", None)
    if worker_cls is None:
        return None
    main = threading.main_thread().ident
    frame = sys._current_frames().get(main) if main is not None else None
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, worker_cls):
                return GunicornWorker(obj)
            frame = frame.f_back
    except Exception:  # pragma: no cover - introspection is best effort
        return None
    finally:
        del frame
    return None


def server_graceful_timeout() -> float | None:
    """Gunicorn's ``graceful_timeout`` when running in a gunicorn worker, else None."""
    server = gunicorn_worker()
    return None if server is None else server.graceful_timeout


def fitted_grace(grace: float, limit: float | None) -> float:
    """``grace`` shortened, if need be, so the drain ends ``EXIT_MARGIN`` before ``limit``."""
    if limit is None:
        return grace
    return min(grace, max(0.0, limit - EXIT_MARGIN))


def _clamp_grace(rt: Runtime, server: GunicornWorker | None) -> None:
    limit = None if server is None else server.drain_limit
    fitted = fitted_grace(rt.shutdown_grace, limit)
    if server is not None and fitted < rt.shutdown_grace:
        setting = "graceful_timeout" if limit == server.graceful_timeout else "timeout"
        logger.warning(
            "bgtasks: shutdown_grace=%gs does not fit in gunicorn's %s=%gs; "
            "this worker will drain for %gs so it exits before gunicorn kills it. Raise "
            "--%s or lower shutdown_grace (BGTASKS_SHUTDOWN_GRACE).",
            rt.shutdown_grace,
            setting,
            limit,
            fitted,
            setting.replace("_", "-"),
        )
        rt.shutdown_grace = fitted
