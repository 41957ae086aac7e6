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
from urllib.parse import urlsplit

Provider = Literal["microsoft", "google"]
TokenKind = Literal["access", "refresh"]

DEFAULT_ACCESS_LIFETIME = 3599  # what both clouds answer in expires_in
DEFAULT_REFRESH_LIFETIME = 90 * 24 * 3600  # Entra's inactivity window; Google's is longer


@dataclass
class App:
    """An OAuth client registration (Entra app registration / Google OAuth client).

    Microsoft: an Entra app registration lists redirect URIs per *platform*. A URI under "Web"
    (``redirect_uris``) makes a sign-in through it confidential: redeeming its code needs the
    client secret or a certificate assertion. A URI under "Mobile and desktop applications"
    (``public_client_redirect_uris``) makes it public: PKCE only, no credential allowed. "Allow
    public client flows" (``allow_public_client_flows``) lets flows without a redirect URI (the
    device code flow) run as a public client. (Microsoft identity platform docs: "Redirect URI
    (reply URL) outline and restrictions", https://learn.microsoft.com/entra/identity-platform/
    reply-url; "Public client and confidential client applications", https://learn.microsoft.com/
    entra/identity-platform/msal-client-applications; "Error AADSTS7000218 when a confidential
    client application authenticates to Microsoft Entra ID", https://learn.microsoft.com/
    troubleshoot/entra/entra-id/app-integration/
    confidential-client-application-authentication-error-aadsts7000218.)

    Google: a client is a "Web application" (``desktop=False``: ``redirect_uris`` registered,
    matched exactly) or a "Desktop app" (``desktop=True``: no registered URIs, only loopback
    redirects). Both kinds have a client secret.
    """

    provider: Provider
    client_id: str
    client_secret: str | None = None  # Microsoft: a secret credential, if one was added
    redirect_uris: tuple[str, ...] = ()  # Entra: the Web platform; Google: a Web client's
    public_client_redirect_uris: tuple[str, ...] = ()  # Entra: Mobile and desktop applications
    allow_public_client_flows: bool = False  # Entra's "Allow public client flows" switch
    desktop: bool = False  # Google: the "Desktop app" client type
    app_permissions: frozenset[str] = frozenset()  # granted to the app itself (client credentials)
    name: str = "app"


def is_loopback(uri: str) -> bool:
    """An ``http`` URI on this machine (127.0.0.1, [::1] or localhost)."""
    parts = urlsplit(uri)
    return parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS


def same_but_port(uri: str, registered: str) -> bool:
    """Equal except for the port of a loopback URI, which clients choose when they start
    (RFC 8252 §7.3)."""
    if uri == registered:
        return True
    a, b = urlsplit(uri), urlsplit(registered)
    return (
        is_loopback(uri)
        and is_loopback(registered)
        and a.hostname == b.hostname
        and (a.path or "/") == (b.path or "/")
        and a.query == b.query
    )


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


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
    # Entra: a refresh token remembers whether it was issued to a public client (mobile/desktop
    # redirect, device flow), which must redeem it without a credential, or to a Web sign-in.
    public_client: bool = False

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
        public_client: bool = False,
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
            public_client=public_client,
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

    def revoke_access_tokens(self, address: str) -> int:
        """Revoke a user's access tokens only, keeping the refresh tokens: what continuous
        access evaluation does when a policy (e.g. the network location) no longer holds for a
        token while the session itself stays valid, so a refresh gets a new, accepted token."""
        count = 0
        for grant in self.grants.values():
            user = grant.user or ""
            if grant.kind == "access" and user.casefold() == address.casefold():
                count += not grant.revoked
                grant.revoked = True
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
