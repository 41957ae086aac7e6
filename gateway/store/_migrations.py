"""Schema migrations: an append-only list, applied forward only, one transaction each.

Rules for adding one: append ``Migration(len(MIGRATIONS) + 1, ...)``; never edit or reorder a
released migration (databases in the field have already run it). Statements use only portable
SQL (TEXT/INTEGER/BLOB, no SQLite-only functions): the PostgreSQL backend runs the same list,
the same history, through :func:`for_postgresql`, a type mapping and nothing else. Timestamps
are ISO-8601 UTC text; see ``gateway.store._db``.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from ._crypto import StoreError
from ._sql import Connection


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step; ``version`` is the schema version the database has after it."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "settings and encrypted secrets",
        (
            "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE secrets ("
            "name TEXT PRIMARY KEY, ciphertext BLOB NOT NULL, updated_at TEXT NOT NULL)",
        ),
    ),
    Migration(
        2,
        "audit events",
        (
            "CREATE TABLE events ("
            "id INTEGER PRIMARY KEY, at TEXT NOT NULL, kind TEXT NOT NULL, "
            "account TEXT, detail TEXT)",
            "CREATE INDEX events_at ON events (at)",
        ),
    ),
    Migration(
        3,
        "mailbox authorisations and one-time consent links",
        (
            "CREATE TABLE account_auth ("
            "account TEXT PRIMARY KEY, provider TEXT NOT NULL, state TEXT NOT NULL, "
            "principal TEXT, scopes TEXT NOT NULL, token_ciphertext BLOB, "
            "updated_at TEXT NOT NULL, reconsent_since TEXT, last_error TEXT, "
            "admin_notified INTEGER NOT NULL DEFAULT 0)",
            "CREATE TABLE consent_links ("
            "token_hash TEXT PRIMARY KEY, account TEXT NOT NULL, expires_at TEXT NOT NULL, "
            "used_at TEXT)",
        ),
    ),
    Migration(
        4,
        "INBOX views: UIDVALIDITY, UIDNEXT and sync cursor per account; provider id to UID map",
        (
            "CREATE TABLE mailbox_state ("
            "account TEXT PRIMARY KEY, uidvalidity INTEGER NOT NULL, uidnext INTEGER NOT NULL, "
            "sync_cursor TEXT, updated_at TEXT NOT NULL)",
            "CREATE TABLE mailbox_uids ("
            "account TEXT NOT NULL, uid INTEGER NOT NULL, provider_id TEXT NOT NULL, "
            "internal_date TEXT NOT NULL, flags TEXT NOT NULL, "
            "PRIMARY KEY (account, uid), UNIQUE (account, provider_id))",
        ),
    ),
    Migration(
        5,
        "INBOX views: exact sizes, the gateway's own flags and local deletions per message",
        (
            "ALTER TABLE mailbox_uids ADD COLUMN size INTEGER",
            "ALTER TABLE mailbox_uids ADD COLUMN local_flags TEXT",
            "ALTER TABLE mailbox_uids ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0",
        ),
    ),
    Migration(
        6,
        "INBOX views: each message's header, so header fetches need no download after a restart",
        (
            "CREATE TABLE mailbox_headers ("
            "account TEXT NOT NULL, provider_id TEXT NOT NULL, header BLOB NOT NULL, "
            "PRIMARY KEY (account, provider_id))",
        ),
    ),
    Migration(
        7,
        "INBOX views: a change counter per map, compared by instances sharing the database",
        ("ALTER TABLE mailbox_state ADD COLUMN version INTEGER NOT NULL DEFAULT 0",),
    ),
    Migration(
        8,
        "admin sign-in sessions and recent failed logins, valid and counted on every instance",
        (
            "CREATE TABLE admin_sessions ("
            "id_digest TEXT PRIMARY KEY, csrf_token TEXT NOT NULL, "
            "signed_in INTEGER NOT NULL, last_seen TEXT NOT NULL)",
            "CREATE INDEX admin_sessions_last_seen ON admin_sessions (last_seen)",
            "CREATE TABLE login_failures ("
            "id INTEGER PRIMARY KEY, user_digest TEXT NOT NULL, client TEXT NOT NULL, "
            "at TEXT NOT NULL)",
            "CREATE INDEX login_failures_user ON login_failures (user_digest, at)",
            "CREATE INDEX login_failures_at ON login_failures (at)",
        ),
    ),
    Migration(
        9,
        "the spool in the database: messages with their bodies and claims, pauses, delivery log",
        (
            "CREATE TABLE spool_messages ("
            "id TEXT PRIMARY KEY, account TEXT NOT NULL, envelope TEXT NOT NULL, "
            "message_id TEXT NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL, "
            "created_ms INTEGER NOT NULL, retry_since_ms INTEGER NOT NULL, "
            "attempts INTEGER NOT NULL, attempt_started INTEGER NOT NULL, "
            "next_attempt_ms INTEGER NOT NULL, reason TEXT NOT NULL, "
            "lease_owner TEXT, lease_until_ms INTEGER, body BLOB NOT NULL)",
            "CREATE INDEX spool_messages_due ON spool_messages (state, next_attempt_ms)",
            "CREATE TABLE spool_pauses (account TEXT PRIMARY KEY, until_ms INTEGER NOT NULL)",
            "CREATE TABLE spool_deliveries ("
            "id INTEGER PRIMARY KEY, at TEXT NOT NULL, queue_id TEXT NOT NULL, "
            "message_id TEXT NOT NULL, account TEXT NOT NULL, recipients INTEGER NOT NULL, "
            "result TEXT NOT NULL, detail TEXT NOT NULL)",
            "CREATE INDEX spool_deliveries_at ON spool_deliveries (at)",
        ),
    ),
    Migration(
        10,
        "provider sign-ins waiting for the browser to come back, so any instance completes them",
        (
            "CREATE TABLE pending_sign_ins ("
            "state_hash TEXT PRIMARY KEY, account TEXT NOT NULL, sealed BLOB NOT NULL, "
            "expires_at TEXT NOT NULL)",
        ),
    ),
)

_CREATE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version INTEGER PRIMARY KEY, description TEXT NOT NULL)"
)


def check_sequence(migrations: Sequence[Migration]) -> None:
    """Raise ValueError unless versions run 1, 2, 3... without gaps or reordering.

    A gap or a duplicate would make the "current version" ambiguous, so it is a programming
    error caught at import time and in tests rather than on an operator's machine.
    """
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3... without gaps, got {versions}")


check_sequence(MIGRATIONS)


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Bring the SQLite database up to the newest of *migrations*; return its schema version.

    Each migration runs in its own ``BEGIN IMMEDIATE`` transaction and re-reads the version
    under that write lock, so two processes starting together apply each step exactly once and
    a failed step leaves the database at the previous version. A database newer than the
    newest known migration is refused rather than used with a schema this code does not
    understand. SQLite errors propagate unchanged; the caller knows the file name to report.
    """
    return apply_migrations(
        conn, lambda: transaction(conn), _database_name(conn), migrations, lambda sql: sql
    )


def apply_migrations(
    conn: Connection,
    exclusive: Callable[[], AbstractContextManager[None]],
    name: str,
    migrations: Sequence[Migration] = MIGRATIONS,
    dialect: Callable[[str], str] = lambda sql: sql,
) -> int:
    """The migration loop for any backend: *exclusive* opens a transaction that no other
    process can run at the same time (SQLite's write lock, a PostgreSQL advisory lock)."""
    check_sequence(migrations)
    with exclusive():
        conn.execute(dialect(_CREATE_VERSION_TABLE))
        current = current_version(conn)
    newest = len(migrations)
    if current > newest:
        raise StoreError(
            f"{name} has schema version {current} but this gateway only knows "
            f"up to {newest}; upgrade the gateway or restore a backup"
        )
    for migration in migrations[current:]:
        with exclusive():
            if current_version(conn) >= migration.version:
                continue  # another process applied it while we waited for the lock
            for statement in migration.statements:
                conn.execute(dialect(statement))
            conn.execute(
                "INSERT INTO schema_version (version, description) VALUES (?, ?)",
                (migration.version, migration.description),
            )
    return current_version(conn)


_POSTGRESQL_TYPES = (
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),  # UIDs and UIDVALIDITY are unsigned 32-bit
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


def for_postgresql(statement: str) -> str:
    """The PostgreSQL spelling of a portable migration statement: SQLite's rowid alias becomes
    an identity column, integers 64-bit, BLOB bytea. Nothing else differs, by the rule above."""
    for pattern, replacement in _POSTGRESQL_TYPES:
        statement = pattern.sub(replacement, statement)
    return statement


def current_version(conn: Connection) -> int:
    (version,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return version or 0


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Explicit transaction, independent of the connection's isolation_level setting.

    SQLite DDL is transactional, so a half-applied migration rolls back completely.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _database_name(conn: sqlite3.Connection) -> str:
    """The main database's file path, so errors name the file the operator must look at."""
    for _seq, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return str(file)
    return "the database"
