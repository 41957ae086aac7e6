"""Durable gateway state, split by purpose: authorisations, the audit log, INBOX views.

Each purpose has a narrow interface below (``AuthStore``, ``EventLog``, ``MailboxStore``) and
callers take only the one they need. One implementation of each serves both backends, with the
same SQL (``_sql``): SQLite, the embedded default, one file over one connection
(``_db.Database``, :func:`open_sqlite`); and PostgreSQL, for several instances sharing one
state (``_pg.PgDatabase``, :func:`open_postgresql`). ``Stores.coordination`` carries what
exists once per cluster (locks, change notices; ``_coordination``), trivially local on SQLite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from ._auth import SqlAuthStore
from ._coordination import Coordination, Leadership, LocalCoordination
from ._crypto import KEY_ENV_VAR, SecretBox, StoreError, load_or_create_key
from ._db import Database, epoch_text, now_text, text_epoch
from ._events import SqlEventLog
from ._mailboxes import SqlMailboxStore
from ._pg import PgDatabase, describe
from ._sql import Connection, SqlDatabase
from ._types import AccountAuth, Event, MailboxState, MailboxUid, MailboxUpdate

__all__ = [
    "KEY_ENV_VAR",
    "AccountAuth",
    "AuthStore",
    "Connection",
    "Coordination",
    "Event",
    "EventLog",
    "Leadership",
    "MailboxState",
    "MailboxStore",
    "MailboxUid",
    "MailboxUpdate",
    "PgDatabase",
    "SecretBox",
    "SqlDatabase",
    "StoreError",
    "Stores",
    "describe",
    "epoch_text",
    "load_or_create_key",
    "migrate_postgresql",
    "open_postgresql",
    "open_sqlite",
    "text_epoch",
]


class AuthStore(Protocol):
    """What the token broker keeps: each account's authorisation at its provider (token
    material encrypted), one-time consent links by the hash of their token, sign-ins waiting
    for the provider's answer by the hash of their state (payload encrypted, taken once, on
    any instance), and the gateway's own settings and encrypted secrets (the Google OAuth
    client)."""

    async def get_setting(self, key: str) -> str | None: ...

    async def set_setting(self, key: str, value: str) -> None: ...

    async def put_secret(self, name: str, plaintext: bytes) -> None: ...

    async def get_secret(self, name: str) -> bytes | None: ...

    async def put_account_auth(self, auth: AccountAuth) -> None: ...

    async def get_account_auth(self, account: str) -> AccountAuth | None: ...

    async def delete_account_auth(self, account: str) -> None: ...

    async def add_consent_link(
        self, token_hash: str, account: str, expires_at: datetime
    ) -> None: ...

    async def peek_consent_link(self, token_hash: str, now: datetime) -> str | None: ...

    async def use_consent_link(self, token_hash: str, now: datetime) -> str | None: ...

    async def put_pending_sign_in(
        self, state_hash: str, account: str, payload: bytes, expires_at: datetime
    ) -> None: ...

    async def take_pending_sign_in(
        self, state_hash: str, now: datetime
    ) -> tuple[str, bytes] | None: ...

    async def prune_pending_sign_ins(self, now: datetime) -> None: ...


class EventLog(Protocol):
    """The audit log: append-only, read newest first."""

    async def record_event(
        self, kind: str, account: str | None = None, detail: str | None = None
    ) -> None: ...

    async def recent_events(self, limit: int = 50) -> list[Event]: ...


class MailboxStore(Protocol):
    """INBOX views' UID maps (with sync cursor, sizes, local flags) and stored headers; every
    change of a map is counted in its version (``_mailboxes`` says how instances use it)."""

    async def load_mailbox(self, account: str) -> tuple[MailboxState | None, list[MailboxUid]]: ...

    async def mailbox_version(self, account: str) -> int | None: ...

    async def save_mailbox_sync(
        self,
        account: str,
        base: int | None,
        state: MailboxState,
        added: Sequence[MailboxUid] = (),
        removed: Sequence[str] = (),
        updated: Sequence[MailboxUid] = (),
        *,
        replace: bool = False,
    ) -> int | None: ...

    async def update_mailbox(
        self,
        account: str,
        base: int | None,
        provider_ids: Sequence[str],
        change: Callable[[MailboxUid], MailboxUid],
    ) -> MailboxUpdate: ...

    async def save_mailbox_sizes(self, account: str, sizes: Mapping[str, int]) -> None: ...

    async def save_mailbox_headers(self, account: str, headers: Mapping[str, bytes]) -> None: ...

    async def load_mailbox_headers(
        self, account: str, provider_ids: Sequence[str]
    ) -> dict[str, bytes]: ...


@dataclass(frozen=True, slots=True)
class Stores:
    """One backend's stores, opened together; ``close`` ends them all (after queued calls).

    ``db`` is the backend itself, for the parts that keep their own tables on PostgreSQL (the
    spool); ``backend`` is "sqlite" or "postgresql".
    """

    auth: AuthStore
    events: EventLog
    mailboxes: MailboxStore
    coordination: Coordination
    db: SqlDatabase
    backend: str
    close: Callable[[], Awaitable[None]]


async def open_sqlite(state_dir: Path, box: SecretBox) -> Stores:
    """Open (or create and migrate) ``<state_dir>/gateway.db`` and the stores over it."""
    db = await Database.open(state_dir)
    return _stores(db, box, LocalCoordination(), "sqlite")


async def open_postgresql(url: str, box: SecretBox, pool_size: int = 8) -> Stores:
    """Connect to a migrated PostgreSQL database (``gateway migrate``) and check the key.

    Every instance must seal and open tokens with the same secret key: the first instance to
    open the database leaves a sealed check value, and an instance whose key cannot open it is
    refused here, before it could write tokens the others cannot read.
    """
    from ._pg_coordination import PgCoordination

    db = await PgDatabase.open(url, pool_size)
    try:
        await _check_key(db, box, url)
        coordination = await PgCoordination.open(url, pool_size)
    except BaseException:
        await db.close()
        raise
    return _stores(db, box, coordination, "postgresql")


async def migrate_postgresql(url: str) -> tuple[int, int]:
    """Upgrade the PostgreSQL schema; (version before, version after)."""
    return await PgDatabase.migrate(url)


def _stores(db: SqlDatabase, box: SecretBox, coordination: Coordination, backend: str) -> Stores:
    async def close() -> None:
        try:
            await coordination.close()
        finally:
            await db.close()

    return Stores(
        SqlAuthStore(db, box),
        SqlEventLog(db),
        SqlMailboxStore(db, box),
        coordination,
        db,
        backend,
        close,
    )


_KEY_CHECK = "key-check"
_KEY_CHECK_VALUE = b"gateway"


async def _check_key(db: SqlDatabase, box: SecretBox, url: str) -> None:
    """Leave a check value sealed with this key unless one is there, then open the one there.

    Insert-if-absent, not a replace: of two first instances starting together with different
    keys, the second's write must not overwrite the first's and let both in.
    """
    await db.execute(
        "INSERT INTO secrets (name, ciphertext, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO NOTHING",
        (_KEY_CHECK, box.encrypt(_KEY_CHECK_VALUE, _KEY_CHECK), now_text()),
    )
    row = await db.fetch_one("SELECT ciphertext FROM secrets WHERE name = ?", (_KEY_CHECK,))
    assert row is not None, "inserted just above and never deleted"
    try:
        opened = box.decrypt(row[0], _KEY_CHECK) == _KEY_CHECK_VALUE
    except StoreError:  # a failure of the database itself was raised by the calls above
        opened = False
    if not opened:
        raise StoreError(
            f"this instance's secret key does not match the one the tokens in {describe(url)} "
            f"were sealed with: give every instance the same key ({KEY_ENV_VAR}, or the same "
            "secret.key file in each state directory)"
        )
