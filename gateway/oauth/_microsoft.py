"""Microsoft sign-in through MSAL: auth code + PKCE, device code, silent refresh, app-only.

MSAL is synchronous (requests underneath); the broker calls these methods in a worker thread.
A new MSAL application object is built per operation: MSAL caches error responses per
application (a 503 is replayed for its Retry-After without asking the server again), and a
fresh object is the documented way to make the next attempt real. The token cache, which holds
the refresh token, is serialised and handed back to the caller to store encrypted.

The app declares the client capability ``CP1``: it handles claims challenges, so Entra may give
it continuous-access-evaluation tokens, which Graph revokes at once (HTTP 401 with
``error="insufficient_claims"``) on a password reset, an account disabled or an admin's
revocation, instead of honouring them until they expire. The broker answers such a 401 with a
forced refresh that carries the challenge (Microsoft: "How to use Continuous Access Evaluation
enabled APIs in your applications", "Claims challenges, claims requests and client
capabilities").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..config import MicrosoftSettings
from ._errors import AuthUnavailable, ConsentError, ReauthRequired
from ._tokens import AccessToken, Connected

# Hosts MSAL knows; for any other (sovereign proxies, the sandbox) instance discovery would call
# login.microsoftonline.com and fail offline, so it is turned off.
_MICROSOFT_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "login.microsoftonline.us",
        "login.partner.microsoftonline.cn",
        "login.chinacloudapi.cn",
    }
)
# Errors that say "try again later" (RFC 6749 §4.1.2.1; Entra answers 503 so).
_TEMPORARY_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
# Errors after which only a person can help: the grant is gone or needs interaction.
CLIENT_CAPABILITIES = ["CP1"]  # "this client can handle claims challenges" (CAE)
_REAUTH_ERRORS = frozenset(
    {
        "invalid_grant",
        "interaction_required",
        "consent_required",
        "login_required",
        "invalid_client",
        "unauthorized_client",
    }
)


class MicrosoftAuth:
    def __init__(
        self, settings: MicrosoftSettings, session: Callable[[], requests.Session]
    ) -> None:
        self.settings = settings
        self._session = session

    @property
    def authority(self) -> str:
        return f"{self.settings.authority_host.rstrip('/')}/{self.settings.tenant}"

    def _app(
        self, cache: msal.SerializableTokenCache | None = None, public: bool = False
    ) -> msal.ClientApplication:
        """``public``: the device code flow, which Entra runs as a public client (the app needs
        "Allow public client flows") and MSAL offers on public client applications only."""
        host = urlsplit(self.settings.authority_host).hostname or ""
        common: dict[str, Any] = {
            "authority": self.authority,
            "token_cache": cache,
            "http_client": self._session(),
            "instance_discovery": host in _MICROSOFT_HOSTS,
            "client_capabilities": CLIENT_CAPABILITIES,
        }
        try:
            credential = None if public else self._credential()
            if credential is None:
                return msal.PublicClientApplication(self.settings.client_id, **common)
            return msal.ConfidentialClientApplication(
                self.settings.client_id, client_credential=credential, **common
            )
        except (requests.RequestException, ValueError, msal.exceptions.MsalServiceError) as error:
            # MSAL reads the discovery document in the constructor; an HTTP error there is
            # MsalServiceError ("HTTP Error: 503"), not a result dict.
            message = f"cannot reach Microsoft sign-in at {self.authority}: {error}"
            raise AuthUnavailable(message) from error

    def _credential(self) -> str | dict[str, str] | None:
        """The app's credential: a certificate (preferred, MSAL signs an assertion), a secret,
        or None for a public client."""
        if self.settings.client_certificate is not None:
            return _certificate_credential(self.settings.client_certificate.read_bytes())
        if self.settings.client_secret is not None:
            return self.settings.client_secret.value
        return None

    def start(self, scopes: list[str], redirect_uri: str, login_hint: str) -> dict[str, Any]:
        """Begin auth code + PKCE; the returned flow holds ``auth_uri`` and must be kept."""
        flow = self._app().initiate_auth_code_flow(
            scopes,
            redirect_uri=redirect_uri,
            login_hint=login_hint,
            prompt="select_account",
            # The code arrives in a POST body, not in a URL that browsers keep in history and
            # proxies log (RFC 9700 §4.3.1).
            response_mode="form_post",
        )
        if "auth_uri" not in flow:
            raise ConsentError(_describe(flow))
        return flow

    def finish(self, flow: dict[str, Any], response: Mapping[str, str]) -> Connected:
        cache = msal.SerializableTokenCache()
        app = self._app(cache)
        try:
            result = app.acquire_token_by_auth_code_flow(flow, dict(response))
        except ValueError as error:  # MSAL's state check
            message = f"the sign-in response does not match this sign-in: {error}"
            raise ConsentError(message) from error
        except (requests.RequestException, msal.exceptions.MsalServiceError) as error:
            raise AuthUnavailable(f"Microsoft sign-in is unavailable: {error}") from error
        return _connected(result, cache)

    def start_device_flow(self, scopes: list[str]) -> dict[str, Any]:
        flow = self._app(public=True).initiate_device_flow(scopes)
        if "user_code" not in flow:
            raise ConsentError(_describe(flow))
        return flow

    def finish_device_flow(self, flow: dict[str, Any]) -> Connected:
        cache = msal.SerializableTokenCache()
        try:
            result = self._app(cache, public=True).acquire_token_by_device_flow(flow)
        except (requests.RequestException, msal.exceptions.MsalServiceError) as error:
            raise AuthUnavailable(f"Microsoft sign-in is unavailable: {error}") from error
        return _connected(result, cache)

    def refresh(
        self,
        token: bytes,
        principal: str,
        scopes: list[str],
        force: bool = False,
        claims: str | None = None,
    ) -> AccessToken:
        """A valid access token from the stored cache, refreshing (and rotating) as needed.

        ``force`` skips the cached access token (which the resource refused) and redeems the
        refresh token; ``claims`` is the resource's decoded claims challenge, sent along.
        """
        cache = msal.SerializableTokenCache()
        cache.deserialize(token.decode("utf-8"))
        app = self._app(cache)
        accounts = app.get_accounts(username=principal)
        if not accounts:
            raise ReauthRequired("no stored sign-in for this mailbox")
        try:
            result = app.acquire_token_silent_with_error(
                scopes, accounts[0], force_refresh=force, claims_challenge=claims
            )
        except (requests.RequestException, msal.exceptions.MsalServiceError) as error:
            raise AuthUnavailable(f"Microsoft sign-in is unavailable: {error}") from error
        if result is None:
            raise ReauthRequired("the stored sign-in holds no usable refresh token")
        new_token = cache.serialize().encode("utf-8") if cache.has_state_changed else None
        return _access(result, new_token)

    def app_only(self, claims: str | None = None) -> AccessToken:
        """Client credentials: the application's own permissions, for any mailbox of the tenant.

        Always a new token request: the application object (and its token cache) is new.
        """
        if self._credential() is None:
            raise ReauthRequired(
                "app-only access needs microsoft.client_secret or client_certificate in the config"
            )
        try:
            result = self._app().acquire_token_for_client(
                ["https://graph.microsoft.com/.default"], claims_challenge=claims
            )
        except (requests.RequestException, msal.exceptions.MsalServiceError) as error:
            raise AuthUnavailable(f"Microsoft sign-in is unavailable: {error}") from error
        return _access(result, None)


def _certificate_credential(pem: bytes) -> dict[str, str]:
    """MSAL's certificate credential from one PEM file holding the key and the certificate.

    Giving MSAL the public certificate (not only a SHA-1 thumbprint) makes it sign with PS256
    and send the SHA-256 thumbprint, as Entra now prefers.
    """
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        certificates = x509.load_pem_x509_certificates(pem)
    except (ValueError, TypeError) as error:
        raise ReauthRequired(f"microsoft.client_certificate is not usable: {error}") from error
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    certificate_pem = certificates[0].public_bytes(serialization.Encoding.PEM).decode("ascii")
    return {"private_key": key_pem, "public_certificate": certificate_pem}


def _describe(result: Mapping[str, Any]) -> str:
    error = result.get("error", "unknown_error")
    description = str(result.get("error_description", "")).split("\r\n")[0]
    return f"{error}: {description}" if description else str(error)


def _check(result: Mapping[str, Any]) -> None:
    if "access_token" in result:
        return
    error = result.get("error")
    if error in _REAUTH_ERRORS:
        raise ReauthRequired(_describe(result))
    raise AuthUnavailable(_describe(result))


def _access(result: Mapping[str, Any], new_token: bytes | None) -> AccessToken:
    _check(result)
    expires_at = time.time() + int(result.get("expires_in", 600))
    return AccessToken(result["access_token"], expires_at, new_token)


def _connected(result: Mapping[str, Any], cache: msal.SerializableTokenCache) -> Connected:
    if result.get("error") in _TEMPORARY_ERRORS:
        raise AuthUnavailable(_describe(result))
    if "error" in result:
        raise ConsentError(_describe(result))
    claims = result.get("id_token_claims") or {}
    principal = claims.get("preferred_username") or claims.get("upn")
    if not principal:
        raise ConsentError("Microsoft did not say which account signed in (no id_token)")
    scope = result.get("scope", "")
    scopes = tuple(scope.split() if isinstance(scope, str) else scope)
    return Connected(principal, scopes, cache.serialize().encode("utf-8"))
