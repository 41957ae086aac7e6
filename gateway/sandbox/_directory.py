"""Who exists in the sandbox and what they were granted: apps, users (mailboxes) and tokens.

Shared by the Microsoft and Google halves. Tokens are opaque random strings mapped to grants, as
the gateway must treat real access tokens anyway. Time comes from :attr:`Directory.clock` so tests
can expire tokens without sleeping.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

Provider = Literal["microsoft", "google"]
TokenKind = Literal["access", "refresh"]

DEFAULT_ACCESS_LIFETIME = 3599  # what both clouds answer in expires_in
DEFAULT_REFRESH_LIFETIME = 90 * 24 * 3600  # Entra's inactivity window; Google's is longer


@dataclass
class App:
    """An OAuth client registration (Entra app registration / Google OAuth client)."""

    provider: Provider
    client_id: str
    client_secret: str | None = None  # None: a public client (may not send a secret)
    redirect_uris: tuple[str, ...] = ()
    app_permissions: frozenset[str] = frozenset()  # granted to the app itself (client credentials)
    name: str = "app"

    @property
    def confidential(self) -> bool:
        return self.client_secret is not None

    def allows_redirect(self, uri: str) -> bool:
        """Exact match, except that a loopback redirect may use any port (RFC 8252 §7.3)."""
        if uri in self.redirect_uris:
            return True
        return any(_same_loopback_target(uri, allowed) for allowed in self.redirect_uris)


def _same_loopback_target(uri: str, allowed: str) -> bool:
    from urllib.parse import urlsplit

    a, b = urlsplit(uri), urlsplit(allowed)
    loopback = {"127.0.0.1", "localhost", "[::1]", "::1"}
    return (
        a.scheme == b.scheme == "http"
        and a.hostname in loopback
        and a.hostname == b.hostname
        and (a.path or "/") == (b.path or "/")
    )


@dataclass
class User:
    """A person with a mailbox. ``send_as`` lists the other From addresses they may use."""

    provider: Provider
    address: str
    display_name: str
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    tenant_id: str = ""
    send_as: tuple[str, ...] = ()

    def may_send_as(self, address: str) -> bool:
        wanted = address.casefold()
        return wanted == self.address.casefold() or wanted in {a.casefold() for a in self.send_as}


@dataclass
class Grant:
    """What a token stands for."""

    token: str
    kind: TokenKind
    provider: Provider
    client_id: str
    user: str | None  # the user's address; None for app-only tokens
    scopes: frozenset[str]
    expires_at: float
    revoked: bool = False

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


class Directory:
    """Apps, users and grants of both providers, plus the sandbox clock."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.apps: dict[str, App] = {}
        self.users: dict[str, User] = {}
        self.grants: dict[str, Grant] = {}
        self.access_lifetime: dict[Provider, int] = {
            "microsoft": DEFAULT_ACCESS_LIFETIME,
            "google": DEFAULT_ACCESS_LIFETIME,
        }
        self.refresh_lifetime: dict[Provider, int] = {
            "microsoft": DEFAULT_REFRESH_LIFETIME,
            "google": DEFAULT_REFRESH_LIFETIME,
        }

    def add_app(self, app: App) -> App:
        self.apps[app.client_id] = app
        return app

    def add_user(self, user: User) -> User:
        self.users[user.address.casefold()] = user
        return user

    def user(self, address: str) -> User | None:
        return self.users.get(address.casefold())

    def user_by_id(self, provider: Provider, id_or_address: str) -> User | None:
        """Graph's ``/users/{id|userPrincipalName}`` and Gmail's ``users/{userId}`` lookup."""
        found = self.user(id_or_address)
        if found is not None and found.provider == provider:
            return found
        for candidate in self.users.values():
            if candidate.provider == provider and candidate.id == id_or_address:
                return candidate
        return None

    def issue(
        self,
        kind: TokenKind,
        provider: Provider,
        client_id: str,
        user: str | None,
        scopes: Iterable[str],
        prefix: str = "",
    ) -> Grant:
        lifetime = (self.access_lifetime if kind == "access" else self.refresh_lifetime)[provider]
        grant = Grant(
            token=prefix + secrets.token_urlsafe(32),
            kind=kind,
            provider=provider,
            client_id=client_id,
            user=user,
            scopes=frozenset(scopes),
            expires_at=self.clock() + lifetime,
        )
        self.grants[grant.token] = grant
        return grant

    def find(self, token: str, kind: TokenKind, provider: Provider) -> Grant | None:
        grant = self.grants.get(token)
        if grant is None or grant.kind != kind or grant.provider != provider:
            return None
        return grant

    def revoke_user(self, address: str) -> int:
        """Revoke every token of a user, as a password reset or "sign out everywhere" does."""
        count = 0
        for grant in self.grants.values():
            if grant.user and grant.user.casefold() == address.casefold() and not grant.revoked:
                grant.revoked = True
                count += 1
        return count

    def revoke_token(self, token: str) -> bool:
        grant = self.grants.get(token)
        if grant is None:
            return False
        grant.revoked = True
        return True

    def expire_access_tokens(self, provider: Provider | None = None) -> int:
        """Make every current access token expired now (as if an hour passed)."""
        now, count = self.clock(), 0
        for grant in self.grants.values():
            if grant.kind == "access" and provider in (None, grant.provider):
                grant.expires_at = min(grant.expires_at, now)
                count += 1
        return count
