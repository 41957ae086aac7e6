"""Google sign-in: auth code + PKCE (loopback redirect), refresh through google-auth, and
service accounts with domain-wide delegation.

Synchronous like MSAL (requests underneath); the broker runs these in a worker thread. The
configured token URI is used everywhere, so the sandbox (or a proxy) can stand in for Google.

The stored material of a user's grant is a small JSON document, the Google counterpart of
MSAL's serialized cache: the refresh token and the newest access token with its expiry. Every
instance sharing the store can then use the access token another one just obtained instead of
redeeming the refresh token again. Material stored before this format (the bare refresh token)
is still read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC
from typing import Any
from urllib.parse import urlencode

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import credentials as user_credentials
from google.oauth2 import service_account

from ..config import GoogleSettings
from ._errors import AuthUnavailable, ConsentError, ReauthRequired
from ._tokens import REFRESH_MARGIN, AccessToken, Connected, id_token_claims


@dataclass(frozen=True)
class GoogleClient:
    """The OAuth client the admin registered (from the config or the admin page)."""

    client_id: str
    client_secret: str = field(repr=False)


@dataclass(frozen=True)
class PendingGoogleConsent:
    state: str
    redirect_uri: str
    scopes: tuple[str, ...]
    code_verifier: str = field(repr=False)


class GoogleAuth:
    def __init__(self, settings: GoogleSettings, session: Callable[[], requests.Session]) -> None:
        self.settings = settings
        self._session = session

    def start(
        self, client: GoogleClient, scopes: list[str], redirect_uri: str, login_hint: str
    ) -> tuple[str, PendingGoogleConsent]:
        verifier = secrets.token_urlsafe(64)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        pending = PendingGoogleConsent(
            state=secrets.token_urlsafe(24),
            redirect_uri=redirect_uri,
            scopes=tuple(scopes),
            code_verifier=verifier,
        )
        query = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(scopes),
            "state": pending.state,
            "code_challenge": challenge.decode().rstrip("="),
            "code_challenge_method": "S256",
            "access_type": "offline",  # a refresh token, so the gateway keeps working for months
            "prompt": "consent",  # Google sends a refresh token again only when asked to consent
            "login_hint": login_hint,
        }
        return f"{self.settings.auth_uri}?{urlencode(query)}", pending

    def finish(
        self, client: GoogleClient, pending: PendingGoogleConsent, response: Mapping[str, str]
    ) -> Connected:
        if "error" in response:
            raise ConsentError(f"Google answered {response['error']}")
        if "code" not in response:
            raise ConsentError("the sign-in response carries no authorization code")
        body = {
            "grant_type": "authorization_code",
            "code": response["code"],
            "redirect_uri": pending.redirect_uri,
            "client_id": client.client_id,
            "client_secret": client.client_secret,
            "code_verifier": pending.code_verifier,
        }
        result = self._post_token(body)
        refresh_token = result.get("refresh_token")
        if not refresh_token:
            raise ConsentError("Google returned no refresh token (was access_type=offline lost?)")
        try:
            email = id_token_claims(result.get("id_token", "")).get("email")
        except ValueError as error:
            raise ConsentError(f"Google's answer has no usable id_token: {error}") from error
        if not email:
            raise ConsentError("Google did not say which account consented (no email claim)")
        granted = tuple(str(result.get("scope", " ".join(pending.scopes))).split())
        access = None
        if result.get("access_token"):
            expires_at = time.time() + int(result.get("expires_in", 600))
            access = AccessToken(result["access_token"], expires_at)
        return Connected(email, granted, grant_material(refresh_token, access))

    def _post_token(self, body: dict[str, str]) -> dict[str, Any]:
        try:
            answer = self._session().post(self.settings.token_uri, data=body, timeout=30)
        except requests.RequestException as error:
            raise AuthUnavailable(f"cannot reach Google's token endpoint: {error}") from error
        try:
            result = answer.json()
        except ValueError:
            raise AuthUnavailable(
                f"Google's token endpoint answered {answer.status_code}"
            ) from None
        if answer.status_code >= 500:
            raise AuthUnavailable(f"Google's token endpoint answered {answer.status_code}")
        if "error" in result:
            raise ConsentError(f"{result['error']}: {result.get('error_description', '')}")
        return result

    def refresh(
        self, client: GoogleClient, token: bytes, scopes: list[str], force: bool = False
    ) -> AccessToken:
        """The stored access token while more than ``REFRESH_MARGIN`` of it is left (unless
        ``force``: Gmail refused it), else a newly issued one with the material to store.

        A refresh goes through google-auth with new credentials that hold no access token, so
        it really redeems the refresh token; a refresh token in the answer (Google may rotate
        it) replaces the stored one.
        """
        refresh_token, stored = parse_material(token)
        if not force and stored is not None and stored.expires_at - REFRESH_MARGIN > time.time():
            return stored
        credentials = user_credentials.Credentials(
            token=None,
            refresh_token=refresh_token,
            token_uri=self.settings.token_uri,
            client_id=client.client_id,
            client_secret=client.client_secret,
            scopes=scopes,
        )
        access = self._refresh(credentials)
        material = grant_material(credentials.refresh_token or refresh_token, access)
        return replace(access, new_token=material)

    def service_account(
        self, info: Mapping[str, Any], subject: str, scopes: list[str]
    ) -> AccessToken:
        """Domain-wide delegation: act as ``subject`` with the service account's key."""
        try:
            credentials = service_account.Credentials.from_service_account_info(
                {**info, "token_uri": self.settings.token_uri}, scopes=scopes, subject=subject
            )
        except (ValueError, KeyError) as error:
            raise ReauthRequired(f"the service account key is not usable: {error}") from error
        return self._refresh(credentials)

    def _refresh(self, credentials: Any) -> AccessToken:
        request = google.auth.transport.requests.Request(self._session())
        try:
            credentials.refresh(request)
        except google.auth.exceptions.RefreshError as error:
            if getattr(error, "retryable", False):
                raise AuthUnavailable(f"Google sign-in is unavailable: {error}") from error
            raise ReauthRequired(str(error.args[0]) if error.args else str(error)) from error
        except google.auth.exceptions.TransportError as error:
            raise AuthUnavailable(f"cannot reach Google's token endpoint: {error}") from error
        expiry = credentials.expiry  # google-auth keeps it as a naive UTC datetime
        expires_at = expiry.replace(tzinfo=UTC).timestamp() if expiry else time.time() + 600
        return AccessToken(credentials.token, expires_at)


def grant_material(refresh_token: str, access: AccessToken | None) -> bytes:
    """What a user's Google grant stores (encrypted): the refresh token and the newest access
    token, so that any instance sharing the store can use the access token while it lasts."""
    document: dict[str, Any] = {"refresh_token": refresh_token}
    if access is not None:
        document.update(
            access_token=access.value, expires_at=access.expires_at, issued_at=access.issued_at
        )
    return json.dumps(document).encode("utf-8")


def parse_material(token: bytes) -> tuple[str, AccessToken | None]:
    """(refresh token, stored access token or None) from :func:`grant_material`'s document,
    or from the bare refresh token that earlier versions stored."""
    text = token.decode("utf-8")
    if not text.startswith("{"):
        return text, None
    try:
        document = json.loads(text)
        refresh_token = document["refresh_token"]
        if "access_token" not in document:
            return refresh_token, None
        access = AccessToken(
            document["access_token"],
            float(document["expires_at"]),
            issued_at=float(document["issued_at"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ReauthRequired(f"the stored Google sign-in is not readable: {error}") from error
    return refresh_token, access
