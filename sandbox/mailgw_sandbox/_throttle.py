"""Per-mailbox request limits of Graph and Gmail, and a count of the requests each mailbox got.

Microsoft Graph, Outlook resources ("Microsoft Graph service-specific throttling limits",
section "Outlook service limits", https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits):
"10,000 API requests in a 10 minute period" per app ID per mailbox, and 4 concurrent requests
per app ID per mailbox (that one is enforced in ``microsoft/graph.py``, as
"Application is over its MailboxConcurrency limit."). Over the limit, Graph answers 429 with a
``Retry-After`` header ("Microsoft Graph throttling guidance", https://learn.microsoft.com/graph/throttling)
and code ``ApplicationThrottled``. The sandbox counts fixed 10-minute periods from the first
request of an (app, mailbox) pair, and ``Retry-After`` says, in decimal seconds like the
guide's sample ``2.128``, when the period ends. The message wording for this limit is not
documented (observed ones name the limit: "Application is over its MailboxConcurrency limit.",
"... IncomingBytes limit."); the gateway acts on the status, code and header only.

Gmail ("Usage limits", https://developers.google.com/gmail/api/reference/quota): 15,000 quota
units per user per minute, exceeded reason ``userRateLimitExceeded``; each method costs units
(messages.send 100, messages.list and messages.get 5, history.list 2, getProfile and
settings.sendAs.list 1, messages.delete 10). Google answers quota errors with 429, or 403
("Resolve errors", https://developers.google.com/gmail/api/guides/handle-errors) and documents
no ``Retry-After`` header, so none is sent: a client must back off on its own. The PUTs of a
resumable upload belong to the messages.send that opened the session and cost nothing more.

Both limits are per *mailbox* and, for Graph, per app: another mailbox of the same app is not
affected. ``PUT /_sandbox/throttle`` sets them (small windows for tests).

The counts (``/_sandbox/stats`` → ``mailboxes``): per mailbox address, every Graph or Gmail API
request made for it (``requests``), those answered 429 or 503 by any part of the sandbox
(``throttled``), and those that arrived while a ``Retry-After`` the mailbox's client had been
given had not yet passed (``during_pause``). A client that keeps within the concurrency limit
can have up to ``in_flight`` (3) other requests on the wire when a 429 reaches it; the first
``in_flight`` arrivals after each 429 are counted apart (``in_flight_at_pause``), not as
``during_pause``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import _errors
from ._directory import Directory, Provider

GRAPH_LIMIT = 10_000  # requests per period, per app per mailbox
GRAPH_PERIOD = 600.0
GMAIL_LIMIT = 15_000  # quota units per minute, per user
GMAIL_PERIOD = 60.0
IN_FLIGHT = 3  # Graph's 4 concurrent requests per mailbox, less the one answered 429

_GRAPH_PATH = re.compile(r"^/v1\.0/(me|users/([^/]+))(/|$)", re.I)
_GMAIL_PATH = re.compile(r"^/(?:upload/|resumable/upload/)?gmail/v1/users/[^/]+/(.*)$")
# (method, path after users/{id}/) → quota units, from the "Usage limits" table.
_GMAIL_UNITS: tuple[tuple[str, re.Pattern[str], int], ...] = (
    ("POST", re.compile(r"^messages/send$"), 100),
    ("GET", re.compile(r"^messages$"), 5),
    ("GET", re.compile(r"^messages/[^/]+$"), 5),
    ("DELETE", re.compile(r"^messages/[^/]+$"), 10),
    ("POST", re.compile(r"^messages/[^/]+/(modify|trash|untrash)$"), 5),
    ("GET", re.compile(r"^history$"), 2),
    ("GET", re.compile(r"^profile$"), 1),
    ("GET", re.compile(r"^settings/sendAs$"), 1),
)
_GMAIL_DEFAULT_UNITS = 5


@dataclass
class Limit:
    """``amount`` requests (Graph) or quota units (Gmail) per ``period`` seconds."""

    amount: int
    period: float


@dataclass
class Period:
    """One (app, mailbox) pair's use of its current period."""

    start: float
    used: int = 0


@dataclass
class MailboxCounts:
    """What one mailbox was sent; see the module docstring."""

    requests: int = 0
    throttled: int = 0
    during_pause: int = 0
    in_flight_at_pause: int = 0
    paused_until: float = 0.0
    excused: int = 0  # arrivals still counted as in flight at the current pause

    def json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "throttled": self.throttled,
            "during_pause": self.during_pause,
            "in_flight_at_pause": self.in_flight_at_pause,
        }


@dataclass(frozen=True)
class Scope:
    """Whose limit a request counts against, and how much of it."""

    provider: Provider
    app: str
    mailbox: str  # the address, case-folded
    cost: int


@dataclass
class Throttle:
    directory: Directory
    limits: dict[Provider, Limit] = field(
        default_factory=lambda: {
            "microsoft": Limit(GRAPH_LIMIT, GRAPH_PERIOD),
            "google": Limit(GMAIL_LIMIT, GMAIL_PERIOD),
        }
    )
    gmail_status: int = 429
    in_flight: int = IN_FLIGHT
    periods: dict[tuple[Provider, str, str], Period] = field(default_factory=dict)
    counts: dict[str, MailboxCounts] = field(default_factory=dict)

    def configure(
        self, provider: Provider, amount: int, period: float, gmail_status: int | None = None
    ) -> None:
        """New limits apply from the next period (current periods are forgotten)."""
        self.limits[provider] = Limit(amount, period)
        if gmail_status is not None:
            self.gmail_status = gmail_status
        for key in [k for k in self.periods if k[0] == provider]:
            del self.periods[key]

    def stats(self) -> dict[str, dict[str, Any]]:
        return {mailbox: counts.json() for mailbox, counts in self.counts.items()}

    def middleware(self) -> Middleware:
        @web.middleware
        async def throttle(request: web.Request, handler: Handler) -> web.StreamResponse:
            scope = self._scope(request)
            if scope is None:
                return await handler(request)
            now = self.directory.clock()
            counts = self.counts.setdefault(scope.mailbox, MailboxCounts())
            counts.requests += 1
            if now < counts.paused_until:
                if counts.excused > 0:
                    counts.excused -= 1
                    counts.in_flight_at_pause += 1
                else:
                    counts.during_pause += 1
            wait = self._charge(scope, now)
            if wait is None:
                response = await handler(request)
            else:
                response = self._refusal(scope.provider, wait)
            if response.status in (429, 503):
                counts.throttled += 1
                self._note_pause(counts, response, self.directory.clock())
            return response

        return throttle

    def _charge(self, scope: Scope, now: float) -> float | None:
        """Count the request; None if within the limit, else the seconds left in the period."""
        limit = self.limits[scope.provider]
        key = (scope.provider, scope.app, scope.mailbox)
        period = self.periods.get(key)
        if period is None or now >= period.start + limit.period:
            period = self.periods[key] = Period(now)
        if period.used + scope.cost > limit.amount:
            return period.start + limit.period - now
        period.used += scope.cost
        return None

    def _note_pause(self, counts: MailboxCounts, response: web.StreamResponse, now: float) -> None:
        try:
            wait = float(response.headers.get("Retry-After", ""))
        except ValueError:
            return  # no Retry-After (or an HTTP date, which this sandbox never sends)
        if now >= counts.paused_until:
            counts.excused = self.in_flight  # a new pause: others may already be on the wire
        counts.paused_until = max(counts.paused_until, now + wait)

    def _refusal(self, provider: Provider, wait: float) -> web.Response:
        if provider == "microsoft":
            seconds = math.ceil(wait * 1000) / 1000
            return _errors.graph_error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxRequests limit.",
                {"Retry-After": f"{seconds:.3f}"},
            )
        if self.gmail_status == 403:
            return _errors.google_api_error(
                403, "userRateLimitExceeded", "User Rate Limit Exceeded", None
            )
        return _errors.google_api_error(
            429,
            "userRateLimitExceeded",
            "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute per user' "
            "of service 'gmail.googleapis.com'.",
            None,
        )

    def _scope(self, request: web.Request) -> Scope | None:
        """The (app, mailbox) a Graph or Gmail API request is for; None for anything else
        (sign-in, control API, Graph's upload URLs, a request without a valid token)."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.casefold() != "bearer" or not token.strip():
            return None
        now = self.directory.clock()
        graph = _GRAPH_PATH.match(request.path)
        if graph:
            grant = self.directory.find(token.strip(), "access", "microsoft")
            if grant is None or grant.revoked or grant.expired(now):
                return None  # answered 401 before any limit applies
            whose = unquote(graph.group(2)) if graph.group(2) else grant.user
            user = self.directory.user_by_id("microsoft", whose) if whose else None
            if user is None:
                return None
            return Scope("microsoft", grant.client_id, user.address.casefold(), 1)
        gmail = _GMAIL_PATH.match(request.path)
        if gmail:
            grant = self.directory.find(token.strip(), "access", "google")
            if grant is None or grant.revoked or grant.expired(now) or grant.user is None:
                return None
            return Scope("google", grant.client_id, grant.user.casefold(), _units(request, gmail))
        return None


def _units(request: web.Request, match: re.Match[str]) -> int:
    if request.method == "PUT":
        return 0  # a piece of a resumable upload: its messages.send was charged at the start
    rest = match.group(1)
    for method, pattern, units in _GMAIL_UNITS:
        if request.method == method and pattern.match(rest):
            return units
    return _GMAIL_DEFAULT_UNITS
