"""The SQLite-backed state store: settings, encrypted secrets and the audit log.

Every SQL statement runs on one dedicated worker thread that owns the connection. The event
loop only awaits results, so it never stalls on the fsync that ``synchronous=FULL`` performs at
each commit, and SQLite's one-writer rule is met without locks in Python. Each write is its own
autocommitted statement, durable when the awaited call returns.

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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeVar

from ._crypto import SecretBox, StoreError
from ._migrations import migrate, transaction

DB_FILE_NAME = "gateway.db"
BUSY_TIMEOUT_SECONDS = 5.0
_MIN_SQLITE = (3, 24, 0)  # INSERT ... ON CONFLICT DO UPDATE

_T = TypeVar("_T")
_Row = tuple[Any, ...]

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


@dataclass(frozen=True, slots=True)
class Event:
    """One audit-log entry; ``at`` is timezone-aware UTC."""

    id: int
    at: datetime
    kind: str
    account: str | None
    detail: str | None


AuthState = str  # "connected" | "needs_reconsent"


@dataclass(frozen=True, slots=True)
class AccountAuth:
    """How one local account is authorised at its provider.

    ``token`` is the provider's token material (an MSAL cache, a Google refresh token...): it is
    encrypted in the database, bound to the account name, and never leaves this object in logs
    (``repr`` hides it).
    """

    account: str
    provider: str
    state: AuthState
    principal: str | None  # who consented: the mailbox owner's sign-in name
    scopes: tuple[str, ...]
    token: bytes | None = field(default=None, repr=False)
    updated_at: datetime | None = None
    reconsent_since: datetime | None = None
    last_error: str | None = None
    admin_notified: bool = False


class Store:
    """Async facade over the state database; create with :meth:`open`, end with :meth:`close`.

    A call whose caller is cancelled still runs to completion on the worker thread: a write
    may be applied even though the awaiting task never saw it return.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        box: SecretBox,
        schema_version: int,
    ) -> None:
        self._path = path
        self._conn = conn
        self._executor = executor
        self._box = box
        self._schema_version = schema_version
        self._closed = False

    @classmethod
    async def open(cls, state_dir: Path, box: SecretBox) -> Self:
        """Open (or create) ``<state_dir>/gateway.db`` and migrate it to the current schema."""
        path = state_dir / DB_FILE_NAME
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-store")
        loop = asyncio.get_running_loop()
        try:
            conn, version = await loop.run_in_executor(executor, _open_database, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, conn, executor, box, version)

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

    async def get_setting(self, key: str) -> str | None:
        row = await self._fetch_one("SELECT value FROM settings WHERE key = ?", (key,))
        return None if row is None else row[0]

    async def set_setting(self, key: str, value: str) -> None:
        await self._execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def put_secret(self, name: str, plaintext: bytes) -> None:
        """Store *plaintext* encrypted, bound to *name* so it cannot be moved to another name."""
        ciphertext = self._box.encrypt(plaintext, name)
        await self._execute(
            "INSERT INTO secrets (name, ciphertext, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET "
            "ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
            (name, ciphertext, _now_text()),
        )

    async def get_secret(self, name: str) -> bytes | None:
        """Return the decrypted secret, None if absent; StoreError if the key does not fit."""
        row = await self._fetch_one("SELECT ciphertext FROM secrets WHERE name = ?", (name,))
        return None if row is None else self._box.decrypt(row[0], name)

    async def delete_secret(self, name: str) -> None:
        await self._execute("DELETE FROM secrets WHERE name = ?", (name,))

    async def record_event(
        self, kind: str, account: str | None = None, detail: str | None = None
    ) -> None:
        """Append to the audit log; callers must not put secrets in *detail*."""
        await self._execute(
            "INSERT INTO events (at, kind, account, detail) VALUES (?, ?, ?, ?)",
            (_now_text(), kind, account, detail),
        )

    async def recent_events(self, limit: int = 50) -> list[Event]:
        """The newest *limit* events, newest first.

        Ordered by id (insertion order), not by ``at``, so a wall-clock step backwards cannot
        reorder the log; the ``at`` index serves time-range queries and pruning.
        """
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT id, at, kind, account, detail FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [_event_from_row(row) for row in rows]

    async def put_account_auth(self, auth: AccountAuth) -> None:
        """Insert or replace the authorisation of ``auth.account`` in one atomic write."""
        context = _auth_context(auth.account)
        ciphertext = None if auth.token is None else self._box.encrypt(auth.token, context)
        await self._execute(
            "INSERT INTO account_auth (account, provider, state, principal, scopes, "
            "token_ciphertext, updated_at, reconsent_since, last_error, admin_notified) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (account) DO UPDATE SET provider = excluded.provider, "
            "state = excluded.state, principal = excluded.principal, scopes = excluded.scopes, "
            "token_ciphertext = excluded.token_ciphertext, updated_at = excluded.updated_at, "
            "reconsent_since = excluded.reconsent_since, last_error = excluded.last_error, "
            "admin_notified = excluded.admin_notified",
            (
                auth.account,
                auth.provider,
                auth.state,
                auth.principal,
                " ".join(auth.scopes),
                ciphertext,
                _now_text(),
                _time_text(auth.reconsent_since),
                auth.last_error,
                int(auth.admin_notified),
            ),
        )

    async def get_account_auth(self, account: str) -> AccountAuth | None:
        row = await self._fetch_one(f"{_AUTH_SELECT} WHERE account = ?", (account,))
        return None if row is None else self._auth_from_row(row)

    async def list_account_auth(self) -> list[AccountAuth]:
        rows = await self._run(
            lambda conn: conn.execute(f"{_AUTH_SELECT} ORDER BY account").fetchall()
        )
        return [self._auth_from_row(row) for row in rows]

    async def delete_account_auth(self, account: str) -> None:
        await self._execute("DELETE FROM account_auth WHERE account = ?", (account,))

    def _auth_from_row(self, row: _Row) -> AccountAuth:
        account, provider, state, principal, scopes, ciphertext = row[:6]
        updated_at, reconsent_since, last_error, notified = row[6:]
        token = (
            None if ciphertext is None else self._box.decrypt(ciphertext, _auth_context(account))
        )
        return AccountAuth(
            account=account,
            provider=provider,
            state=state,
            principal=principal,
            scopes=tuple(scopes.split()),
            token=token,
            updated_at=_parse_time(updated_at),
            reconsent_since=_parse_time(reconsent_since),
            last_error=last_error,
            admin_notified=bool(notified),
        )

    async def add_consent_link(self, token_hash: str, account: str, expires_at: datetime) -> None:
        """Remember a consent link by the hash of its token (the token itself is never stored)."""
        await self._execute(
            "INSERT INTO consent_links (token_hash, account, expires_at) VALUES (?, ?, ?)",
            (token_hash, account, _time_text(expires_at)),
        )

    async def peek_consent_link(self, token_hash: str, now: datetime) -> str | None:
        """The account of an unused, unexpired consent link, without spending it."""
        row = await self._fetch_one(
            "SELECT account, expires_at FROM consent_links "
            "WHERE token_hash = ? AND used_at IS NULL",
            (token_hash,),
        )
        if row is None or _parse_time(row[1]) <= now:  # type: ignore[operator]
            return None
        return row[0]

    async def use_consent_link(self, token_hash: str, now: datetime) -> str | None:
        """Spend a consent link: return its account once, if unused and unexpired; else None."""

        def spend(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT account, expires_at FROM consent_links "
                "WHERE token_hash = ? AND used_at IS NULL",
                (token_hash,),
            ).fetchone()
            if row is None or _parse_time(row[1]) <= now:  # type: ignore[operator]
                return None
            cursor = conn.execute(
                "UPDATE consent_links SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                (_time_text(now), token_hash),
            )
            return row[0] if cursor.rowcount == 1 else None

        return await self._run(spend)

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        await self._run(lambda conn: conn.execute(sql, params))

    async def _fetch_one(self, sql: str, params: tuple[Any, ...]) -> _Row | None:
        return await self._run(lambda conn: conn.execute(sql, params).fetchone())

    async def _run(self, job: Callable[[sqlite3.Connection], _T]) -> _T:
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

    # INBOX views (gateway.mailbox): the UID map of each account, written one sync at a time.

    async def load_mailbox(self, account: str) -> tuple[MailboxState | None, list[MailboxUid]]:
        """The account's view state and its UID map in UID order; (None, []) before a sync."""

        def load(conn: sqlite3.Connection) -> tuple[MailboxState | None, list[MailboxUid]]:
            row = conn.execute(
                "SELECT uidvalidity, uidnext, sync_cursor FROM mailbox_state WHERE account = ?",
                (account,),
            ).fetchone()
            if row is None:
                return None, []
            rows = conn.execute(
                "SELECT uid, provider_id, internal_date, flags, size, local_flags, hidden "
                "FROM mailbox_uids WHERE account = ? ORDER BY uid",
                (account,),
            ).fetchall()
            entries = [
                MailboxUid(
                    uid,
                    pid,
                    datetime.fromisoformat(date),
                    tuple(flags.split()),
                    size,
                    None if local is None else tuple(local.split()),
                    bool(hidden),
                )
                for uid, pid, date, flags, size, local, hidden in rows
            ]
            return MailboxState(row[0], row[1], row[2]), entries

        return await self._run(load)

    async def save_mailbox_changes(
        self,
        account: str,
        state: MailboxState | None,
        added: Sequence[MailboxUid] = (),
        removed: Sequence[str] = (),
        updated: Sequence[MailboxUid] = (),
        *,
        replace: bool = False,
    ) -> None:
        """Apply one change to the UID map in a single transaction, cursor included.

        The map and the cursor move together, so a crash leaves either the old map with the old
        cursor (the sync is replayed, idempotently) or both new. ``updated`` rows replace the
        mutable columns (flags, size, local flags, hidden) of rows with the same provider id;
        ``state`` None leaves the state row alone (a local change, not a sync). ``replace``
        drops every row first: a rebuild under a new UIDVALIDITY.
        """

        def save(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                _save_mailbox(conn, account, state, added, removed, updated, replace)

        await self._run(save)

    async def save_mailbox_headers(self, account: str, headers: Mapping[str, bytes]) -> None:
        """Keep the header of messages of the account's map (a row per provider id).

        Headers name people and subjects, so they are encrypted at rest like tokens, each
        bound to its account and message id.
        """
        box = self._box

        def save(conn: sqlite3.Connection) -> None:
            rows = [
                (account, pid, box.encrypt(header, _header_context(account, pid)), account, pid)
                for pid, header in headers.items()
            ]
            with transaction(conn):
                conn.executemany(
                    "INSERT OR REPLACE INTO mailbox_headers (account, provider_id, header) "
                    "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM mailbox_uids "
                    "WHERE account = ? AND provider_id = ?)",
                    rows,
                )

        await self._run(save)

    async def load_mailbox_headers(
        self, account: str, provider_ids: Sequence[str]
    ) -> dict[str, bytes]:
        """The stored headers of these messages; ids without one are left out."""
        box = self._box

        def load(conn: sqlite3.Connection) -> dict[str, bytes]:
            found = _load_headers(conn, account, list(provider_ids))
            return {
                pid: box.decrypt(sealed, _header_context(account, pid))
                for pid, sealed in found.items()
            }

        return await self._run(load)


def _header_context(account: str, provider_id: str) -> str:
    return f"mailbox-header:{account}:{provider_id}"


def _load_headers(
    conn: sqlite3.Connection, account: str, provider_ids: Sequence[str]
) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for start in range(0, len(provider_ids), 500):  # SQLite's bound-parameter limit
        chunk = provider_ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        found.update(
            conn.execute(
                "SELECT provider_id, header FROM mailbox_headers "  # noqa: S608
                f"WHERE account = ? AND provider_id IN ({marks})",
                (account, *chunk),
            ).fetchall()
        )
    return found


def _save_mailbox(
    conn: sqlite3.Connection,
    account: str,
    state: MailboxState | None,
    added: Sequence[MailboxUid],
    removed: Sequence[str],
    updated: Sequence[MailboxUid],
    replace: bool,
) -> None:
    if replace:
        conn.execute("DELETE FROM mailbox_uids WHERE account = ?", (account,))
        conn.execute("DELETE FROM mailbox_headers WHERE account = ?", (account,))
    for table in ("mailbox_uids", "mailbox_headers"):
        conn.executemany(
            f"DELETE FROM {table} WHERE account = ? AND provider_id = ?",  # noqa: S608
            [(account, pid) for pid in removed],
        )
    conn.executemany(
        "INSERT INTO mailbox_uids (account, uid, provider_id, internal_date, flags, size, "
        "local_flags, hidden) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(account, e.uid, e.provider_id, _time_text(e.internal_date), *_mutable(e)) for e in added],
    )
    conn.executemany(
        "UPDATE mailbox_uids SET flags = ?, size = ?, local_flags = ?, hidden = ? "
        "WHERE account = ? AND provider_id = ?",
        [(*_mutable(e), account, e.provider_id) for e in updated],
    )
    if state is not None:
        conn.execute(
            "INSERT INTO mailbox_state (account, uidvalidity, uidnext, sync_cursor, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET "
            "uidvalidity = excluded.uidvalidity, uidnext = excluded.uidnext, "
            "sync_cursor = excluded.sync_cursor, updated_at = excluded.updated_at",
            (account, state.uidvalidity, state.uidnext, state.cursor, _now_text()),
        )


def _mutable(entry: MailboxUid) -> tuple[str, int | None, str | None, int]:
    local = None if entry.local_flags is None else " ".join(entry.local_flags)
    return " ".join(entry.flags), entry.size, local, int(entry.hidden)


def _open_database(path: Path) -> tuple[sqlite3.Connection, int]:
    """Worker-thread half of :meth:`Store.open`: connect, configure, migrate."""
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


def _event_from_row(row: _Row) -> Event:
    id_, at, kind, account, detail = row
    return Event(id_, datetime.fromisoformat(at), kind, account, detail)


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time_text(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _auth_context(account: str) -> str:
    return f"account-auth:{account}"


_AUTH_SELECT = (
    "SELECT account, provider, state, principal, scopes, token_ciphertext, updated_at, "
    "reconsent_since, last_error, admin_notified FROM account_auth"
)


@dataclass(frozen=True, slots=True)
class MailboxState:
    """An INBOX view's identity and progress: UIDVALIDITY, the next UID, the provider cursor."""

    uidvalidity: int
    uidnext: int
    cursor: str | None


@dataclass(frozen=True, slots=True)
class MailboxUid:
    """One UID map row: ``internal_date`` is timezone-aware UTC, ``flags`` the provider's IMAP
    flags; ``size`` the exact CRLF size once known; ``local_flags`` the gateway's own flags when
    a client changed them (None: the provider's); ``hidden`` a local deletion (EXPUNGE, DELE)."""

    uid: int
    provider_id: str
    internal_date: datetime
    flags: tuple[str, ...] = ()
    size: int | None = None
    local_flags: tuple[str, ...] | None = None
    hidden: bool = False
