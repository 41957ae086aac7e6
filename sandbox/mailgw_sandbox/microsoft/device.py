"""The device code flow: ``/devicecode``, polling at ``/token``, and the ``/devicelogin`` page.

A headless gateway shows the person a code; they open the login page elsewhere, enter it, pick
an account and approve. Tests skip the browser with :meth:`DeviceFlow.approve`.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .._directory import App, User
from . import pages
from .identity import NO_STORE, AadFailure, Identity, origin, required
from .scopes import ScopeError, ScopeRequest, parse

DEVICE_CODE_LIFETIME = 900  # seconds, as Entra answers in expires_in
FORM_LIFETIME = 600
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ23456789"  # no vowels, no look-alikes


@dataclass
class DeviceCode:
    device_code: str
    user_code: str
    app: App
    scopes: ScopeRequest
    expires_at: float
    user: User | None = None  # set when the person approves
    declined: bool = False
    last_poll: float | None = None
    polled: asyncio.Event = field(default_factory=asyncio.Event)


class DeviceFlow:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.interval = 5  # seconds between polls; tests lower it, MSAL sleeps this long
        self._by_device: dict[str, DeviceCode] = {}
        self._by_user_code: dict[str, DeviceCode] = {}
        self._forms: dict[str, float] = {}  # single-use tokens of served login forms

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/{tenant}/oauth2/v2.0/devicecode", self.start)
        app.router.add_get("/devicelogin", self.page)
        app.router.add_post("/devicelogin", self.submit)

    def _now(self) -> float:
        return self.identity.directory.clock()

    async def start(self, request: web.Request) -> web.Response:
        form = await request.post()  # an empty ``claims=`` (httpx under MSAL) is ignored
        try:
            self.identity.check_tenant(request.match_info["tenant"])
            app = self.identity.app(required(form, "client_id"))
            scopes = parse(str(form.get("scope", "")))
        except AadFailure as failure:
            return failure.response()
        except ScopeError as error:
            return AadFailure("invalid_scope", error.code, str(error)).response()
        user_code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(9))
        entry = DeviceCode(
            device_code="DAQABAAEAAAD" + secrets.token_urlsafe(96),
            user_code=user_code,
            app=app,
            scopes=scopes,
            expires_at=self._now() + DEVICE_CODE_LIFETIME,
        )
        self._by_device[entry.device_code] = entry
        self._by_user_code[user_code] = entry
        verification_uri = f"{origin(request)}/devicelogin"
        return web.json_response(
            {
                "user_code": user_code,
                "device_code": entry.device_code,
                "verification_uri": verification_uri,
                "expires_in": DEVICE_CODE_LIFETIME,
                "interval": self.interval,
                "message": f"To sign in, use a web browser to open the page {verification_uri} "
                f"and enter the code {user_code} to authenticate.",
            },
            headers=NO_STORE,
        )

    # -- the person approves ------------------------------------------------------------------

    def _entry(self, user_code: str) -> DeviceCode:
        normalised = user_code.replace("-", "").replace(" ", "").upper()
        entry = self._by_user_code.get(normalised)
        if entry is None or entry.expires_at <= self._now():
            raise KeyError(user_code)
        return entry

    def approve(self, user_code: str, address: str) -> None:
        """Sign ``address`` in for the device showing ``user_code`` (consenting to its scopes)."""
        entry = self._entry(user_code)
        user = self.identity.user(address)
        if user is None:
            raise ValueError(f"no Microsoft user {address}")
        self.identity.consent(entry.app, user, entry.scopes.permissions)
        entry.user = user

    def deny(self, user_code: str) -> None:
        self._entry(user_code).declined = True

    async def first_poll(self, user_code: str) -> None:
        """Wait until the device has asked for its tokens (and so is waiting for the person)."""
        await self._entry(user_code).polled.wait()

    async def page(self, request: web.Request) -> web.Response:
        return self._form()

    def _form(self, note: str = "") -> web.Response:
        token = secrets.token_urlsafe(32)
        self._forms[token] = self._now() + FORM_LIFETIME
        return pages.device_login(token, self.identity.users(), note)

    async def submit(self, request: web.Request) -> web.Response:
        if request.headers.get("Origin", origin(request)) != origin(request):
            return pages.message("Request refused", "The form was posted from another site.", 403)
        form = await request.post()
        if self._forms.pop(str(form.get("sandbox_form", "")), 0) < self._now():
            return self._form("That page had expired; enter the code again.")
        user_code = str(form.get("user_code", ""))
        try:
            if form.get("decision") == "accept":
                self.approve(user_code, str(form.get("user", "")))
            else:
                self.deny(user_code)
        except (KeyError, ValueError):
            return self._form("That code is not valid or has expired. Check it and try again.")
        if form.get("decision") == "accept":
            return pages.message(
                "You're signed in", "You may now close this window and return to the device."
            )
        return pages.message("Sign-in declined", "The device was not signed in.")

    # -- the device polls ---------------------------------------------------------------------

    def redeem(self, request: web.Request, form: Any, app: App) -> web.Response:
        """``grant_type=urn:ietf:params:oauth:grant-type:device_code`` (MSAL sends both names)."""
        device_code = form.get("device_code") or required(form, "code")
        entry = self._by_device.get(device_code)
        if entry is None or entry.app.client_id != app.client_id:
            raise AadFailure(
                "bad_verification_code",
                70018,
                "The device_code sent to the token endpoint was not recognized.",
            )
        now = self._now()
        if now >= entry.expires_at:
            self._forget(entry)
            raise AadFailure("expired_token", 70019, "Verification code expired.")
        if entry.declined:
            self._forget(entry)
            raise AadFailure("authorization_declined", 65004, "User declined to authenticate.")
        user = entry.user
        if user is None:
            raise self._pending(entry, now)
        self._forget(entry)
        granted = self.identity.permissions(app, user, entry.scopes)
        return self.identity.token_response(
            request, app, user, entry.scopes, granted, public_client=True
        )

    def _pending(self, entry: DeviceCode, now: float) -> AadFailure:
        """Keep the device waiting; one that polls at under half the interval must slow down."""
        too_soon = entry.last_poll is not None and now - entry.last_poll < self.interval / 2
        entry.last_poll = now
        entry.polled.set()
        if too_soon:
            return AadFailure("slow_down", 70016, "Polling too fast; wait longer between requests.")
        return AadFailure(
            "authorization_pending",
            70016,
            "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
        )

    def _forget(self, entry: DeviceCode) -> None:
        self._by_device.pop(entry.device_code, None)
        self._by_user_code.pop(entry.user_code, None)
