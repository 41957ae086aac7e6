"""Durable gateway state, split by purpose: authorisations, the audit log, INBOX views.

Each purpose has a narrow interface below (``AuthStore``, ``EventLog``, ``MailboxStore``) and
callers take only the one they need, so another backend (PostgreSQL, for several gateway
instances sharing one spool and token set) can implement them one by one. The SQLite backend
keeps all three in one file over one connection (``_db.Database``); :func:`open_sqlite` builds
them for the composition root (``gateway.app``) and the command line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from ._auth import SqliteAuthStore
from ._crypto import KEY_ENV_VAR, SecretBox, StoreError, load_or_create_key
from ._db import Database
from ._events import SqliteEventLog
from ._mailboxes import SqliteMailboxStore
from ._types import AccountAuth, Event, MailboxState, MailboxUid

__all__ = [
    "KEY_ENV_VAR",
    "AccountAuth",
    "AuthStore",
    "Event",
    "EventLog",
    "MailboxState",
    "MailboxStore",
    "MailboxUid",
    "SecretBox",
    "StoreError",
    "Stores",
    "load_or_create_key",
    "open_sqlite",
]


class AuthStore(Protocol):
    """What the token broker keeps: each account's authorisation at its provider (token
    material encrypted), one-time consent links by the hash of their token, and the
    gateway's own settings and encrypted secrets (the Google OAuth client)."""

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


class EventLog(Protocol):
    """The audit log: append-only, read newest first."""

    async def record_event(
        self, kind: str, account: str | None = None, detail: str | None = None
    ) -> None: ...

    async def recent_events(self, limit: int = 50) -> list[Event]: ...


class MailboxStore(Protocol):
    """INBOX views' UID maps (with sync cursor, sizes, local flags) and stored headers."""

    async def load_mailbox(self, account: str) -> tuple[MailboxState | None, list[MailboxUid]]: ...

    async def save_mailbox_changes(
        self,
        account: str,
        state: MailboxState | None,
        added: Sequence[MailboxUid] = (),
        removed: Sequence[str] = (),
        updated: Sequence[MailboxUid] = (),
        *,
        replace: bool = False,
    ) -> None: ...

    async def save_mailbox_headers(self, account: str, headers: Mapping[str, bytes]) -> None: ...

    async def load_mailbox_headers(
        self, account: str, provider_ids: Sequence[str]
    ) -> dict[str, bytes]: ...


@dataclass(frozen=True, slots=True)
class Stores:
    """One backend's stores, opened together; ``close`` ends them all (after queued calls)."""

    auth: AuthStore
    events: EventLog
    mailboxes: MailboxStore
    close: Callable[[], Awaitable[None]]


async def open_sqlite(state_dir: Path, box: SecretBox) -> Stores:
    """Open (or create and migrate) ``<state_dir>/gateway.db`` and the stores over it."""
    db = await Database.open(state_dir)
    return Stores(
        SqliteAuthStore(db, box), SqliteEventLog(db), SqliteMailboxStore(db, box), db.close
    )
