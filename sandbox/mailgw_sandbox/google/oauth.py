"""Google OAuth 2.0: authorize (with an account chooser/consent page), token, device code, revoke.

Follows what google_auth_oauthlib and google-auth actually send (provider-apis.md C3): the code
exchange authenticates the client with HTTP Basic, the refresh with body parameters, so both are
accepted. Error bodies and wording are Google's, because the gateway classifies errors by them.

Redirect URIs follow the client type. A "Web application" client redirects only to the URIs
registered for it, matched exactly ("Using OAuth 2.0 for Web Server Applications",
https://developers.google.com/identity/protocols/oauth2/web-server, redirect URI validation). A
"Desktop app" client registers none and redirects only to a loopback address on any port
("OAuth 2.0 for Mobile & Desktop Apps", https://developers.google.com/identity/protocols/oauth2/
native-app, loopback IP address); a gateway reached at a real host name therefore needs a Web
application client.

Granted scopes are answered in Google's own spelling: a consent for ``email`` / ``profile`` comes
back in the redirect and in the token response as ``https://www.googleapis.com/auth/
userinfo.email`` / ``userinfo.profile`` (google/oauth2l#88 shows such a token's scope;
provider-apis.md, "Google scope aliases"), so clients must compare scopes through the aliases.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import unquote_plus, urlencode

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from .._directory import App, Directory, User, is_loopback
from .._errors import google_oauth_error
from .._provider import Context
from . import jws, scopes
from .pages import CONSENT_PATH, consent_page, error_page
from .serviceaccounts import AssertionRejected, ServiceAccounts

AUTHORIZE_PATHS = ("/o/oauth2/v2/auth", "/o/oauth2/auth")
TOKEN_PATH = "/token"  # noqa: S105 - a URL path, not a secret
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ISSUER = "https://accounts.google.com"
_BEARER = "Bearer"
CODE_LIFETIME = 600
PENDING_LIFETIME = 3600
DEVICE_CODE_LIFETIME = 1800
_NO_STORE = {
    "Cache-Control": "no-cache, no-store, max-age=0, must-revalidate",
    "Pragma": "no-cache",
}

Form = Mapping[str, Any]


class OAuthError(Exception):
    """A refused OAuth request, with Google's error code and wording."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status

    def response(self) -> web.Response:
        """The token and device endpoints' flat ``{"error", "error_description"}``."""
        return google_oauth_error(self.status, self.error, self.description, _NO_STORE)

    def page(self) -> web.Response:
        """At authorize, a broken request gets an error page: there is no one to redirect to."""
        return error_page(self.status, self.error, self.description)


@dataclass(frozen=True)
class AuthRequest:
    """A validated ``/o/oauth2/v2/auth`` request, waiting for an account and a decision."""

    client: App
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str | None
    challenge: str | None
    challenge_method: str
    offline: bool
    prompt: frozenset[str]
    login_hint: str | None
    nonce: str | None
    include_granted: bool
    expires_at: float


@dataclass(frozen=True)
class AuthCode:
    request: AuthRequest
    user: User
    scopes: tuple[str, ...]  # granted, in the order requested
    with_refresh: bool
    expires_at: float


def origin(request: web.Request) -> str:
    """The origin the client used, so URLs we mint (token_uri, Location) point back here."""
    return f"{request.scheme}://{request.host}"


class GoogleOAuth:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.service_accounts = ServiceAccounts()
        self._pending: dict[str, AuthRequest] = {}
        self._codes: dict[str, AuthCode] = {}
        # Every token maps to the set of tokens from the same consent, because revoking any of
        # them revokes all of them at Google.
        self._families: dict[str, set[str]] = {}

    @property
    def directory(self) -> Directory:
        return self.context.directory

    @cached_property
    def _signing_key(self) -> rsa.RSAPrivateKey:
        """Made on first use: most sandboxes never issue an id_token."""
        return jws.new_key()

    def add_routes(self, app: web.Application) -> None:
        for path in AUTHORIZE_PATHS:
            app.router.add_get(path, self.authorize)
        app.router.add_post(CONSENT_PATH, self.consent)
        app.router.add_post(TOKEN_PATH, self.token)
        app.router.add_post("/device/code", self.device_code)
        app.router.add_post("/revoke", self.revoke)

    # --- authorize ---------------------------------------------------------------------------

    async def authorize(self, request: web.Request) -> web.Response:
        try:
            auth = self._parse_authorize(request.query)
        except OAuthError as error:
            return error.page()
        if self.context.consent == "deny":
            return _redirect(auth, {"error": "access_denied"})
        accounts = [u for u in self.directory.users.values() if u.provider == "google"]
        if not accounts:
            return error_page(400, "access_denied", "There is no Google account in the sandbox.")
        hinted = self._hinted_user(auth)
        if self.context.consent == "auto":
            user = hinted or (accounts[0] if len(accounts) == 1 else None)
            if user is not None:
                return self._grant(auth, user)
        request_id = secrets.token_urlsafe(32)
        self._pending[request_id] = auth
        return consent_page(
            request_id,
            auth.client.name,
            auth.scopes,
            accounts,
            hinted.address if hinted else None,
        )

    def _parse_authorize(self, query: Mapping[str, str]) -> AuthRequest:
        client = self.directory.apps.get(query.get("client_id", ""))
        if client is None or client.provider != "google":
            raise OAuthError("invalid_client", "The OAuth client was not found.", 401)
        redirect_uri = query.get("redirect_uri", "")
        if not _allows_redirect(client, redirect_uri):
            raise OAuthError(
                "redirect_uri_mismatch",
                "You can't sign in to this app because it doesn't comply with Google's OAuth 2.0 "
                f"policy. Request details: redirect_uri={redirect_uri}",
            )
        if query.get("response_type") != "code":
            raise OAuthError(
                "unsupported_response_type",
                f"Invalid response_type: {query.get('response_type', '')}",
            )
        requested = tuple(dict.fromkeys(query.get("scope", "").split()))
        _check_scopes(requested)
        requested = _as_granted(requested)
        challenge = query.get("code_challenge") or None
        method = query.get("code_challenge_method", "plain")
        if challenge is not None and method not in ("S256", "plain"):
            raise OAuthError("invalid_request", "Invalid code_challenge_method value.")
        access_type = query.get("access_type", "online")
        if access_type not in ("online", "offline"):
            raise OAuthError("invalid_request", f"Invalid access_type: {access_type}")
        return AuthRequest(
            client=client,
            redirect_uri=redirect_uri,
            scopes=requested,
            state=query.get("state"),
            challenge=challenge,
            challenge_method=method,
            offline=access_type == "offline",
            prompt=frozenset(query.get("prompt", "").split()),
            login_hint=query.get("login_hint"),
            nonce=query.get("nonce"),
            include_granted=query.get("include_granted_scopes") == "true",
            expires_at=self.directory.clock() + PENDING_LIFETIME,
        )

    def _hinted_user(self, auth: AuthRequest) -> User | None:
        user = self.directory.user(auth.login_hint) if auth.login_hint else None
        return user if user is not None and user.provider == "google" else None

    async def consent(self, request: web.Request) -> web.Response:
        """The consent form's POST. The pending request is single-use and never leaves the
        server, so only the page we rendered can answer it."""
        form = await request.post()
        sender = request.headers.get("Origin")
        if sender is not None and sender != origin(request):
            return error_page(403, "invalid_request", "Cross-site form posts are refused.")
        auth = self._pending.pop(str(form.get("request", "")), None)
        if auth is None or auth.expires_at <= self.directory.clock():
            return error_page(
                400, "invalid_request", "This sign-in request expired or was already answered."
            )
        if form.get("decision") != "allow":
            return _redirect(auth, {"error": "access_denied"})
        user = self.directory.user(str(form.get("account", "")))
        if user is None or user.provider != "google":
            return error_page(400, "invalid_request", "Choose one of the listed accounts.")
        return self._grant(auth, user)

    def _grant(self, auth: AuthRequest, user: User) -> web.Response:
        previous = self._previous_grants(auth.client.client_id, user)
        granted = auth.scopes
        if auth.include_granted:
            granted += tuple(sorted(set().union(*previous) - set(auth.scopes)))
        code = "4/0A" + secrets.token_urlsafe(48)
        self._codes[code] = AuthCode(
            request=auth,
            user=user,
            scopes=granted,
            with_refresh=auth.offline and ("consent" in auth.prompt or not previous),
            expires_at=self.directory.clock() + CODE_LIFETIME,
        )
        prompt = "consent" if "consent" in auth.prompt or not previous else "none"
        return _redirect(
            auth, {"code": code, "scope": " ".join(granted), "authuser": "0", "prompt": prompt}
        )

    def _previous_grants(self, client_id: str, user: User) -> list[frozenset[str]]:
        """Scopes of the live refresh tokens this user already gave this client."""
        now = self.directory.clock()
        return [
            grant.scopes
            for grant in self.directory.grants.values()
            if grant.kind == "refresh"
            and grant.provider == "google"
            and grant.client_id == client_id
            and grant.user == user.address
            and not grant.revoked
            and not grant.expired(now)
        ]

    # --- token -------------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            body = self._token(request, form)
        except OAuthError as error:
            return error.response()
        return web.json_response(body, headers=_NO_STORE)

    def _token(self, request: web.Request, form: Form) -> dict[str, Any]:
        grant_type = str(form.get("grant_type", ""))
        if grant_type == JWT_BEARER:
            return self._jwt_grant(request, form)
        client = self._authenticate_client(request, form)
        if grant_type == "authorization_code":
            return self._code_grant(client, form)
        if grant_type == "refresh_token":
            return self._refresh_grant(client, form)
        raise OAuthError("unsupported_grant_type", f"Invalid grant_type: {grant_type}")

    def _authenticate_client(self, request: web.Request, form: Form) -> App:
        client_id, secret = _basic_credentials(request) or (
            form.get("client_id"),
            form.get("client_secret"),
        )
        if not client_id:
            raise OAuthError("invalid_request", "Could not determine client ID from request.")
        client = self.directory.apps.get(str(client_id))
        if client is None or client.provider != "google":
            raise OAuthError("invalid_client", "The OAuth client was not found.", 401)
        if client.client_secret is not None:
            if not secret:
                raise OAuthError("invalid_request", "client_secret is missing.")
            if not hmac.compare_digest(str(secret), client.client_secret):
                raise OAuthError("invalid_client", "Unauthorized", 401)
        return client

    def _code_grant(self, client: App, form: Form) -> dict[str, Any]:
        code = str(form.get("code", ""))
        if not code:
            raise OAuthError("invalid_request", "Missing required parameter: code")
        issued = self._codes.pop(code, None)  # single use, even when the exchange then fails
        if (
            issued is None
            or issued.request.client.client_id != client.client_id
            or issued.expires_at <= self.directory.clock()
        ):
            raise OAuthError("invalid_grant", "Bad Request")
        if form.get("redirect_uri") != issued.request.redirect_uri:
            raise OAuthError("redirect_uri_mismatch", "Bad Request")
        _check_pkce(issued.request, form.get("code_verifier"))
        return self._issue(
            client.client_id,
            issued.user,
            issued.scopes,
            with_refresh=issued.with_refresh,
            nonce=issued.request.nonce,
        )

    def _refresh_grant(self, client: App, form: Form) -> dict[str, Any]:
        token = str(form.get("refresh_token", ""))
        if not token:
            raise OAuthError("invalid_request", "Missing required parameter: refresh_token")
        grant = self.directory.find(token, "refresh", "google")
        now = self.directory.clock()
        if (
            grant is None
            or grant.revoked
            or grant.expired(now)
            or grant.client_id != client.client_id
            or grant.user is None
        ):
            raise OAuthError("invalid_grant", "Token has been expired or revoked.")
        user = self.directory.user(grant.user)
        if user is None:
            raise OAuthError("invalid_grant", "Token has been expired or revoked.")
        requested = _as_granted(tuple(dict.fromkeys(str(form.get("scope", "")).split())))
        if not set(requested) <= grant.scopes:
            raise OAuthError("invalid_scope", "Bad Request")
        return self._issue(
            client.client_id, user, requested or tuple(sorted(grant.scopes)), family_of=token
        )

    def _jwt_grant(self, request: web.Request, form: Form) -> dict[str, Any]:
        assertion = str(form.get("assertion", ""))
        if not assertion:
            raise OAuthError("invalid_request", "Missing required parameter: assertion")
        now = self.directory.clock()
        try:
            verified = self.service_accounts.verify(assertion, origin(request) + TOKEN_PATH, now)
        except AssertionRejected as error:
            raise OAuthError(error.error, error.description, error.status) from None
        address = None
        if verified.subject is not None:
            user = self.directory.user(verified.subject)
            if user is None or user.provider != "google":
                raise OAuthError("invalid_grant", "Invalid email or User ID")
            address = user.address
        access = self.directory.issue(
            "access", "google", verified.account.client_id, address, verified.scopes, "ya29.c."
        )
        self._families[access.token] = {access.token}
        return {
            "access_token": access.token,
            "expires_in": self.directory.access_lifetime["google"],
            "token_type": _BEARER,
        }

    def _issue(
        self,
        client_id: str,
        user: User,
        granted: tuple[str, ...],
        with_refresh: bool = False,
        family_of: str | None = None,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        """A token response in Google's field order; ``scope`` echoes the grant exactly."""
        access = self.directory.issue("access", "google", client_id, user.address, granted, "ya29.")
        family = self._families.get(family_of, set()) if family_of else set()
        family.add(access.token)
        body: dict[str, Any] = {
            "access_token": access.token,
            "expires_in": self.directory.access_lifetime["google"],
        }
        if with_refresh:
            refresh = self.directory.issue(
                "refresh", "google", client_id, user.address, granted, "1//0"
            )
            family.add(refresh.token)
            body["refresh_token"] = refresh.token
        for token in family:
            self._families[token] = family
        body["scope"] = " ".join(granted)
        body["token_type"] = _BEARER
        if "openid" in granted:
            body["id_token"] = self._id_token(client_id, user, granted, nonce)
        return body

    def _id_token(
        self, client_id: str, user: User, granted: tuple[str, ...], nonce: str | None
    ) -> str:
        now = int(self.directory.clock())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "azp": client_id,
            "aud": client_id,
            "sub": user.id,
            "iat": now,
            "exp": now + 3600,
        }
        if scopes.EMAIL & set(granted):
            claims.update(email=user.address, email_verified=True)
        if scopes.PROFILE & set(granted):
            claims["name"] = user.display_name
        if nonce:
            claims["nonce"] = nonce
        return jws.sign(self._signing_key, claims, key_id="sandbox")

    # --- device code and revoke -----------------------------------------------------------------

    async def device_code(self, request: web.Request) -> web.Response:
        """Google's limited-input flow refuses every Gmail scope before any user interaction
        (provider-apis.md C4). Other scopes get a device code; approving it is not emulated."""
        form = await request.post()
        client = self.directory.apps.get(str(form.get("client_id", "")))
        if client is None or client.provider != "google":
            return OAuthError("invalid_client", "The OAuth client was not found.", 401).response()
        requested = str(form.get("scope", "")).split()
        banned = [scope for scope in requested if scope in scopes.GMAIL]
        try:
            if banned:
                raise OAuthError("invalid_scope", f"Invalid device flow scope: {' '.join(banned)}")
            _check_scopes(tuple(requested))
        except OAuthError as error:
            return error.response()
        return web.json_response(
            {
                "device_code": "AH-1" + secrets.token_urlsafe(40),
                "user_code": "-".join(secrets.token_hex(2).upper() for _ in range(3)),
                "expires_in": DEVICE_CODE_LIFETIME,
                "interval": 5,
                "verification_url": origin(request) + "/device",
            },
            headers=_NO_STORE,
        )

    async def revoke(self, request: web.Request) -> web.Response:
        """Revoking any token of a consent revokes the whole consent (access and refresh)."""
        form = await request.post()
        token = str(form.get("token") or request.query.get("token", ""))
        grant = self.directory.grants.get(token)
        now = self.directory.clock()
        if grant is None or grant.provider != "google" or grant.revoked or grant.expired(now):
            return google_oauth_error(400, "invalid_token", "Token expired or revoked")
        for member in self._families.get(token, {token}):
            self.directory.revoke_token(member)
        return web.json_response({})


def _allows_redirect(client: App, uri: str) -> bool:
    """A Desktop app client: any loopback redirect; a Web application: a registered one."""
    if client.desktop:
        return is_loopback(uri)
    return uri in client.redirect_uris


# The identity scopes' short names and the spelling Google answers for them.
_GRANTED_AS = {"email": scopes.AUTH + "userinfo.email", "profile": scopes.AUTH + "userinfo.profile"}


def _as_granted(requested: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_GRANTED_AS.get(scope, scope) for scope in requested))


def _check_scopes(requested: tuple[str, ...]) -> None:
    if not requested:
        raise OAuthError("invalid_request", "Missing required parameter: scope")
    unknown = [scope for scope in requested if scope not in scopes.KNOWN]
    if unknown:
        raise OAuthError(
            "invalid_scope",
            f"Some requested scopes were invalid. {{invalid=[{', '.join(unknown)}]}}",
        )


def _check_pkce(auth: AuthRequest, verifier: object) -> None:
    if auth.challenge is None:
        return
    if not verifier:
        raise OAuthError("invalid_grant", "Missing code verifier.")
    expected = str(verifier)
    if auth.challenge_method == "S256":
        expected = jws.b64url_encode(hashlib.sha256(expected.encode()).digest())
    if not hmac.compare_digest(expected, auth.challenge):
        raise OAuthError("invalid_grant", "Invalid code verifier.")


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, _, secret = decoded.partition(":")
    return unquote_plus(client_id), unquote_plus(secret)


def _redirect(auth: AuthRequest, params: dict[str, str]) -> web.Response:
    if auth.state is not None:
        params = {"state": auth.state, **params}
    separator = "&" if "?" in auth.redirect_uri else "?"
    location = f"{auth.redirect_uri}{separator}{urlencode(params)}"
    return web.Response(status=302, headers={"Location": location, **_NO_STORE})
