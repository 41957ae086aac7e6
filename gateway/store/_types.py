"""The values the stores hand out and take in, independent of the database behind them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

AuthState = str  # "connected" | "needs_reconsent"


@dataclass(frozen=True, slots=True)
class Event:
    """One audit-log entry; ``at`` is timezone-aware UTC."""

    id: int
    at: datetime
    kind: str
    account: str | None
    detail: str | None


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


@dataclass(frozen=True, slots=True)
class MailboxState:
    """An INBOX view's identity and progress: UIDVALIDITY, the next UID, the provider cursor;
    ``version`` counts the changes to the map (what instances sharing the store compare)."""

    uidvalidity: int
    uidnext: int
    cursor: str | None
    version: int = 0


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


@dataclass(frozen=True, slots=True)
class MailboxUpdate:
    """What a local change of a UID map did: the rows it changed, the map's version after it
    (None: the map was never synced), and, when the caller's copy had missed another
    instance's change, the whole map as that same transaction left it."""

    changed: list[MailboxUid]
    version: int | None
    snapshot: tuple[MailboxState, list[MailboxUid]] | None = None
