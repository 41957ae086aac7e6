"""Prometheus metrics: what the gateway counts, and the ``/metrics`` page of the admin listener.

Every layer reports through the few functions here (one line at the place where the event
happens); nothing else imports ``prometheus_client``. Names follow the Prometheus naming
conventions (https://prometheus.io/docs/practices/naming/): a ``mailgw_`` prefix, ``_total``
on counters, base units (``_seconds``). Labels never carry a username, an address or a
message ID: their values come from small fixed sets (protocols, providers, outcomes, request
kinds), so the series stay few and the page tells an outsider nothing about who uses the
gateway.

The metrics live in one registry of the process (:data:`REGISTRY`). Queue depth and the
oldest message's age are read from the running spool when scraped (:func:`watch_queue`),
never kept in a second copy that could drift.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

T = TypeVar("T")

REGISTRY = CollectorRegistry(auto_describe=True)

SENDS = Counter(
    "mailgw_sends",
    "Delivery attempts by provider and outcome (sent, retry, paused, held, dead, refused, gone).",
    ["provider", "result"],
    registry=REGISTRY,
)
PROVIDER_REQUESTS = Counter(
    "mailgw_provider_requests",
    "Graph and Gmail API requests by kind and HTTP status ('error': no answer).",
    ["kind", "status"],
    registry=REGISTRY,
)
PROVIDER_LATENCY = Histogram(
    "mailgw_provider_request_duration_seconds",
    "Time from sending a Graph or Gmail API request to its answer (or failure), by kind.",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
TOKEN_REFRESHES = Counter(
    "mailgw_token_refreshes",
    "Access tokens obtained from the identity provider, by provider and result "
    "(ok, reauth_required, unavailable, error).",
    ["provider", "result"],
    registry=REGISTRY,
)
RECONSENTS = Counter(
    "mailgw_reconsent_events",
    "Mailboxes that lost their consent and must be connected again by their owner.",
    ["provider"],
    registry=REGISTRY,
)
LOGINS = Counter(
    "mailgw_logins",
    "Password logins by protocol (smtp, imap, pop3, admin) and result (ok, failed, "
    "throttled: refused without a check because the client used up its budget).",
    ["protocol", "result"],
    registry=REGISTRY,
)
CONNECTIONS = Gauge(
    "mailgw_open_connections",
    "Client connections open now, by protocol (smtp, imap, pop3, admin).",
    ["protocol"],
    registry=REGISTRY,
)
RELOADS = Counter(
    "mailgw_config_reloads",
    "Config reloads (SIGHUP) by result (applied, refused: the file did not validate).",
    ["result"],
    registry=REGISTRY,
)

QUEUE_STATES = ("queued", "held", "dead")


# -- the hooks the layers call ----------------------------------------------------------------


def login(protocol: str, result: str) -> None:
    LOGINS.labels(protocol, result).inc()


def connection_opened(protocol: str) -> None:
    CONNECTIONS.labels(protocol).inc()


def connection_closed(protocol: str) -> None:
    CONNECTIONS.labels(protocol).dec()


def reconsent_needed(provider: str) -> None:
    RECONSENTS.labels(provider).inc()


def reloaded(result: str) -> None:
    RELOADS.labels(result).inc()


def send_outcome(provider: str, outcome: T) -> T:
    """Count one delivery attempt's outcome and hand it back (a ``Refusal`` counts as
    "refused": a permanent refusal reported inline to the SMTP client)."""
    SENDS.labels(provider, outcome if isinstance(outcome, str) else "refused").inc()
    return outcome


class _Answered(Protocol):
    status_code: int


R = TypeVar("R", bound=_Answered)


async def provider_request(kind: str, request: Awaitable[R]) -> R:
    """Await one API request, counting its status and timing it."""
    started = time.perf_counter()
    status = "error"
    try:
        response = await request
        status = str(response.status_code)
        return response
    finally:
        PROVIDER_LATENCY.labels(kind).observe(time.perf_counter() - started)
        PROVIDER_REQUESTS.labels(kind, status).inc()


async def token_refresh(provider: str, refresh: Awaitable[T]) -> T:
    """Await one token refresh, counting its result by the error class that ended it."""
    result = "error"
    try:
        token = await refresh
        result = "ok"
        return token
    except Exception as error:
        name = type(error).__name__
        result = {"ReauthRequired": "reauth_required", "AuthUnavailable": "unavailable"}.get(
            name, "error"
        )
        raise
    finally:
        TOKEN_REFRESHES.labels(provider, result).inc()


# -- the queue, read when scraped -------------------------------------------------------------


class QueuedMessage(Protocol):
    # Read-only: the spool's records narrow ``state`` to their own literal states.
    @property
    def state(self) -> str: ...

    @property
    def created(self) -> float: ...


class _QueueCollector(Collector):
    """Queue depth by state and the oldest message's age by state, from the running spool."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[QueuedMessage]] | None = None
        self.clock: Callable[[], float] = time.time

    def describe(self) -> Iterable[Any]:
        return list(self._families({}, {}))

    def collect(self) -> Iterable[Any]:
        counts = dict.fromkeys(QUEUE_STATES, 0)
        oldest: dict[str, float] = {}
        for message in self.source() if self.source is not None else ():
            counts[message.state] = counts.get(message.state, 0) + 1
            oldest[message.state] = min(oldest.get(message.state, message.created), message.created)
        now = self.clock()
        ages = {state: max(0.0, now - created) for state, created in oldest.items()}
        return list(self._families(counts, ages))

    @staticmethod
    def _families(counts: dict[str, int], ages: dict[str, float]) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "mailgw_queue_messages",
            "Messages in the outgoing queue by state (queued: waiting or being sent; held: "
            "the mailbox must be reconnected or its upstream password fixed; dead: given up).",
            labels=["state"],
        )
        for state, count in counts.items():
            depth.add_metric([state], count)
        yield depth
        age = GaugeMetricFamily(
            "mailgw_queue_oldest_age_seconds",
            "Age of the oldest message in the queue by state (0 when there is none).",
            labels=["state"],
        )
        for state in counts:
            age.add_metric([state], ages.get(state, 0.0))
        yield age


_QUEUE = _QueueCollector()
REGISTRY.register(_QUEUE)


def watch_queue(source: Callable[[], Iterable[QueuedMessage]] | None) -> None:
    """Read queue depth from ``source`` (the running spool's messages) at each scrape; None
    when the spool stops."""
    _QUEUE.source = source


# -- the page ---------------------------------------------------------------------------------

PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def may_scrape(peer: str | None, headers: Any) -> bool:
    """Whether a request may read ``/metrics``: it comes straight from this machine.

    The page is unauthenticated (Prometheus scrapes without cookies), so it is served to a
    loopback peer only, and not to a request that a reverse proxy forwarded (it carries one of
    :data:`PROXY_HEADERS`): with the admin page published through a proxy, ``/metrics`` stays
    local. A proxy that adds none of them must refuse the path itself (README).
    """
    if peer is None or any(name in headers for name in PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except ValueError:
        return False


async def page(request: web.Request) -> web.Response:
    """``GET /metrics`` on the admin listener: the text exposition format, to local peers."""
    if not may_scrape(request.remote, request.headers):
        raise web.HTTPForbidden(text="/metrics is served to this machine only (see README)\n")
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
