"""Shapes shared by the provider adapters: what a consent yields and what a refresh yields."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

# Seconds before expiry at which an access token is renewed, as MSAL does with its own cache:
# a token with less left is not handed out (from memory or from the stored grant).
REFRESH_MARGIN = 300.0


@dataclass(frozen=True)
class Connected:
    """The outcome of a successful consent."""

    principal: str  # the signed-in account's name (UPN / email), checked against the mailbox
    scopes: tuple[str, ...]
    token: bytes = field(repr=False)  # what to keep, encrypted: MSAL cache / refresh token


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float  # epoch seconds
    # A user's grant material to store after the token endpoint was asked (the refresh token,
    # rotated or not, and the new access token); None when the stored access token was reused.
    new_token: bytes | None = field(default=None, repr=False)
    issued_at: float = field(default_factory=time.time)

    def fresh(self, now: float, margin: float) -> bool:
        """Usable for a while yet: more than ``margin`` (at most half its life) remains."""
        lifetime = max(self.expires_at - self.issued_at, 0.0)
        return self.expires_at - min(margin, lifetime / 2) > now


def id_token_claims(id_token: str) -> dict[str, Any]:
    """The claims of an id_token received directly from the token endpoint over TLS.

    OpenID Connect Core §3.1.3.7 lets a client rely on TLS server validation instead of the
    signature when the token comes straight from the token endpoint, as here.
    """
    try:
        payload = id_token.split(".")[1]
        decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(decoded)
    except (IndexError, ValueError) as error:
        raise ValueError("the id_token is not a JWT") from error
    if not isinstance(claims, dict):
        raise ValueError("the id_token payload is not a JSON object")
    return claims
