"""``POST /{tenant}/oauth2/v2.0/token``: client authentication and the four grants.

Client authentication follows Entra, which decides per request whether the client is public or
confidential ("Error AADSTS7000218 when a confidential client application authenticates to
Microsoft Entra ID", https://learn.microsoft.com/troubleshoot/entra/entra-id/app-integration/
confidential-client-application-authentication-error-aadsts7000218; "Public client and
confidential client applications", https://learn.microsoft.com/entra/identity-platform/
msal-client-applications):

* a code issued through a redirect URI under the **Web** platform, a refresh token from such a
  sign-in, and client credentials are confidential: the request must carry the app's secret (in
  the body, as MSAL does, or HTTP Basic) or a client assertion signed with a certificate it
  registered, else ``invalid_client`` AADSTS7000218;
* a code issued through a redirect URI under **Mobile and desktop applications**, its refresh
  tokens, and the device code flow are public: PKCE only, and a presented credential is refused
  with AADSTS700025. The device code flow, which has no redirect URI, needs "Allow public client
  flows" on the app; without it Entra wants a credential (AADSTS7000218).

Refresh tokens rotate: every refresh answers a new one. The old one stays valid, as Entra's do
until they expire or are revoked ("Refresh tokens in the Microsoft identity platform",
https://learn.microsoft.com/entra/identity-platform/refresh-tokens: "Refresh tokens replace
themselves with a fresh token upon every use. The Microsoft identity platform doesn't revoke old
refresh tokens when used to fetch new access tokens").
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from .._directory import App
from . import signing
from .authorize import Authorize
from .device import DeviceFlow
from .identity import AadFailure, Identity, origin, required
from .scopes import GRAPH_DEFAULT, ScopeError, parse

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
Grant = Callable[[web.Request, Any, App], web.Response]


def _invalid_client(code: int, description: str) -> AadFailure:
    return AadFailure("invalid_client", code, description, status=401)


class TokenEndpoint:
    def __init__(self, identity: Identity, authorize: Authorize, device: DeviceFlow) -> None:
        self.identity = identity
        self.authorize = authorize
        self._grants: dict[str, Grant] = {
            "authorization_code": authorize.redeem,
            "refresh_token": self._refresh,
            DEVICE_CODE_GRANT: device.redeem,
            "client_credentials": self._client_credentials,
        }

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            self.identity.check_tenant(request.match_info["tenant"])
            form = await request.post()
            basic = _basic_credentials(request)
            client_id = form.get("client_id") or basic[0]
            app = self.identity.app(
                client_id if isinstance(client_id, str) else required(form, "client_id")
            )
            grant_type = required(form, "grant_type")
            grant = self._grants.get(grant_type)
            if grant is None:
                raise AadFailure(
                    "unsupported_grant_type",
                    70003,
                    f"The app requested an unsupported grant type '{grant_type}'.",
                )
            public = self._public_client(form, app, grant_type)
            self._authenticate(request, form, basic[1], app, grant_type, public)
            return grant(request, form, app)
        except ScopeError as error:
            return AadFailure("invalid_scope", error.code, str(error)).response()
        except AadFailure as failure:
            return failure.response()

    def _public_client(self, form: Any, app: App, grant_type: str) -> bool | None:
        """Whether this request comes from a public client; None when its code or refresh token
        is unknown (the grant then refuses it as invalid_grant)."""
        if grant_type == "authorization_code":
            return self.authorize.code_is_public(str(form.get("code", "")), app)
        if grant_type == "refresh_token":
            grant = self.identity.directory.find(
                str(form.get("refresh_token", "")), "refresh", "microsoft"
            )
            return grant.public_client if grant is not None else None
        return grant_type == DEVICE_CODE_GRANT

    def _authenticate(
        self,
        request: web.Request,
        form: Any,
        basic_secret: str | None,
        app: App,
        grant_type: str,
        public: bool | None,
    ) -> None:
        secret = form.get("client_secret") or basic_secret
        assertion = form.get("client_assertion")
        if public is None:
            return
        if public:
            if secret or assertion:
                raise _invalid_client(
                    700025,
                    "Client is public so neither 'client_assertion' nor 'client_secret' should "
                    "be presented.",
                )
            if grant_type != DEVICE_CODE_GRANT or app.allow_public_client_flows:
                return
        elif assertion:
            self._check_assertion(request, form, app, assertion)
            return
        elif secret:
            if app.client_secret is None or not hmac.compare_digest(
                secret.encode(), app.client_secret.encode()
            ):
                raise _invalid_client(
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request "
                    "is the client secret value, not the client secret ID, for a secret added to "
                    f"app '{app.client_id}'.",
                )
            return
        raise _invalid_client(
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or "
            "'client_secret'.",
        )

    def _check_assertion(self, request: web.Request, form: Any, app: App, assertion: str) -> None:
        if form.get("client_assertion_type") != signing.ASSERTION_TYPE:
            raise AadFailure(
                "invalid_request",
                90048,
                f"client_assertion_type must be '{signing.ASSERTION_TYPE}'.",
            )
        # MSAL puts the token endpoint from discovery in ``aud``; either spelling is ours.
        audiences = {
            f"{origin(request)}{request.path}",
            f"{origin(request)}/{self.identity.tenant_id}/oauth2/v2.0/token",
        }
        certificates = self.identity.certificates.get(app.client_id, [])
        now = self.identity.directory.clock()
        try:
            signing.verify_assertion(assertion, app.client_id, audiences, certificates, now)
        except signing.AssertionRefused as refused:
            raise _invalid_client(refused.code, str(refused)) from None

    def _refresh(self, request: web.Request, form: Any, app: App) -> web.Response:
        directory = self.identity.directory
        grant = directory.find(required(form, "refresh_token"), "refresh", "microsoft")
        if grant is None or grant.client_id != app.client_id:
            raise AadFailure(
                "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            )
        if grant.revoked:
            raise AadFailure(
                "invalid_grant",
                50173,
                "The provided grant has expired due to it being revoked, a fresh auth token is "
                "needed. The user might have changed or reset their password.",
            )
        if grant.expired(directory.clock()):
            raise AadFailure(
                "invalid_grant",
                700082,
                "The refresh token has expired due to inactivity. The token was inactive for "
                f"longer than {directory.refresh_lifetime['microsoft']} seconds.",
                suberror="bad_token",
            )
        user = self.identity.user(grant.user or "")
        if user is None:
            raise AadFailure(
                "invalid_grant", 50034, "The user account does not exist in the directory."
            )
        scopes = parse(form.get("scope") or " ".join(sorted(grant.scopes)))
        # Entra answers a refresh with a new refresh token whether or not it was asked again.
        scopes = dataclasses.replace(scopes, oidc=scopes.oidc | {"offline_access"})
        granted = self.identity.permissions(app, user, scopes)
        return self.identity.token_response(
            request, app, user, scopes, granted, public_client=grant.public_client
        )

    def _client_credentials(self, request: web.Request, form: Any, app: App) -> web.Response:
        scope = required(form, "scope")
        if scope.strip().casefold() != GRAPH_DEFAULT:
            raise AadFailure(
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier "
                "(application ID URI).",
            )
        return self.identity.token_response(
            request, app, None, parse(scope), frozenset(app.app_permissions)
        )


def _basic_credentials(request: web.Request) -> tuple[str | None, str | None]:
    """``Authorization: Basic`` with form-encoded id and secret (RFC 6749 §2.3.1)."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None, None
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise _invalid_client(7000216, "The Basic authorization header is malformed.") from None
    client_id, _, secret = decoded.partition(":")
    return unquote(client_id), unquote(secret)
