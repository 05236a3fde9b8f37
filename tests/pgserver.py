"""A real PostgreSQL server for tests: initdb in a temporary directory, started on
127.0.0.1 on a free port, stopped and removed at the end.

PostgreSQL refuses to run as root, so when the tests run as root the cluster is
owned by a system user (``bgtasks-pg``, created if missing) and its commands run
through ``runuser``. ``fsync=off``: the data is thrown away anyway.

Tests that need it use the ``pg_server`` (session) or ``pg_url`` (a fresh
database per test) fixtures from conftest; they are skipped, saying why, only
where no PostgreSQL binaries exist (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PgServer", "find_bin_dir"]

PG_USER = "bgtasks-pg"


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None if there is none."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        path = Path(candidate)
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ensure_user() -> None:
    probe = subprocess.run(["id", "-u", PG_USER], capture_output=True, check=False)
    if probe.returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )


class PgServer:
    """``with PgServer() as pg: psycopg.connect(pg.url)``."""

    def __init__(self, *, bin_dir: Path | None = None, startup_timeout: float = 30.0) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            msg = "no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql"
            raise FileNotFoundError(msg)
        self.bin_dir = found
        self.startup_timeout = startup_timeout
        self.port = 0
        self.root: Path | None = None
        self.running = False

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    # ------------------------------------------------------------------ commands
    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            log = self._log_tail()
            msg = (
                f"{' '.join(argv[:2])} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{log}"
            )
            raise RuntimeError(msg)
        return result

    def _log_tail(self) -> str:
        if self.root is None:
            return ""
        log = self.root / "server.log"
        with contextlib.suppress(OSError):
            return "server log:\n" + log.read_text()[-3000:]
        return ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PgServer:
        self.root = Path(tempfile.mkdtemp(prefix="bgtasks-pg-"))
        if os.geteuid() == 0:
            _ensure_user()
            shutil.chown(self.root, user=PG_USER, group=None)
        self._run(
            [
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            timeout=120,
        )
        self.port = _free_port()
        self.resume()
        return self

    def resume(self) -> None:
        """Start (again) the server on its port."""
        options = (
            f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            [
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.root / "server.log") if self.root else "",
                "-o",
                options,
                "-w",
                "-t",
                str(int(self.startup_timeout)),
                "start",
            ],
            timeout=self.startup_timeout + 10,
        )
        self.running = True

    def pause(self) -> None:
        """Stop the server (fast: connections are closed), keeping its data."""
        if self.running:
            self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"], timeout=60)
            self.running = False

    def stop(self) -> None:
        try:
            if self.running:
                self._run(
                    ["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"], timeout=60
                )
                self.running = False
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return self.url(name)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
