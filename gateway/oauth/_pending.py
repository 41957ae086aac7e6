"""A provider sign-in between the click on Connect and the browser's return to /oauth/callback.

What the callback needs to finish it (MSAL's auth-code flow with its PKCE verifier and nonce,
or Google's verifier and redirect URI; the consent link it came through) is kept in the state
store, sealed, by the hash of its OAuth ``state``: behind a load balancer the provider's
redirect may reach another instance than the one the click did, and a restart in between
loses nothing. The bytes here are the plaintext the store seals.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ._google import PendingGoogleConsent


@dataclass(frozen=True)
class PendingSignIn:
    """One sign-in of ``account``, through Microsoft (``microsoft_flow``) or Google."""

    account: str
    microsoft_flow: dict[str, Any] | None = field(default=None, repr=False)
    google: PendingGoogleConsent | None = field(default=None, repr=False)
    link: str | None = field(default=None, repr=False)  # hash of the consent link used, if any

    def to_bytes(self) -> bytes:
        """The payload to store (the account is the row's own column)."""
        google = None if self.google is None else asdict(self.google)
        document = {"microsoft_flow": self.microsoft_flow, "google": google, "link": self.link}
        return json.dumps(document).encode("utf-8")

    @classmethod
    def from_bytes(cls, account: str, payload: bytes) -> PendingSignIn:
        """The sign-in back from its stored payload; ValueError if it is not one."""
        try:
            document = json.loads(payload)
            google = document["google"]
            pending = cls(
                account,
                microsoft_flow=document["microsoft_flow"],
                google=None if google is None else _google_consent(google),
                link=document["link"],
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a stored sign-in: {error!r}") from None
        if (pending.microsoft_flow is None) == (pending.google is None):
            raise ValueError("a stored sign-in names exactly one provider")
        return pending


def _google_consent(stored: dict[str, Any]) -> PendingGoogleConsent:
    return PendingGoogleConsent(
        state=stored["state"],
        redirect_uri=stored["redirect_uri"],
        scopes=tuple(stored["scopes"]),
        code_verifier=stored["code_verifier"],
    )


def state_hash(state: str) -> str:
    """The key a sign-in is stored under: a copy of the database gives no usable state."""
    return hashlib.sha256(state.encode("utf-8")).hexdigest()
