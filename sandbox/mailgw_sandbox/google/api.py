"""What every Gmail API call goes through: bearer token, scope, ``userId``, query parameters.

Each check fails the way Google's front end fails (status, ``reason``, wording, headers), because
the gateway decides between "refresh and retry", "re-consent" and "give up" from exactly these.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .._directory import Directory, Grant, User
from .._errors import google_api_error
from . import scopes
from .mailstore import GmailStore, Mailbox

# Accepted on every Google API call (provider-apis.md D); ``fields`` is accepted but not applied.
STANDARD_PARAMS = frozenset(
    {
        "$.xgafv",
        "access_token",
        "alt",
        "callback",
        "fields",
        "key",
        "oauth_token",
        "prettyPrint",
        "quotaUser",
        "upload_protocol",
        "uploadType",
    }
)
_REALM = 'Bearer realm="https://accounts.google.com/"'
NOT_FOUND = "Requested entity was not found."


class GmailError(Exception):
    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        headers: dict[str, str] | None = None,
        location: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers
        self.location = location

    def response(self) -> web.Response:
        return google_api_error(self.status, self.reason, self.message, self.headers, self.location)


def invalid(message: str) -> GmailError:
    return GmailError(400, "invalidArgument", message)


@dataclass(frozen=True)
class Caller:
    """An authenticated call: whose mailbox, with which grant."""

    user: User
    grant: Grant
    mailbox: Mailbox

    @property
    def metadata_only(self) -> bool:
        return scopes.metadata_only(self.grant.scopes)


Handler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


class Gate:
    """Wraps handlers with authentication, scope and parameter checks."""

    def __init__(self, directory: Directory, store: GmailStore) -> None:
        self.directory = directory
        self.store = store

    def endpoint(
        self, method: str, handler: Handler, params: Collection[str] = ()
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``method`` names the Gmail method (for its scopes); ``params`` its own query params."""
        allowed = STANDARD_PARAMS | frozenset(params)

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                caller = self.authenticate(request, method)
                check_params(request, allowed)
                return await handler(request, caller)
            except GmailError as error:
                return error.response()

        return handle

    def authenticate(self, request: web.Request, method: str) -> Caller:
        grant = self._grant(request)
        allowed = scopes.METHOD_SCOPES[method]
        if not grant.scopes & allowed:
            challenge = f'{_REALM}, error="insufficient_scope", scope="{" ".join(sorted(allowed))}"'
            raise GmailError(
                403,
                "insufficientPermissions",
                "Request had insufficient authentication scopes.",
                {"WWW-Authenticate": challenge},
            )
        user = self.directory.user(grant.user) if grant.user else None
        if user is None:  # a service account's own token: it has no mailbox
            raise GmailError(400, "failedPrecondition", "Precondition check failed.")
        user_id = request.match_info["userId"]
        if user_id != "me" and self.directory.user_by_id("google", user_id) is not user:
            raise GmailError(403, "forbidden", f"Delegation denied for {user_id}")
        return Caller(user, grant, self.store.mailbox(user))

    def _grant(self, request: web.Request) -> Grant:
        token = bearer_token(request)
        if not token:
            raise GmailError(
                401,
                "required",
                "Request is missing required authentication credential. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential. See "
                "https://developers.google.com/identity/sign-in/web/devconsole-project.",
                {"WWW-Authenticate": _REALM},
                location="Authorization",
            )
        grant = self.directory.find(token, "access", "google")
        if grant is None or grant.revoked or grant.expired(self.directory.clock()):
            raise GmailError(
                401,
                "authError",
                "Invalid Credentials",
                {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
                location="Authorization",
            )
        return grant


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query.get("access_token") or request.query.get("oauth_token")


def check_params(request: web.Request, allowed: Collection[str]) -> None:
    for name in request.query:
        if name not in allowed:
            raise invalid(
                f'Invalid JSON payload received. Unknown name "{name}": Cannot bind query '
                f"parameter. Field '{name}' could not be found in request message."
            )


def uint_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    """An unsigned integer query parameter; Google clamps large page sizes silently."""
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise invalid(f"Invalid value at '{name}' (TYPE_UINT32), \"{text}\"")
    return min(int(text), maximum)


def bool_param(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "false").lower()
    if text not in ("true", "false"):
        raise invalid(f"Invalid value at '{name}' (TYPE_BOOL), \"{text}\"")
    return text == "true"


def json_object(data: bytes, fields: Collection[str]) -> dict[str, Any]:
    """Parse a JSON request body; unknown fields are refused as Google refuses them."""
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        raise GmailError(
            400, "parseError", "Invalid JSON payload received. Unexpected token."
        ) from None
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received. Expected an object.")
    for name in body:
        if name not in fields:
            raise invalid(
                f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.'
            )
    return body


def string_list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid(f"Invalid value at '{name}': expected a list of strings")
    return value


async def read_capped(request: web.Request, cap: int, too_large: Callable[[], GmailError]) -> bytes:
    """Read the body, refusing it past ``cap`` bytes. The rest is still drained, so the client
    finishes sending and reads our 413 instead of a reset connection."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size <= cap:
            chunks.append(chunk)
    if size > cap:
        raise too_large()
    return b"".join(chunks)
