"""``/{tenant}/oauth2/v2.0/authorize`` and the codes it hands out (auth code + PKCE).

Errors that cannot be trusted to the redirect URI (unknown app, unregistered redirect URI) are
shown as a page, as Entra does; everything else goes back to the app as ``error=...``. The
consent screen's form carries a random, single-use request key that only the page the browser
was served knows, so another site cannot forge an "Accept".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from .._directory import App, User
from . import pages
from .identity import AadFailure, Identity, origin, required
from .scopes import ScopeError, ScopeRequest, parse

CODE_LIFETIME = 600  # Entra's authorization codes live about ten minutes
PENDING_LIFETIME = 600  # how long a consent screen may stay open


@dataclass(frozen=True)
class AuthRequest:
    """A validated authorize request, kept until the user decides."""

    app: App
    redirect_uri: str
    public_client: bool  # the redirect URI is under "Mobile and desktop applications"
    response_mode: str
    scopes: ScopeRequest
    state: str | None
    nonce: str | None
    challenge: str | None
    challenge_method: str
    login_hint: str | None


@dataclass
class AuthCode:
    request: AuthRequest
    user: User
    issued_at: float
    redeemed: bool = False


class _Refused(Exception):
    """An authorize error that goes back to the app as ``error=...&error_description=...``."""

    def __init__(self, error: str, code: int, description: str) -> None:
        super().__init__(description)
        self.params = {"error": error, "error_description": f"AADSTS{code}: {description}"}


class _PageError(Exception):
    """An authorize error shown to the person, because the redirect URI cannot be trusted."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"AADSTS{code}: {description}")


class Authorize:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.codes: dict[str, AuthCode] = {}
        self._pending: dict[str, tuple[AuthRequest, float]] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/{tenant}/oauth2/v2.0/authorize", self.start)
        app.router.add_post("/{tenant}/oauth2/v2.0/authorize", self.decide)

    def _now(self) -> float:
        return self.identity.directory.clock()

    # -- the browser arrives ------------------------------------------------------------------

    async def start(self, request: web.Request) -> web.Response:
        try:
            auth = self._validate(request)
        except _PageError as error:
            return pages.message("Sorry, but we're having trouble signing you in", str(error), 400)
        except _Refused as refused:
            return self._refusal(request, refused)
        mode = self.identity.context.consent
        if mode == "deny":
            return self._finish(auth, _declined().params)
        if mode == "auto":
            user = self._automatic_user(auth)
            if user is not None:
                return self._grant(auth, user)
        key = secrets.token_urlsafe(32)
        self._pending[key] = (auth, self._now() + PENDING_LIFETIME)
        return pages.consent(
            request.path,
            key,
            auth.app.name,
            auth.scopes.resource or sorted(auth.scopes.oidc),
            self.identity.users(),
            auth.login_hint,
        )

    def _validate(self, request: web.Request) -> AuthRequest:
        query = request.query
        tenant = request.match_info["tenant"]
        try:
            self.identity.check_tenant(tenant)
            app = self.identity.app(required(query, "client_id"))
        except AadFailure as failure:
            raise _PageError(failure.code, failure.description) from None
        redirect_uri = query.get("redirect_uri", "")
        public_client = self.identity.redirect_is_public(app, redirect_uri)
        if public_client is None:
            raise _PageError(
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does not match the "
                f"redirect URIs configured for the application '{app.client_id}'.",
            )
        if query.get("response_type") != "code":
            raise _Refused(
                "unsupported_response_type",
                70005,
                f"response_type '{query.get('response_type', '')}' is not supported; "
                "this sandbox implements the authorization code flow.",
            )
        try:
            scopes = parse(query.get("scope", ""))
        except ScopeError as error:
            raise _Refused("invalid_scope", error.code, str(error)) from None
        method = query.get("code_challenge_method", "plain")
        if method not in ("S256", "plain"):
            raise _Refused("invalid_request", 501491, f"Invalid code_challenge_method {method}.")
        return AuthRequest(
            app=app,
            redirect_uri=redirect_uri,
            public_client=public_client,
            response_mode=query.get("response_mode", "query"),
            scopes=scopes,
            state=query.get("state"),
            nonce=query.get("nonce"),
            challenge=query.get("code_challenge"),
            challenge_method=method,
            login_hint=query.get("login_hint"),
        )

    def _refusal(self, request: web.Request, refused: _Refused) -> web.Response:
        """Send a validation error back to the (already validated) redirect URI."""
        query = request.query
        redirect_uri = query["redirect_uri"]
        params = {**refused.params, **({"state": query["state"]} if "state" in query else {})}
        return _redirect(redirect_uri, "&" if "?" in redirect_uri else "?", params)

    def _automatic_user(self, auth: AuthRequest) -> User | None:
        """The login_hint's user, or the only user; None when a person has to choose."""
        if auth.login_hint:
            return self.identity.user(auth.login_hint)
        users = self.identity.users()
        return users[0] if len(users) == 1 else None

    # -- the person decides -------------------------------------------------------------------

    async def decide(self, request: web.Request) -> web.Response:
        if request.headers.get("Origin", origin(request)) != origin(request):
            return pages.message("Request refused", "The form was posted from another site.", 403)
        form = await request.post()
        entry = self._pending.pop(str(form.get("sandbox_request", "")), None)
        if entry is None or entry[1] < self._now():
            return pages.message(
                "Sign-in request expired", "Go back to the application and start again.", 400
            )
        auth = entry[0]
        if form.get("decision") != "accept":
            return self._finish(auth, _declined().params)
        user = self.identity.user(str(form.get("user", "")))
        if user is None:
            return pages.message("Unknown account", "Choose one of the listed accounts.", 400)
        return self._grant(auth, user)

    def _grant(self, auth: AuthRequest, user: User) -> web.Response:
        self.identity.consent(auth.app, user, auth.scopes.permissions)
        try:  # .default needs an earlier consent to stand for
            self.identity.permissions(auth.app, user, auth.scopes)
        except AadFailure as failure:
            refused = _Refused("consent_required", failure.code, failure.description)
            return self._finish(auth, refused.params)
        code = "1.AQ" + secrets.token_urlsafe(48)
        self.codes[code] = AuthCode(auth, user, self._now())
        return self._finish(auth, {"code": code})

    def _finish(self, auth: AuthRequest, params: dict[str, str]) -> web.Response:
        """Hand the result to the app by the response_mode it asked for."""
        if auth.state is not None:
            params = {**params, "state": auth.state}
        if auth.response_mode == "form_post":
            return pages.form_post(auth.redirect_uri, params)
        if auth.response_mode == "fragment":
            return _redirect(auth.redirect_uri, "#", params)
        return _redirect(auth.redirect_uri, "&" if "?" in auth.redirect_uri else "?", params)

    # -- the app redeems the code -------------------------------------------------------------

    def redeem(self, request: web.Request, form: Any, app: App) -> web.Response:
        """``grant_type=authorization_code``: single use, ten minutes, same redirect, PKCE."""
        entry = self.codes.get(required(form, "code"))
        if entry is None or entry.request.app.client_id != app.client_id:
            raise AadFailure(
                "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            )
        if entry.redeemed:
            raise AadFailure(
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid "
                "code or use an existing refresh token.",
            )
        if self._now() > entry.issued_at + CODE_LIFETIME:
            raise AadFailure(
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to "
                "inactivity. Send a new interactive authorization request for this user and "
                "resource.",
            )
        if form.get("redirect_uri") != entry.request.redirect_uri:
            raise AadFailure(
                "invalid_grant",
                70000,
                "The redirect_uri does not match the one used to obtain the authorization code.",
            )
        _check_pkce(entry.request, form.get("code_verifier"))
        entry.redeemed = True
        scopes = parse(form["scope"]) if form.get("scope") else entry.request.scopes
        granted = self.identity.permissions(app, entry.user, scopes)
        return self.identity.token_response(
            request,
            app,
            entry.user,
            scopes,
            granted,
            entry.request.nonce,
            public_client=entry.request.public_client,
        )

    def code_is_public(self, code: str, app: App) -> bool | None:
        """Whether this app's code was issued through a public-client redirect URI (None: no
        such code; the grant refuses it)."""
        entry = self.codes.get(code)
        if entry is None or entry.request.app.client_id != app.client_id:
            return None
        return entry.request.public_client


def _redirect(uri: str, separator: str, params: dict[str, str]) -> web.Response:
    return web.Response(status=302, headers={"Location": f"{uri}{separator}{urlencode(params)}"})


def _declined() -> _Refused:
    return _Refused("access_denied", 65004, "User declined to consent to access the app.")


def _check_pkce(auth: AuthRequest, verifier: object) -> None:
    if auth.challenge is None:
        return
    if not isinstance(verifier, str):
        verifier = ""
    if auth.challenge_method == "S256":
        digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
        expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    else:
        expected = verifier
    if not verifier or not hmac.compare_digest(expected, auth.challenge):
        raise AadFailure(
            "invalid_grant",
            501481,
            "The Code_Verifier does not match the code_challenge supplied in the authorization "
            "request.",
        )
