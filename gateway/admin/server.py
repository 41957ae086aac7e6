"""The admin web listener: server-rendered pages on aiohttp, on the shared loop.

Plain HTML forms that work without JavaScript. Every page but sign-in and ``/healthz`` needs a
signed-in admin; every POST needs the session's CSRF token (see :mod:`.auth`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from .. import __version__, metrics
from ..admission import ConnectionLimits
from ..config import Settings
from ..login_gate import ADMIN, Accepted, LoginGate, Refused, UserKey
from ..logs import get_logger
from ..oauth import AuthUnavailable, OAuthError, TokenBroker, short_scope
from ..passwords import parse_hash
from ..runtime import RunningListener, default_limits, listen_asyncio
from ..spool import SpoolWorker
from ..store import SqlDatabase, StoreError
from . import i18n
from .auth import CSRF_FIELD, SESSION_COOKIE, AdminSession, SessionStore

log = get_logger(__name__)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on form
    # posts, and the Origin check below could not tell our own forms from a forged one.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def content_security_policy(settings: Settings) -> str:
    """Forms may post to this page and, for Connect, redirect on to the sign-in providers."""
    providers = {
        _origin(settings.microsoft.authority_host),
        _origin(settings.google.auth_uri),
    }
    targets = " ".join(["'self'", *sorted(providers)])
    return (
        f"default-src 'none'; style-src 'unsafe-inline'; form-action {targets}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


Origin = tuple[str, str, int]
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> Origin | None:
    """(scheme, host, port) of a URL, lower-cased with the default port filled in, so that
    ``https://Gateway.example`` and ``https://gateway.example:443`` compare equal; None when
    the URL names no http(s) host (e.g. the ``Origin: null`` of a sandboxed frame)."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number
        return None
    if scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    return scheme, parts.hostname, port


# A path on this site: one "/", then printable ASCII without a backslash. Browsers drop tabs
# and newlines from a Location and read "\" as "/", so "/%09/evil.example" and "/\evil.example"
# would leave the site ("//evil.example"); anything not plainly local is refused, not cleaned.
_LOCAL_PATH = re.compile(r"/(?!/)[\x21-\x5b\x5d-\x7e]*")


def local_path(target: str | None) -> str:
    """``target`` if it is a path on this site, else "/" (never an open redirect)."""
    return target if target and _LOCAL_PATH.fullmatch(target) else "/"


PUBLIC_PATHS = frozenset({"/login", "/healthz", "/metrics", "/lang", "/oauth/callback"})
# The OAuth state parameter is the CSRF token of the sign-in response (RFC 6749 §10.12), and
# Microsoft's form_post arrives cross-site by design.
CSRF_EXEMPT = frozenset({"/oauth/callback"})
PUBLIC_PREFIXES = ("/consent/",)  # opened by mailbox owners, who have no admin password
LANG_COOKIE = "gw_lang"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ListenerView = Callable[[], Mapping[str, int]]

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.admin", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_templates.filters["scope_name"] = short_scope


@dataclass
class AdminState:
    settings: Settings
    broker: TokenBroker
    spool: SpoolWorker
    listeners: ListenerView
    sessions: SessionStore
    # The gateway's one login gate (5 wrong admin passwords per 5 minutes per client address).
    gate: LoginGate = field(default_factory=LoginGate)
    csp: str = ""

    def __post_init__(self) -> None:
        self.csp = content_security_policy(self.settings)


STATE = web.AppKey("state", AdminState)
ADMIN_USER = UserKey.of(ADMIN, "admin")  # the page has one password, so one username
# A union is no class: aiohttp takes it as the type argument (its repr reads it from there).
SESSION = web.RequestKey[AdminSession | None]("session")
LANGUAGE = web.RequestKey("lang", str)


def _state(request: web.Request) -> AdminState:
    return request.app[STATE]


def _session(request: web.Request) -> AdminSession | None:
    return request.get(SESSION)


def render(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    language = request[LANGUAGE]
    session = _session(request)
    html = _templates.get_template(template).render(
        _=i18n.translator(language),
        lang=language,
        other_lang="ja" if language == "en" else "en",
        path=request.path_qs,
        signed_in=bool(session and session.signed_in),
        csrf_token=session.csrf_token if session else "",
        **values,
    )
    return web.Response(text=html, status=status, content_type="text/html")


def _set_session_cookie(
    request: web.Request, response: web.StreamResponse, session: AdminSession
) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        httponly=True,
        samesite="Strict",
        # Behind an HTTPS proxy the request arrives as http: public_url says what browsers see.
        secure=(_expected_origin(request) or ("http",))[0] == "https",
        path="/",
    )


def _expected_origin(request: web.Request) -> Origin | None:
    """Where our own forms come from: ``admin.public_url`` when set (behind an HTTPS reverse
    proxy the request itself arrives as http://127.0.0.1), else the request's own origin."""
    public_url = _state(request).settings.admin.public_url
    return origin_of(public_url or f"{request.scheme}://{request.host}")


def _same_origin(request: web.Request) -> bool:
    """A browser-sent Origin (or Referer) must name this page; absent headers are allowed."""
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value:
            origin = origin_of(value)
            return origin is not None and origin == _expected_origin(request)
    return True


@web.middleware
async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[LANGUAGE] = i18n.negotiate(
        request.headers.get("Accept-Language"), request.cookies.get(LANG_COOKIE)
    )
    try:
        return await _signed_in_only(request, handler)
    except StoreError as error:  # the state database is unreachable: said, never a 500
        log.warning("admin.store_unavailable", path=request.path, reason=str(error))
        message = i18n.translator(request[LANGUAGE])("store_unavailable")
        return render(request, "message.html", 503, message=message, failed=True)


async def _signed_in_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The session's CSRF token on every form, and a signed-in session on every private page."""
    session = await _state(request).sessions.get(request.cookies.get(SESSION_COOKIE))
    request[SESSION] = session
    if request.method not in ("GET", "HEAD") and request.path not in CSRF_EXEMPT:
        form = await request.post()
        token = form.get(CSRF_FIELD)
        if (
            session is None
            or not session.csrf_matches(token if isinstance(token, str) else None)
            or not _same_origin(request)
        ):
            log.warning("admin.csrf_refused", path=request.path, client=request.remote)
            message = i18n.translator(request[LANGUAGE])("forbidden_form")
            return render(request, "message.html", 403, message=message, failed=True)
    public = request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES)
    if not public and not (session and session.signed_in):
        raise web.HTTPSeeOther("/login")
    return await handler(request)


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response as it is sent (an ``on_response_prepare`` signal, not the middleware:
    redirects, 404, 405 and error pages are raised past middlewares and would miss them)."""
    response.headers.update(SECURITY_HEADERS)
    response.headers["Content-Security-Policy"] = request.app[STATE].csp


async def login_page(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    session = _session(request) or await state.sessions.new()
    request[SESSION] = session
    if session.signed_in:
        raise web.HTTPSeeOther("/")
    error = (
        None if _sign_in_enabled(state) else i18n.translator(request[LANGUAGE])("sign_in_disabled")
    )
    response = render(request, "login.html", enabled=_sign_in_enabled(state), error=error)
    _set_session_cookie(request, response, session)
    return response


def _sign_in_enabled(state: AdminState) -> bool:
    return state.settings.admin.password_hash is not None


async def login(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    session = _session(request)
    assert session is not None  # the CSRF check guarantees a session
    translate = i18n.translator(request[LANGUAGE])
    client = request.remote or "?"
    password = (await request.post()).get("password")
    stored = state.settings.admin.password_hash
    verdict: Accepted | Refused = Refused()  # sign-in disabled, or no password sent
    if stored is not None and isinstance(password, str):
        verdict = await state.gate.check(
            client, ADMIN_USER, password, parse_hash(stored), protocol="admin"
        )
    if isinstance(verdict, Refused) and verdict.throttled:
        error = translate("sign_in_throttled", seconds=math.ceil(verdict.retry_after))
        return render(request, "login.html", 429, enabled=True, error=error)
    if isinstance(verdict, Refused):
        return render(
            request,
            "login.html",
            401,
            enabled=stored is not None,
            error=translate("sign_in_failed"),
        )
    fresh = await state.sessions.sign_in(session)
    log.info("admin.signed_in", client=client)
    response = web.HTTPSeeOther("/")
    _set_session_cookie(request, response, fresh)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    session = _session(request)
    if session is not None:
        await _state(request).sessions.drop(session)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


async def status(request: web.Request, link: dict[str, str] | None = None) -> web.Response:
    state = _state(request)
    statuses = await state.broker.statuses()
    advice = {
        s.account.username: _entra_advice(request, s.last_error)
        for s in statuses
        if s.account.provider == "microsoft"
    }
    return render(
        request,
        "status.html",
        statuses=statuses,
        advice=advice,
        redirect_uri=state.broker.redirect_uri(),
        entra_web=_entra_web_platform(state.settings),
        google_client=await state.broker.google_client_origin(),
        link=link,
        listeners=state.listeners(),
        version=__version__,
    )


def _entra_web_platform(settings: Settings) -> bool:
    """With a client secret or certificate, the gateway signs in as a Web app (confidential);
    without, as a public client. Entra must have the redirect URI on the matching platform."""
    microsoft = settings.microsoft
    return microsoft.client_secret is not None or microsoft.client_certificate is not None


def _entra_advice(request: web.Request, error: str | None) -> str | None:
    state = _state(request)
    return i18n.entra_advice(
        request[LANGUAGE],
        error,
        state.broker.redirect_uri(),
        _entra_web_platform(state.settings),
    )


def _message(
    request: web.Request, text: str, status: int = 200, failed: bool = False
) -> web.Response:
    return render(request, "message.html", status, message=text, failed=failed)


def _consent_failed(
    request: web.Request, error: OAuthError, from_link: bool = False
) -> web.Response:
    """A sign-in that did not work, said so that the person can act: a provider outage asks
    them to try again later (a consent link stays valid); an Entra setup error says what to
    change in the app registration."""
    translate = i18n.translator(request[LANGUAGE])
    if isinstance(error, AuthUnavailable):
        log.warning("admin.sign_in_unavailable", reason=str(error))
        text = translate("sign_in_unavailable_link" if from_link else "sign_in_unavailable")
        return _message(request, text, 503, failed=True)
    reason = translate("consent_failed", reason=str(error))
    advice = _entra_advice(request, str(error))
    return _message(request, f"{reason} {advice}" if advice else reason, 409, failed=True)


async def _redirect_to_sign_in(
    request: web.Request, username: str, link_token: str | None = None
) -> web.StreamResponse:
    try:
        url = await _state(request).broker.begin_consent(username, link_token)
    except OAuthError as error:
        return _consent_failed(request, error, from_link=link_token is not None)
    raise web.HTTPSeeOther(url)


async def connect(request: web.Request) -> web.StreamResponse:
    return await _redirect_to_sign_in(request, request.match_info["account"])


async def disconnect(request: web.Request) -> web.StreamResponse:
    try:
        await _state(request).broker.disconnect(request.match_info["account"])
    except OAuthError as error:
        return _message(request, str(error), 404, failed=True)
    raise web.HTTPSeeOther("/")


async def oauth_callback(request: web.Request) -> web.StreamResponse:
    """Where Microsoft and Google send the browser back; the state names the sign-in."""
    response = dict(await request.post()) if request.method == "POST" else dict(request.query)
    try:
        result = await _state(request).broker.complete_consent(
            {key: str(value) for key, value in response.items()}
        )
    except OAuthError as error:
        log.warning("admin.consent_failed", reason=str(error))
        return _consent_failed(request, error)
    done = i18n.translator(request[LANGUAGE])("consent_done", address=result.account.address)
    return _message(request, done)


async def create_consent_link(request: web.Request) -> web.StreamResponse:
    broker = _state(request).broker
    username = request.match_info["account"]
    try:
        url, expires = await broker.create_consent_link(username)
    except OAuthError as error:
        return _message(request, str(error), 404, failed=True)
    account = broker.account(username)
    link = {
        "address": account.address,
        "expires": expires.strftime("%Y-%m-%d %H:%M UTC"),
        "url": url,
    }
    return await status(request, link)


async def consent_page(request: web.Request) -> web.StreamResponse:
    """A button, not an action: mail scanners that open links must not spend them."""
    state = _state(request)
    token = request.match_info["token"]
    account = await state.broker.consent_link_account(token)
    if account is None:
        invalid = i18n.translator(request[LANGUAGE])("consent_link_invalid")
        return _message(request, invalid, 404, failed=True)
    session = _session(request) or await state.sessions.new()
    request[SESSION] = session
    response = render(request, "consent.html", address=account.address, token=token)
    _set_session_cookie(request, response, session)
    return response


async def consent(request: web.Request) -> web.StreamResponse:
    """Start the owner's sign-in. The link is spent only when the mailbox is connected, so a
    provider outage or an abandoned sign-in leaves it usable."""
    token = request.match_info["token"]
    account = await _state(request).broker.consent_link_account(token)
    if account is None:
        invalid = i18n.translator(request[LANGUAGE])("consent_link_invalid")
        return _message(request, invalid, 404, failed=True)
    return await _redirect_to_sign_in(request, account.username, link_token=token)


async def google_client_page(request: web.Request, error: str | None = None) -> web.Response:
    origin = await _state(request).broker.google_client_origin()
    if origin and origin[0] == "config":
        return _message(request, i18n.translator(request[LANGUAGE])("google_client_from_config"))
    client_id = origin[1] if origin else ""
    status_code = 400 if error else 200
    return render(
        request,
        "google_client.html",
        status_code,
        client_id=client_id,
        error=error,
        redirect_uri=_state(request).broker.redirect_uri(),
    )


async def save_google_client(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    client_id = str(form.get("client_id", "")).strip()
    secret = str(form.get("client_secret", "")).strip()
    if not client_id or not secret:
        return await google_client_page(request, i18n.translator(request[LANGUAGE])("required"))
    broker = _state(request).broker
    if (await broker.google_client_origin() or ("",))[0] == "config":
        raise web.HTTPSeeOther("/")
    await broker.set_google_client(client_id, secret)
    log.info("admin.google_client_saved", client_id=client_id)
    raise web.HTTPSeeOther("/")


async def queue_page(request: web.Request) -> web.Response:
    spool = _state(request).spool
    deliveries = await spool.recent_deliveries(50)
    return render(
        request,
        "queue.html",
        messages=spool.messages(),
        deliveries=deliveries,
        pauses=spool.pauses(),
    )


async def retry_message(request: web.Request) -> web.StreamResponse:
    await _state(request).spool.retry(request.match_info["id"])
    raise web.HTTPSeeOther("/queue")


async def delete_message(request: web.Request) -> web.StreamResponse:
    queue_id = request.match_info["id"]
    if await _state(request).spool.delete(queue_id):
        log.info("admin.queue_deleted", queue_id=queue_id)
    raise web.HTTPSeeOther("/queue")


async def switch_language(request: web.Request) -> web.StreamResponse:
    language = request.query.get("to")
    response = web.HTTPSeeOther(local_path(request.query.get("next")))
    if language in i18n.LANGUAGES:
        response.set_cookie(LANG_COOKIE, language, samesite="Lax", path="/", max_age=365 * 86400)
    raise response


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


def build_app(state: AdminState) -> web.Application:
    app = web.Application(middlewares=[security], client_max_size=1024 * 1024)
    app[STATE] = state
    app.on_response_prepare.append(secure_headers)
    app.router.add_get("/", status)
    app.router.add_post("/accounts/{account}/connect", connect)
    app.router.add_post("/accounts/{account}/disconnect", disconnect)
    app.router.add_post("/accounts/{account}/consent-link", create_consent_link)
    app.router.add_get("/oauth/callback", oauth_callback)
    app.router.add_post("/oauth/callback", oauth_callback)
    app.router.add_get("/consent/{token}", consent_page)
    app.router.add_post("/consent/{token}", consent)
    app.router.add_get("/google-client", google_client_page)
    app.router.add_post("/google-client", save_google_client)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/queue", queue_page)
    app.router.add_post("/queue/{id}/retry", retry_message)
    app.router.add_post("/queue/{id}/delete", delete_message)
    app.router.add_get("/lang", switch_language)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics.page)  # loopback peers only, without a session
    return app


async def serve(
    name: str,
    host: str,
    port: int,
    settings: Settings,
    broker: TokenBroker,
    spool: SpoolWorker,
    listeners: ListenerView,
    db: SqlDatabase,
    gate: LoginGate | None = None,
    limits: ConnectionLimits | None = None,
) -> RunningListener:
    """Start the admin listener; sign-in sessions are kept in ``db`` (valid on every instance
    sharing it). ``limits`` are the process's connection caps (a connection here never logs in
    at the socket level, so each is closed, after the request in hand, at its pre-login
    deadline; browsers reconnect)."""
    sessions = SessionStore(db, settings.admin.session_minutes * 60)
    state = AdminState(settings, broker, spool, listeners, sessions)
    if gate is not None:
        state.gate = gate
    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    server = runner.server
    if server is None:  # aiohttp sets it in setup(): never None here
        raise RuntimeError("aiohttp's AppRunner.setup() left no server")
    return await listen_asyncio(
        name,
        "admin",
        host,
        port,
        limits or default_limits(),
        _REFUSALS,
        server,
        runner.cleanup,
    )


# A browser that opened too many connections gets a plain 503 instead of a reset.
_REFUSALS = dict.fromkeys(
    ("address", "total"),
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n",
)
