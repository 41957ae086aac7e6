"""Faults on demand: the next N matching requests fail the way the clouds fail.

Tests and the demo use this to show what the gateway does under throttling (429 with a decimal
Retry-After, as Graph sends), outages (503), a token refused at any step (401, as after a
revocation), slowness and dropped connections. A fault applies
to one *target* (which service the request is for), so a Graph outage leaves sign-in working.
``latency`` adds a network round trip to every API request (not to the inner requests of a
batch, which cross no network), for benchmarks against cloud-like delays.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import _errors
from ._batch import INNER

Target = Literal["microsoft-login", "graph", "google-oauth", "gmail", "any"]
FaultKind = Literal["401", "429", "503", "slow", "reset"]

_TARGET_PATTERNS: tuple[tuple[Target, re.Pattern[str]], ...] = (
    ("graph", re.compile(r"^/(v1\.0|api/v2\.0)/")),
    ("gmail", re.compile(r"^/(upload/|resumable/upload/|batch/)?gmail/")),
    ("google-oauth", re.compile(r"^/(o/oauth2/|token$|device/code$|revoke$)")),
)


def target_of(path: str) -> Target | None:
    """Which service a request path belongs to; None for the sandbox's own control API."""
    if path.startswith("/_sandbox/"):
        return None
    for target, pattern in _TARGET_PATTERNS:
        if pattern.match(path):
            return target
    return "microsoft-login"


@dataclass
class Fault:
    target: Target
    kind: FaultKind
    remaining: int = 1
    retry_after: str = "2.128"  # Graph's documented sample: a decimal number of seconds
    delay: float = 0.0  # for "slow": seconds before the real answer
    path_suffix: str | None = None  # only requests whose path ends so (e.g. "/attachments")
    method: str | None = None  # only requests with this method (e.g. an upload's "PUT")

    def matches(self, target: Target, path: str = "", method: str = "") -> bool:
        if self.path_suffix is not None and not path.endswith(self.path_suffix):
            return False
        if self.method is not None and method.upper() != self.method.upper():
            return False
        if self.kind == "401" and target not in ("graph", "gmail"):
            return False  # a refused bearer token is an API's answer, not a sign-in page's
        return self.remaining > 0 and self.target in ("any", target)


class FaultPlan:
    """Faults waiting to happen, consumed in the order they were added."""

    def __init__(self) -> None:
        self.pending: list[Fault] = []
        self.requests: dict[str, int] = {}  # requests seen per target, faulted or not
        self.latency = 0.0  # seconds added to every Graph and Gmail request (see the docstring)

    def add(self, fault: Fault) -> None:
        self.pending.append(fault)

    def clear(self) -> None:
        self.pending.clear()

    def take(self, target: Target, path: str = "", method: str = "") -> Fault | None:
        for fault in self.pending:
            if fault.matches(target, path, method):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.pending.remove(fault)
                return fault
        return None


def middleware(plan: FaultPlan) -> Middleware:
    @web.middleware
    async def inject(request: web.Request, handler: Handler) -> web.StreamResponse:
        target = target_of(request.path)
        if target is None:
            return await handler(request)
        plan.requests[target] = plan.requests.get(target, 0) + 1
        if plan.latency and target in ("graph", "gmail") and not request.get(INNER):
            await asyncio.sleep(plan.latency)
        fault = plan.take(target, request.path, request.method)
        if fault is None:
            return await handler(request)
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay)
            return await handler(request)
        if fault.kind == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("sandbox fault: connection reset")
        return _failure(target, int(fault.kind), fault.retry_after)

    return inject


def _failure(target: Target, status: int, retry_after: str) -> web.Response:
    if status == 401:
        return _unauthorized(target)
    headers = {"Retry-After": retry_after}
    if target == "graph":
        if status == 429:
            return _errors.graph_error(429, "TooManyRequests", "Please retry again later.", headers)
        return _errors.graph_error(503, "serviceNotAvailable", "Service Unavailable", headers)
    if target == "gmail":
        if status == 429:
            return _errors.google_api_error(
                429, "rateLimitExceeded", "User-rate limit exceeded.", headers
            )
        return _errors.google_api_error(503, "backendError", "Backend Error", headers)
    if target == "google-oauth":
        return _errors.google_oauth_error(
            status, "temporarily_unavailable", "The service is temporarily unavailable.", headers
        )
    return _errors.aad_error(
        status,
        "temporarily_unavailable",
        50196 if status == 429 else 90033,
        "The server is temporarily unable to handle the request. Try again later.",
        headers=headers,
    )


def _unauthorized(target: Target) -> web.Response:
    """The service's answer to an access token it no longer accepts (no Retry-After: the
    client needs a new token, not patience)."""
    if target == "gmail":
        challenge = 'Bearer realm="https://accounts.google.com/", error="invalid_token"'
        return _errors.google_api_error(
            401,
            "authError",
            "Invalid Credentials",
            {"WWW-Authenticate": challenge},
            location="Authorization",
        )
    if target == "graph":
        return _errors.graph_error(
            401,
            "InvalidAuthenticationToken",
            "Lifetime validation failed, the token is expired.",
            {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'},
        )
    raise AssertionError(f"no 401 fault for {target}")  # excluded by Fault.matches
