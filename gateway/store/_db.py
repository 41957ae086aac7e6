"""The SQLite state database: one connection, owned by one worker thread, migrated on open.

Every SQL statement runs on that thread. The event loop only awaits results, so it never stalls
on the fsync that ``synchronous=FULL`` performs at each commit, and SQLite's one-writer rule is
met without locks in Python. Each write is its own autocommitted statement, durable when the
awaited call returns, unless :meth:`Database.transact` groups several into one transaction.
The purpose stores (``_auth``, ``_events``, ``_mailboxes``) share one :class:`Database`.

Timestamps are stored as ISO-8601 UTC text of fixed width (``2024-05-01T09:30:00.000000Z``):
fixed width makes text order equal time order, so comparisons and the ``events.at`` index work
on a plain TEXT column in SQLite and PostgreSQL alike; it reads directly in ``sqlite3`` and
``psql``; and unlike integer epochs it cannot overflow a 32-bit PostgreSQL INTEGER column or be
confused between seconds and milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeVar

from ._crypto import StoreError
from ._migrations import migrate, transaction
from ._sql import Row

DB_FILE_NAME = "gateway.db"
BUSY_TIMEOUT_SECONDS = 5.0
_MIN_SQLITE = (3, 24, 0)  # INSERT ... ON CONFLICT DO UPDATE
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

_T = TypeVar("_T")

# (prefixes of SQLite's error name, what the operator should check)
_ERROR_HINTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("SQLITE_BUSY", "SQLITE_LOCKED"),
        "another process holds it; is a second gateway using the same state directory?",
    ),
    (
        ("SQLITE_CORRUPT", "SQLITE_NOTADB"),
        "it is damaged or not a gateway database; restore a backup or move it aside",
    ),
    (
        ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH"),
        "check that the file and its directory are writable by this user",
    ),
    (("SQLITE_FULL",), "the disk is full"),
    (("SQLITE_IOERR",), "the disk reported an I/O error"),
)


class Database:
    """Async access to the state database; create with :meth:`open`, end with :meth:`close`.

    A call whose caller is cancelled still runs to completion on the worker thread: a write
    may be applied even though the awaiting task never saw it return.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        schema_version: int,
    ) -> None:
        self._path = path
        self._conn = conn
        self._executor = executor
        self._schema_version = schema_version
        self._closed = False

    @classmethod
    async def open(cls, state_dir: Path) -> Self:
        """Open (or create) ``<state_dir>/gateway.db`` and migrate it to the current schema."""
        path = state_dir / DB_FILE_NAME
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-store")
        loop = asyncio.get_running_loop()
        try:
            conn, version = await loop.run_in_executor(executor, _open_database, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, conn, executor, version)

    async def close(self) -> None:
        """Close the database after queued calls finish; later calls are no-ops."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=False)  # the queue is empty: the close ran last

    @property
    def schema_version(self) -> int:
        """The schema version the database was migrated to when opened."""
        return self._schema_version

    async def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        """One autocommitted statement."""
        await self.run(lambda conn: conn.execute(sql, params))

    async def fetch_one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
        return await self.run(lambda conn: conn.execute(sql, params).fetchone())

    async def fetch_all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return await self.run(lambda conn: conn.execute(sql, params).fetchall())

    async def transact(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *job* in one write transaction: all of its statements apply, or none."""

        def in_transaction(conn: sqlite3.Connection) -> _T:
            with transaction(conn):
                return job(conn)

        return await self.run(in_transaction)

    async def run(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *job* on the worker thread, translating SQLite errors into StoreError."""
        if self._closed:
            raise StoreError("the state store is already closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, job)

    def _guarded(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            return job(self._conn)
        except sqlite3.Error as exc:
            raise _explain(self._path, exc) from exc


def now_text() -> str:
    """The current time in the stored timestamp format."""
    return datetime.now(UTC).strftime(_TIME_FORMAT)


def time_text(moment: datetime | None) -> str | None:
    """*moment* in the stored timestamp format (UTC, fixed width); None stays None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(text: str | None) -> datetime | None:
    """A stored timestamp back as a timezone-aware datetime; None stays None."""
    return None if text is None else datetime.fromisoformat(text)


def epoch_text(seconds: float) -> str:
    """Wall-clock seconds (``time.time()``, an injectable clock's reading) as stored."""
    return datetime.fromtimestamp(seconds, UTC).strftime(_TIME_FORMAT)


def text_epoch(text: str) -> float:
    """A stored timestamp back as wall-clock seconds."""
    return datetime.fromisoformat(text).timestamp()


def _open_database(path: Path) -> tuple[sqlite3.Connection, int]:
    """Worker-thread half of :meth:`Database.open`: connect, configure, migrate."""
    if sqlite3.sqlite_version_info < _MIN_SQLITE:
        raise StoreError(
            f"SQLite {sqlite3.sqlite_version} is too old; the gateway needs 3.24 or newer"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Create the file owner-only before SQLite opens it: it will hold tokens (encrypted) and mail.
    # SQLite gives the -wal and -shm files the same mode as the database.
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    except sqlite3.Error as exc:
        raise _explain(path, exc) from exc
    try:
        _configure(conn, path)
        return conn, migrate(conn)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise _explain(path, exc) from exc
        raise


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    """WAL lets readers run during a write; FULL fsyncs each commit (the spool relies on it)."""
    (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if str(mode).lower() != "wal":
        raise StoreError(
            f"{path} cannot use write-ahead logging (SQLite kept journal mode {mode!r}); "
            "put the state directory on a local filesystem"
        )
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")


def _explain(path: Path, exc: sqlite3.Error) -> StoreError:
    """Turn a SQLite error into a sentence naming the file and what to check."""
    code = exc.sqlite_errorname or ""
    for prefixes, hint in _ERROR_HINTS:
        if code.startswith(prefixes):
            return StoreError(f"cannot use the state database {path}: {exc}; {hint}")
    return StoreError(f"cannot use the state database {path}: {exc}")
