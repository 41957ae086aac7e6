"""The sandbox's control API (``/_sandbox/...``): set up, inspect and disturb the fake clouds.

JSON over the same HTTPS origin. Every call must carry ``X-Sandbox-Control: 1``: a custom header
makes browsers preflight cross-site requests (which we never approve), so a web page cannot
drive the sandbox behind the user's back.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, get_args

from aiohttp import web

from ._directory import Provider, User
from ._faults import Fault, FaultKind, Target
from ._provider import ConsentMode, SentMessage

if TYPE_CHECKING:
    from ._server import Sandbox

CONTROL_HEADER = "X-Sandbox-Control"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _choice(value: Any, allowed: Any, name: str) -> Any:
    if value not in get_args(allowed):
        raise ControlError(f"{name} must be one of {', '.join(get_args(allowed))}")
    return value


def _sent_json(message: SentMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "from": message.from_address,
        "recipients": list(message.recipients),
        "saved_to_sent": message.saved_to_sent,
        "raw": base64.b64encode(message.raw).decode("ascii"),
    }


def _user_json(user: User) -> dict[str, Any]:
    return {
        "provider": user.provider,
        "address": user.address,
        "id": user.id,
        "display_name": user.display_name,
        "send_as": list(user.send_as),
    }


class ControlApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def add_routes(self, app: web.Application) -> None:
        routes = [
            ("POST", "/_sandbox/apps", self.add_app),
            ("POST", "/_sandbox/users", self.add_user),
            ("POST", "/_sandbox/users/{address}/inbox", self.seed),
            ("GET", "/_sandbox/users/{address}/inbox", self.inbox),
            ("GET", "/_sandbox/users/{address}/sent", self.sent),
            ("POST", "/_sandbox/users/{address}/messages/{id}/move", self.move),
            ("POST", "/_sandbox/users/{address}/messages/{id}/read", self.read),
            ("POST", "/_sandbox/users/{address}/messages/{id}/flag", self.flag),
            ("DELETE", "/_sandbox/users/{address}/messages/{id}", self.delete),
            ("POST", "/_sandbox/users/{address}/revoke", self.revoke),
            ("POST", "/_sandbox/tokens/expire", self.expire),
            ("PUT", "/_sandbox/token-lifetime", self.lifetime),
            ("POST", "/_sandbox/faults", self.add_fault),
            ("DELETE", "/_sandbox/faults", self.clear_faults),
            ("PUT", "/_sandbox/consent", self.consent),
            ("GET", "/_sandbox/stats", self.stats),
            ("PUT", "/_sandbox/throttle", self.throttle),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._guard(handler))

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if request.headers.get(CONTROL_HEADER) != "1":
                return web.json_response(
                    {"error": f"missing header {CONTROL_HEADER}: 1"}, status=403
                )
            try:
                return await handler(request)
            except ControlError as error:
                return web.json_response({"error": str(error)}, status=error.status)

        return guarded

    def _user(self, request: web.Request) -> User:
        user = self.sandbox.directory.user(request.match_info["address"])
        if user is None:
            raise ControlError(f"no user {request.match_info['address']}", 404)
        return user

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ControlError("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ControlError("the body must be a JSON object")
        return body

    async def add_app(self, request: web.Request) -> web.Response:
        """Register an app: ``redirect_uris`` (Entra's Web platform, or a Google Web
        application's), ``public_client_redirect_uris`` (Entra's Mobile and desktop
        applications), ``allow_public_client_flows``, ``secret`` (false: no client secret, as an
        Entra public client) and ``desktop`` (a Google Desktop app client)."""
        body = await self._json(request)
        provider: Provider = _choice(body.get("provider"), Provider, "provider")
        app = self.sandbox.add_app(
            provider,
            client_id=body.get("client_id"),
            redirect_uris=_strings(body, "redirect_uris"),
            public_client_redirect_uris=_strings(body, "public_client_redirect_uris"),
            allow_public_client_flows=_flag(body, "allow_public_client_flows", False),
            secret=_flag(body, "secret", True),
            desktop=_flag(body, "desktop", False),
            app_permissions=_strings(body, "app_permissions"),
            name=str(body.get("name", "app")),
        )
        return web.json_response(
            {
                "provider": app.provider,
                "client_id": app.client_id,
                "client_secret": app.client_secret,
                "redirect_uris": list(app.redirect_uris),
                "public_client_redirect_uris": list(app.public_client_redirect_uris),
                "allow_public_client_flows": app.allow_public_client_flows,
                "desktop": app.desktop,
                "app_permissions": sorted(app.app_permissions),
            },
            status=201,
        )

    async def add_user(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        provider: Provider = _choice(body.get("provider"), Provider, "provider")
        address = body.get("address")
        if not isinstance(address, str) or "@" not in address:
            raise ControlError("address must be an email address")
        user = self.sandbox.add_user(
            provider, address, body.get("display_name"), tuple(body.get("send_as", ()))
        )
        return web.json_response(_user_json(user), status=201)

    async def seed(self, request: web.Request) -> web.Response:
        user = self._user(request)
        raw = await request.read()
        if not raw:
            raise ControlError("send the RFC 822 message as the request body")
        message_id = self.sandbox.ops(user).seed_inbox(user, raw)
        return web.json_response({"id": message_id}, status=201)

    async def inbox(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return web.json_response({"ids": self.sandbox.ops(user).inbox_ids(user)})

    async def sent(self, request: web.Request) -> web.Response:
        user = self._user(request)
        messages = self.sandbox.ops(user).sent(user)
        return web.json_response({"messages": [_sent_json(m) for m in messages]})

    async def move(self, request: web.Request) -> web.Response:
        user = self._user(request)
        destination = (await self._json(request)).get("destination")
        if not isinstance(destination, str):
            raise ControlError("destination is required (archive, trash or inbox)")
        new_id = self._message_op(
            lambda: self.sandbox.ops(user).move(user, _id(request), destination)
        )
        return web.json_response({"id": new_id})

    async def read(self, request: web.Request) -> web.Response:
        user = self._user(request)
        read = bool((await self._json(request)).get("read", True))
        self._message_op(lambda: self.sandbox.ops(user).set_read(user, _id(request), read))
        return web.json_response({"read": read})

    async def flag(self, request: web.Request) -> web.Response:
        """Flag (Outlook) or star (Gmail) a message, or with ``{"flagged": false}`` clear it."""
        user = self._user(request)
        flagged = _flag(await self._json(request), "flagged", True)
        self._message_op(lambda: self.sandbox.ops(user).set_flagged(user, _id(request), flagged))
        return web.json_response({"flagged": flagged})

    async def delete(self, request: web.Request) -> web.Response:
        user = self._user(request)
        self._message_op(lambda: self.sandbox.ops(user).delete(user, _id(request)))
        return web.Response(status=204)

    def _message_op(self, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except KeyError as error:
            raise ControlError(f"no message {error.args[0]}", 404) from None
        except ValueError as error:
            raise ControlError(str(error)) from None

    async def revoke(self, request: web.Request) -> web.Response:
        """Every token of the user, or with ``?tokens=access`` only the access tokens."""
        user = self._user(request)
        which = request.query.get("tokens", "all")
        directory = self.sandbox.directory
        if which == "access":
            return web.json_response({"revoked": directory.revoke_access_tokens(user.address)})
        if which != "all":
            raise ControlError("tokens must be all or access")
        return web.json_response({"revoked": directory.revoke_user(user.address)})

    async def expire(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        provider = body.get("provider")
        if provider is not None:
            _choice(provider, Provider, "provider")
        return web.json_response({"expired": self.sandbox.directory.expire_access_tokens(provider)})

    async def lifetime(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        provider: Provider = _choice(body.get("provider"), Provider, "provider")
        directory = self.sandbox.directory
        for key, table in (
            ("access_seconds", directory.access_lifetime),
            ("refresh_seconds", directory.refresh_lifetime),
        ):
            if key in body:
                if not isinstance(body[key], int) or body[key] < 1:
                    raise ControlError(f"{key} must be a positive whole number")
                table[provider] = body[key]
        return web.json_response(
            {
                "access_seconds": directory.access_lifetime[provider],
                "refresh_seconds": directory.refresh_lifetime[provider],
            }
        )

    async def add_fault(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        fault = Fault(
            target=_choice(body.get("target", "any"), Target, "target"),
            kind=_choice(str(body.get("kind")), FaultKind, "kind"),
            remaining=int(body.get("count", 1)),
            retry_after=str(body.get("retry_after", "2.128")),
            delay=float(body.get("delay", 0)),
            path_suffix=body.get("path_suffix"),
            method=body.get("method"),
        )
        self.sandbox.faults.add(fault)
        return web.json_response({"pending": len(self.sandbox.faults.pending)}, status=201)

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.sandbox.faults.clear()
        return web.Response(status=204)

    async def consent(self, request: web.Request) -> web.Response:
        mode: ConsentMode = _choice((await self._json(request)).get("mode"), ConsentMode, "mode")
        self.sandbox.context.consent = mode
        return web.json_response({"mode": mode})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": dict(self.sandbox.faults.requests),
                "mailboxes": self.sandbox.throttle.stats(),
            }
        )

    async def throttle(self, request: web.Request) -> web.Response:
        """A provider's per-mailbox limit: ``limit`` requests (Graph) or quota units (Gmail)
        per ``period_seconds``; for Google also ``status`` 429 or 403 (it uses both)."""
        body = await self._json(request)
        provider: Provider = _choice(body.get("provider"), Provider, "provider")
        limit, period = body.get("limit"), body.get("period_seconds")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ControlError("limit must be a positive whole number")
        if not isinstance(period, int | float) or isinstance(period, bool) or period <= 0:
            raise ControlError("period_seconds must be a positive number")
        status = body.get("status")
        if status is not None and (provider != "google" or status not in (403, 429)):
            raise ControlError("status is for google only: 429 or 403")
        self.sandbox.throttle.configure(provider, limit, float(period), status)
        return web.json_response({"provider": provider, "limit": limit, "period_seconds": period})


def _strings(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ControlError(f"{key} must be a list of strings")
    return tuple(value)


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise ControlError(f"{key} must be true or false")
    return value


def _id(request: web.Request) -> str:
    return request.match_info["id"]
