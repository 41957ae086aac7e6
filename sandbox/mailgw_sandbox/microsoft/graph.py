"""Microsoft Graph's front door: routing, bearer tokens, permissions, throttling, body limits.

Every ``/v1.0/...`` request passes here in the order the real service applies its checks: the
4 MB body cap, the bearer token (401, see ``Graph._authenticate``), whose mailbox (``/me``
needs a delegated token; another user's mailbox needs an app token), the permission (403),
then Outlook's limit of four concurrent requests per mailbox (429 ``ApplicationThrottled``).
Handlers get a :class:`Call` and raise :class:`GraphError`, the one way this service answers
errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from .. import _errors
from .._directory import Directory, Grant, User
from .identity import origin
from .mailstore import Folder, Mailbox, MailStore, Message

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # "The maximum request length supported is 4MB."
MAX_CONCURRENT_PER_MAILBOX = 4
THROTTLE_RETRY_AFTER = "1"


class GraphError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> web.Response:
        return _errors.graph_error(self.status, self.code, self.message, self.headers)


def not_found() -> GraphError:
    return GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")


def bad_request(message: str, code: str = "BadRequest") -> GraphError:
    return GraphError(400, code, message)


@dataclass(frozen=True)
class Prefer:
    """The ``Prefer`` preferences Graph mail honours (several may share one header)."""

    immutable_ids: bool = False
    text_body: bool = False
    max_page_size: int | None = None

    @classmethod
    def parse(cls, values: list[str]) -> Prefer:
        found: dict[str, str] = {}
        for value in values:
            for item in value.split(","):
                name, _, setting = item.partition("=")
                found[name.strip().casefold()] = setting.strip().strip('"')
        size = found.get("odata.maxpagesize", "")
        return cls(
            immutable_ids=found.get("idtype", "").casefold() == "immutableid",
            text_body=found.get("outlook.body-content-type", "").casefold() == "text",
            max_page_size=int(size) if size.isdigit() and int(size) > 0 else None,
        )

    def applied(self, page_size: bool) -> str:
        applied = []
        if self.immutable_ids:
            applied.append('IdType="ImmutableId"')
        if self.text_body:
            applied.append('outlook.body-content-type="text"')
        if page_size and self.max_page_size:
            applied.append(f"odata.maxpagesize={self.max_page_size}")
        return ", ".join(applied)


@dataclass
class Call:
    """One authorised Graph request against one mailbox."""

    request: web.Request
    grant: Grant
    user: User
    mailbox: Mailbox
    params: dict[str, str]
    prefer: Prefer
    base: str  # the absolute URL of the user's root, e.g. https://host/v1.0/me
    body: bytes = b""

    @property
    def origin(self) -> str:
        return origin(self.request)

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise bad_request(
                "Unable to read JSON request payload. Please ensure Content-Type header is set "
                "and payload is of valid JSON format."
            )
        return data

    def respond(
        self, data: dict[str, Any], status: int = 200, page_size: bool = False
    ) -> web.Response:
        applied = self.prefer.applied(page_size)
        headers = {"Preference-Applied": applied} if applied else None
        return web.json_response(data, status=status, headers=headers)

    def folder(self, name_or_id: str | None = None) -> Folder:
        found = self.mailbox.folder(name_or_id or self.params["folder"])
        if found is None:
            raise not_found()
        return found

    def message(self) -> Message:
        """The message in the path, looked up in the path's folder when there is one."""
        found = self.mailbox.find(self.params["id"])
        if found is None or ("folder" in self.params and found.folder_id != self.folder().id):
            raise not_found()
        return found

    def message_id(self, message: Message) -> str:
        return message.id(self.prefer.immutable_ids)


Handler = Callable[[Call], web.Response]


@dataclass(frozen=True)
class Route:
    method: str
    segments: tuple[str, ...]  # lower-case literals, or "{name}" placeholders
    permissions: frozenset[str]  # any one of them will do
    handler: Handler
    mailbox: bool = True  # an Outlook (mailbox) request, subject to the concurrency limit


class Graph:
    def __init__(self, directory: Directory, store: MailStore, routes: list[Route]) -> None:
        self.directory = directory
        self.store = store
        self.routes = routes
        self.in_flight: dict[str, int] = {}
        self._gate: asyncio.Event | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/v1.0/{tail:.*}", self.handle)

    def hold(self) -> asyncio.Event:
        """For tests: until the event is set, mailbox requests wait while holding their slot."""
        self._gate = asyncio.Event()
        return self._gate

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except GraphError as error:
            return error.response()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        whose, base, route, params = self._route(request)
        if (request.content_length or 0) > MAX_REQUEST_BYTES:
            raise _too_large()
        grant = self._authenticate(request)
        user = self._owner(whose, grant, route)
        if not grant.scopes & route.permissions:
            raise GraphError(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        call = Call(
            request,
            grant,
            user,
            self.store.mailbox(user),
            params,
            Prefer.parse(request.headers.getall("Prefer", [])),
            base,
        )
        if not route.mailbox:
            return route.handler(call)
        return await self._throttled(call, route.handler)

    async def _throttled(self, call: Call, handler: Handler) -> web.StreamResponse:
        key = call.user.address.casefold()
        if self.in_flight.get(key, 0) >= MAX_CONCURRENT_PER_MAILBOX:
            raise GraphError(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
                {"Retry-After": THROTTLE_RETRY_AFTER},
            )
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            if self._gate is not None:
                await self._gate.wait()
            call.body = await read_limited(call.request)
            return handler(call)
        finally:
            self.in_flight[key] -= 1

    def _route(self, request: web.Request) -> tuple[str, str, Route, dict[str, str]]:
        """Split ``/v1.0/{me|users/{id}}/...`` and match the rest, case-insensitively."""
        segments = [unquote(s) for s in request.raw_path.split("?", 1)[0].split("/")[2:]]
        while segments and not segments[-1]:
            segments.pop()
        if segments and segments[0].lower() == "me":
            whose, rest, root = "me", segments[1:], "me"
        elif len(segments) >= 2 and segments[0].lower() == "users":
            whose, rest, root = segments[1], segments[2:], f"users/{quote(segments[1], safe='@')}"
        else:
            raise _unknown_segment(segments[0] if segments else "")
        matched = [(r, p) for r in self.routes if (p := _match(r.segments, rest)) is not None]
        if not matched:
            raise _unknown_segment(_first_unknown(self.routes, rest))
        for route, params in matched:
            if route.method == request.method:
                return whose, f"{origin(request)}/v1.0/{root}", route, params
        raise GraphError(
            405,
            "Request_BadRequest",
            "Specified HTTP method is not allowed for the request target.",
        )

    def _authenticate(self, request: web.Request) -> Grant:
        """The grant of the request's bearer token, or 401 ``InvalidAuthenticationToken``.

        A revoked token is refused at once, whatever its remaining lifetime, with a claims
        challenge (``error="insufficient_claims"``, ``claims`` = base64 of a claims request
        whose ``nbf`` is the revocation time), as Exchange Online does under continuous access
        evaluation for a password reset, a disabled account or an admin's revocation. The
        client must get a token issued after that time, i.e. refresh (passing the claims);
        the same token, however often re-sent, stays refused. Sources: Microsoft, "How to use
        Continuous Access Evaluation enabled APIs in your applications" and "Claims challenges,
        claims requests and client capabilities" (learn.microsoft.com/entra/identity-platform/
        app-resilience-continuous-access-evaluation, .../claims-challenge); "Resolve Microsoft
        Graph authorization errors" (learn.microsoft.com/graph/resolve-auth-errors).
        """
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.casefold() != "bearer" or not token.strip():
            raise _unauthenticated(request, "Access token is empty.")
        grant = self.directory.find(token.strip(), "access", "microsoft")
        if grant is None:
            raise _unauthenticated(request, "Access token validation failure. Invalid audience.")
        if grant.revoked:
            raise _unauthenticated(
                request,
                "Continuous access evaluation resulted in challenge with result: "
                "InteractionRequired and code: TokenIssuedBeforeRevocationTimestamp",
                claims=_issued_after(self.directory.clock()),
            )
        if grant.expired(self.directory.clock()):
            raise _unauthenticated(request, "Lifetime validation failed, the token is expired.")
        return grant

    def _owner(self, whose: str, grant: Grant, route: Route) -> User:
        """The mailbox a request is for, and whether this token may touch it."""
        if whose == "me":
            if grant.user is None:
                raise bad_request("/me request is only valid with delegated authentication flow.")
            user = self.directory.user(grant.user)
            if user is None:
                raise not_found()
            return user
        user = self.directory.user_by_id("microsoft", whose)
        if user is None:
            if route.mailbox:
                raise GraphError(
                    404, "ErrorInvalidUser", f"The requested user '{whose}' is invalid."
                )
            raise GraphError(
                404,
                "Request_ResourceNotFound",
                f"Resource '{whose}' does not exist or one of its queried reference-property "
                "objects are not present.",
            )
        if grant.user is not None and grant.user.casefold() != user.address.casefold():
            raise GraphError(
                403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
            )
        return user


def _match(pattern: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params = {}
    for expected, actual in zip(pattern, segments, strict=True):
        if expected.startswith("{"):
            params[expected[1:-1]] = actual
        elif expected != actual.lower():
            return None
    return params


def _first_unknown(routes: list[Route], segments: list[str]) -> str:
    """The first path segment no route accepts, for Graph's error message."""
    for depth, segment in enumerate(segments):
        prefix = segments[: depth + 1]
        if not any(_match(r.segments[: depth + 1], prefix) is not None for r in routes):
            return segment
    return segments[-1] if segments else ""


def _unknown_segment(segment: str) -> GraphError:
    return bad_request(f"Resource not found for the segment '{segment}'.")


def _unauthenticated(request: web.Request, message: str, claims: str | None = None) -> GraphError:
    challenge = (
        f'Bearer realm="", authorization_uri="{origin(request)}/common/oauth2/authorize", '
        'client_id="00000003-0000-0000-c000-000000000000"'
    )
    if claims is not None:
        challenge += f', error="insufficient_claims", claims="{claims}"'
    return GraphError(401, "InvalidAuthenticationToken", message, {"WWW-Authenticate": challenge})


def _issued_after(moment: float) -> str:
    """A CAE claims challenge: "a token not valid before ``moment``", base64 as Graph sends it."""
    request = {"access_token": {"nbf": {"essential": True, "value": str(int(moment))}}}
    return base64.b64encode(json.dumps(request, separators=(",", ":")).encode()).decode("ascii")


def _too_large() -> GraphError:
    return bad_request("The maximum request length supported is 4MB.")


async def read_limited(request: web.Request) -> bytes:
    """The body, refused once it passes 4 MB (for bodies sent without a Content-Length).

    aiohttp reads away whatever the client still sends, so it gets this answer, not a reset.
    """
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)
