"""A private PostgreSQL server for tests and benchmarks: initdb in a temporary directory, 127.0.0.1.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<major>/bin``); the
system cluster is never used. PostgreSQL refuses to run as root, so when the tests run as root the
data directory is given to the ``postgres`` user and the server runs as that user (``runuser``).
Logins use SCRAM with a password over TCP on 127.0.0.1 only, like a production server, so the
gateway's ``store.url`` handling (password in the URL, masking in messages) is exercised for real.
Each caller gets its own database from :meth:`PostgresServer.new_database`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

USER = "gateway"
PASSWORD = "pg-test-secret-7Qx"  # noqa: S105 - a private throwaway server on 127.0.0.1
INSTALL_HINT = "install Debian's postgresql package (scripts/install-test-deps.sh does)"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's binary directory, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
    found = [p for p in found if p.parts[-3].isdigit()]
    return max(found, key=lambda p: int(p.parts[-3])).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """``with PostgresServer() as pg: url = pg.new_database()``; stopped and removed at exit."""

    def __init__(self) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError(f"PostgreSQL is not installed: {INSTALL_HINT}")
        self.bin = binaries
        self.root = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._names = itertools.count(1)
        self._as_postgres = os.geteuid() == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)

    def start(self) -> Self:
        self.root.chmod(0o755)
        password_file = self.root / "pw"
        password_file.write_text(PASSWORD + "\n")
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(password_file, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c max_connections=200 -c fsync=on -c synchronous_commit=on"
        )
        log = self.root / "server.log"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-o", options,
            "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (fast shutdown); its data stays until :meth:`remove`."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop",
                  check=False)  # fmt: skip

    def restart_after(self) -> None:
        """Start again after :meth:`stop`, same port, data and settings (an outage that ends)."""
        self._pg_ctl_start()

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"gw{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        done = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", database, "-c", sql],
            check=True, capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        return done.stdout

    def log_text(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.remove()
