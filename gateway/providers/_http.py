"""Authorized HTTPS calls to Graph and Gmail, and the one place their failures are classified.

* 429, 5xx, timeouts and broken connections → :class:`Temporary`, with ``Retry-After`` read as
  decimal seconds (Graph's documented sample is ``2.128``);
* 401 → the refused token is replaced by a newly issued one (the broker makes one forced
  refresh, bypassing every token cache, and passes on a continuous-access-evaluation ``claims``
  challenge) and the call is made once more; a refresh that fails for good raises
  :class:`ReauthRequired` (the mail is held); a second 401 is Temporary, saying so;
* 403 for missing permissions or scope → :class:`ReauthRequired` (the owner must consent to the
  wider scope, after which the held mail goes out); other 4xx → :class:`Permanent` with the
  provider's own message. No authentication or authorization failure is ever Permanent: a
  message must not become a dead letter because of a token.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from .. import metrics
from ..delivery import Permanent, ReauthRequired, Temporary
from ..oauth import AuthUnavailable
from ._base import TokenSource

# Provider error codes that say "this token lacks a permission", not "this message is bad".
_SCOPE_CODES = frozenset({"ErrorAccessDenied", "insufficientPermissions", "forbidden"})
# Google answers some quota errors with 403 instead of 429.
_QUOTA_CODES = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "dailyLimitExceeded"})
# Graph codes of a refused message, with the SMTP reply an inline refusal should carry.
_SMTP_STATUS = {
    "ErrorSendAsDenied": (553, "5.7.1"),
    "ErrorMessageSizeExceeded": (552, "5.3.4"),
    "uploadTooLarge": (552, "5.3.4"),
    "ErrorInvalidRecipients": (550, "5.1.3"),
}


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After as seconds: a decimal number, or an HTTP date (RFC 9110)."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)="([^"]*)"')


def claims_challenge(headers: Mapping[str, str]) -> str | None:
    """The JSON claims request of a ``WWW-Authenticate: Bearer error="insufficient_claims",
    claims="<base64>"`` answer (continuous access evaluation), decoded as MSAL's
    ``claims_challenge`` wants it; None when the 401 carries no such challenge.

    Microsoft: "Claims challenges, claims requests and client capabilities" and "How to use
    Continuous Access Evaluation enabled APIs in your applications" (learn.microsoft.com).
    """
    params = dict(_CHALLENGE_PARAM.findall(headers.get("WWW-Authenticate", "")))
    encoded = params.get("claims")
    if params.get("error") != "insufficient_claims" or not encoded:
        return None
    padded = encoded.replace("-", "+").replace("_", "/") + "=" * (-len(encoded) % 4)
    try:
        return base64.b64decode(padded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def error_code(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of a Graph or Google error body; the status text if there is none."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code = str(error.get("code", ""))
        details = error.get("errors")
        if isinstance(details, list) and details and isinstance(details[0], dict):
            code = str(details[0].get("reason") or code)  # Google: the reason names the case
        return code, str(error.get("message", "")) or response.reason_phrase
    return str(response.status_code), response.reason_phrase or "no reason given"


def classify(response: httpx.Response, what: str) -> Exception:
    """The error to raise for a failed ``response`` (any status ≥ 400).

    A 401 reaching here (from a request that carries no bearer token of ours, or one already
    retried with a new token) is Temporary: a token problem, never a fault of the message.
    """
    status = response.status_code
    code, message = error_code(response)
    reason = f"{what}: HTTP {status} {code}: {message}"
    if status == 429 or status >= 500 or (status == 403 and code in _QUOTA_CODES):
        # 429, 503 and quota 403s limit the mailbox (or app), not this message: pause it all.
        throttled = status in (403, 429, 503)
        return Temporary(reason, retry_after(response.headers), throttled=throttled)
    if status == 401:
        return Temporary(f"{reason} — the provider did not accept the credentials")
    if status == 403 and (code in _SCOPE_CODES or _insufficient_scope(response)):
        return ReauthRequired(
            f"{reason} — the account's consent lacks a permission this needs; reconnect it"
        )
    smtp_code, enhanced = _SMTP_STATUS.get(code, (554, "5.0.0"))
    if status == 413:
        smtp_code, enhanced = 552, "5.3.4"
    return Permanent(reason, smtp_code, enhanced)


def _insufficient_scope(response: httpx.Response) -> bool:
    """RFC 6750 §3.1: a 403 whose challenge says the token lacks a scope."""
    challenge = dict(_CHALLENGE_PARAM.findall(response.headers.get("WWW-Authenticate", "")))
    return challenge.get("error") == "insufficient_scope"


class Api:
    """One account's authorized calls: bearer token from the broker, one retry after a 401."""

    def __init__(self, client: httpx.AsyncClient, tokens: TokenSource, username: str) -> None:
        self.client = client
        self.tokens = tokens
        self.username = username

    async def _token(self, rejected: str | None = None, claims: str | None = None) -> str:
        """The account's token; with ``rejected``, a newly issued one to replace it."""
        try:
            if rejected is None:
                return await self.tokens.access_token(self.username)
            return await self.tokens.refreshed_token(self.username, rejected, claims)
        except AuthUnavailable as error:
            raise Temporary(f"sign-in service unavailable: {error}") from error

    async def call(
        self,
        method: str,
        url: str,
        what: str,
        *,
        ok: Callable[[int], bool] = lambda status: status < 300,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with the account's token; return a response ``ok`` accepts or raise classified.

        Request bodies given as ``content`` must be re-iterable (bytes or a list) because a 401
        makes the call twice.
        """
        token = await self._token()
        response = await self._once(method, url, what, token, **kwargs)
        if response.status_code == 401:
            token = await self._token(rejected=token, claims=claims_challenge(response.headers))
            response = await self._once(method, url, what, token, **kwargs)
            if response.status_code == 401:
                code, message = error_code(response)
                raise Temporary(
                    f"{what}: the provider refused a newly issued access token too "
                    f"(HTTP 401 {code}: {message})"
                )
        if ok(response.status_code):
            return response
        raise classify(response, what)

    async def _once(
        self, method: str, url: str, what: str, token: str, **kwargs: Any
    ) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {token}"}
        request = send(self.client, method, url, what, headers=headers, **kwargs)
        return await metrics.provider_request(what, request)


async def send(
    client: httpx.AsyncClient, method: str, url: str, what: str, **kwargs: Any
) -> httpx.Response:
    """One request; transport failures (reset, timeout, refused) become Temporary.

    Only a failure to connect (or to get a pooled connection) proves that nothing was sent;
    after that, a lost answer leaves the outcome unknown (``Temporary.outcome_unknown``).
    """
    try:
        return await client.request(method, url, **kwargs)
    except httpx.TransportError as error:
        unsent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        raise Temporary(
            f"{what}: {type(error).__name__}: {error or 'connection failed'}",
            outcome_unknown=not unsent,
        ) from error


def check_write(response: httpx.Response, what: str, scope: str) -> None:
    """Raise for a failed mirroring write as ``Api.call`` would, but say which scope a 403
    for a missing permission lacks: mirroring is opt-in and asks for more than reading."""
    if response.status_code < 300:
        return
    error = classify(response, what)
    if isinstance(error, ReauthRequired):
        code, message = error_code(response)
        raise ReauthRequired(
            f"{what}: HTTP 403 {code}: {message} — mirroring changes to the provider needs the "
            f"{scope} scope, which this account's consent lacks: enable the option's scope and "
            "reconnect the account"
        )
    raise error
