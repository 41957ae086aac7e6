"""The Microsoft identity platform's shared state: tenant, apps, consents, discovery, tokens.

The endpoints live in :mod:`.authorize`, :mod:`.device` and :mod:`.token`; they all answer
errors through :class:`AadFailure` (one error helper for the service) and mint tokens through
:meth:`Identity.token_response`, so every flow returns the same fields MSAL relies on.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import _errors
from .._directory import App, Directory, User, same_but_port
from .._provider import Context
from . import signing
from .scopes import ScopeRequest

ID_TOKEN_LIFETIME = 3600
NO_STORE = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}
_CLAIMS = ("sub", "iss", "aud", "exp", "iat", "nonce", "preferred_username", "name", "tid", "oid")


class AadFailure(Exception):
    """An error the token or device endpoint answers as AADSTS JSON."""

    def __init__(
        self,
        error: str,
        code: int,
        description: str,
        status: int = 400,
        suberror: str | None = None,
    ) -> None:
        super().__init__(description)
        self.error, self.code, self.description = error, code, description
        self.status, self.suberror = status, suberror

    def response(self) -> web.Response:
        return _errors.aad_error(
            self.status, self.error, self.code, self.description, self.suberror, NO_STORE
        )


def origin(request: web.Request) -> str:
    """The scheme://host:port the client used, for every URL the sandbox hands out."""
    return str(request.url.origin())


def required(form: Any, name: str) -> str:
    value = form.get(name)
    if not isinstance(value, str) or not value:
        raise AadFailure(
            "invalid_request",
            900144,
            f"The request body must contain the following parameter: '{name}'.",
        )
    return value


@dataclass
class Identity:
    """One tenant's sign-in service: who exists, what they consented to, and token minting."""

    context: Context
    tenant_id: str

    def __post_init__(self) -> None:
        # (client_id, user address casefolded) -> delegated permissions the user consented to
        self.consents: dict[tuple[str, str], set[str]] = {}
        self.certificates: dict[str, list[signing.Certificate]] = {}

    @property
    def directory(self) -> Directory:
        return self.context.directory

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self.keys)

    # -- tenants, apps, users ---------------------------------------------------------------

    def tenant_known(self, segment: str) -> bool:
        """A tenant id, ``common``, ``organizations`` or the domain of one of our users."""
        wanted = segment.casefold()
        if wanted in (self.tenant_id, "common", "organizations"):
            return True
        return any(user.address.rsplit("@", 1)[-1].casefold() == wanted for user in self.users())

    def check_tenant(self, segment: str) -> None:
        if not self.tenant_known(segment):
            raise AadFailure(
                "invalid_tenant",
                90002,
                f"Tenant '{segment}' not found. Check to make sure you have the correct tenant "
                "ID and are signing into the correct cloud.",
            )

    def users(self) -> list[User]:
        return [user for user in self.directory.users.values() if user.provider == "microsoft"]

    def user(self, address: str) -> User | None:
        found = self.directory.user(address)
        return found if found is not None and found.provider == "microsoft" else None

    def app(self, client_id: str) -> App:
        found = self.directory.apps.get(client_id)
        if found is None or found.provider != "microsoft":
            raise AadFailure(
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.tenant_id}'. This can happen if the application has not been installed "
                "by the administrator of the tenant or consented to by any user in the tenant. "
                "You may have sent your authentication request to the wrong tenant.",
            )
        return found

    def redirect_is_public(self, app: App, uri: str) -> bool | None:
        """Whether a sign-in through ``uri`` is a public client's (True: the URI is under
        "Mobile and desktop applications") or a Web app's (False); None if it is not registered.

        Entra matches a localhost redirect URI whatever its port ("Redirect URI (reply URL)
        outline and restrictions", localhost exceptions). A URI under both platforms counts as
        Web, the stricter reading: Entra then picks one of them arbitrarily.
        """
        if any(same_but_port(uri, registered) for registered in app.redirect_uris):
            return False
        if any(same_but_port(uri, registered) for registered in app.public_client_redirect_uris):
            return True
        return None

    # -- consent ------------------------------------------------------------------------------

    def consent(self, app: App, user: User, permissions: frozenset[str]) -> None:
        self.consents.setdefault((app.client_id, user.address.casefold()), set()).update(
            permissions
        )

    def permissions(self, app: App, user: User, scopes: ScopeRequest) -> frozenset[str]:
        """What a delegated token for ``scopes`` carries; refuses scopes never consented."""
        consented = frozenset(self.consents.get((app.client_id, user.address.casefold()), ()))
        wanted = consented if scopes.default else scopes.permissions
        missing = wanted - consented
        if missing or (scopes.default and not consented):
            raise AadFailure(
                "invalid_grant",
                65001,
                f"The user or administrator has not consented to use the application with ID "
                f"'{app.client_id}' named '{app.name}'. Send an interactive authorization "
                f"request for this user and resource. Missing: {' '.join(sorted(missing))}",
                suberror="consent_required",
            )
        return wanted

    # -- discovery ----------------------------------------------------------------------------

    async def discovery(self, request: web.Request) -> web.Response:
        segment = request.match_info["tenant"]
        try:
            self.check_tenant(segment)
        except AadFailure as failure:
            return failure.response()
        base = origin(request)
        # Multi-tenant aliases keep their name; a domain resolves to the tenant's GUID.
        path = segment if segment.casefold() in ("common", "organizations") else self.tenant_id
        issuer_tenant = self.tenant_id if path == self.tenant_id else "{tenantid}"
        return web.json_response(
            {
                "token_endpoint": f"{base}/{path}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{base}/{path}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{base}/{issuer_tenant}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{base}/{path}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/{path}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{base}/{path}/oauth2/v2.0/logout",
                "claims_supported": list(_CLAIMS),
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            }
        )

    async def keys(self, request: web.Request) -> web.Response:
        return web.json_response(signing.jwks())

    # -- tokens -------------------------------------------------------------------------------

    def token_response(
        self,
        request: web.Request,
        app: App,
        user: User | None,
        scopes: ScopeRequest,
        granted: frozenset[str],
        nonce: str | None = None,
        public_client: bool = False,
    ) -> web.Response:
        """Mint tokens the way Entra answers: RT only with offline_access, id_token with openid.
        ``public_client``: the refresh token must later be redeemed without a credential."""
        directory = self.directory
        access = directory.issue(
            "access", "microsoft", app.client_id, user.address if user else None, granted
        )
        lifetime = int(access.expires_at - directory.clock())
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": scopes.echo,
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access.token,
        }
        if user is not None:
            if "offline_access" in scopes.oidc:
                refresh = directory.issue(
                    "refresh",
                    "microsoft",
                    app.client_id,
                    user.address,
                    granted,
                    prefix="1.A",
                    public_client=public_client,
                )
                body["refresh_token"] = refresh.token
            if "openid" in scopes.oidc:
                body["id_token"] = self.id_token(request, app, user, nonce)
            body["client_info"] = signing.b64url(
                json.dumps({"uid": user.id, "utid": self.tenant_id}).encode()
            )
        return web.json_response(body, headers=NO_STORE)

    def id_token(self, request: web.Request, app: App, user: User, nonce: str | None) -> str:
        now = int(self.directory.clock())
        claims: dict[str, Any] = {
            "aud": app.client_id,
            "iss": f"{origin(request)}/{self.tenant_id}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + ID_TOKEN_LIFETIME,
            "name": user.display_name,
            "oid": user.id,
            "preferred_username": user.address,
            # Entra's sub is pairwise: stable per user *and* app.
            "sub": signing.b64url(uuid.uuid5(uuid.UUID(user.id), app.client_id).bytes),
            "tid": self.tenant_id,
            "ver": "2.0",
        }
        if nonce:
            claims["nonce"] = nonce
        return signing.sign(claims)
