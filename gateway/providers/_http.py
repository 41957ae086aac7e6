"""Authorized HTTPS calls to Graph and Gmail, and the one place their failures are classified.

* 429, 5xx, timeouts and broken connections → :class:`Temporary`, with ``Retry-After`` read as
  decimal seconds (Graph's documented sample is ``2.128``);
* 401 → the token is dropped and the call is made once more with a fresh one; a second 401 is
  Temporary (the token service may lag behind a revocation being lifted, or vice versa);
* 403 for missing permissions → :class:`ReauthRequired` (the owner must consent to the wider
  scope, after which the held mail goes out); other 4xx → :class:`Permanent` with the provider's
  own message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from ..oauth import AuthUnavailable
from ._base import TokenSource
from ._errors import Permanent, ReauthRequired, Temporary

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
    """The error to raise for a failed ``response`` (any status ≥ 400 but 401)."""
    status = response.status_code
    code, message = error_code(response)
    reason = f"{what}: HTTP {status} {code}: {message}"
    if status == 429 or status >= 500 or (status == 403 and code in _QUOTA_CODES):
        # 429, 503 and quota 403s limit the mailbox (or app), not this message: pause it all.
        throttled = status in (403, 429, 503)
        return Temporary(reason, retry_after(response.headers), throttled=throttled)
    if status == 403 and code in _SCOPE_CODES:
        return ReauthRequired(
            f"{reason} — the account's consent lacks a permission this needs; reconnect it"
        )
    smtp_code, enhanced = _SMTP_STATUS.get(code, (554, "5.0.0"))
    if status == 413:
        smtp_code, enhanced = 552, "5.3.4"
    return Permanent(reason, smtp_code, enhanced)


class Api:
    """One account's authorized calls: bearer token from the broker, one retry after a 401."""

    def __init__(self, client: httpx.AsyncClient, tokens: TokenSource, username: str) -> None:
        self.client = client
        self.tokens = tokens
        self.username = username

    async def _token(self) -> str:
        try:
            return await self.tokens.access_token(self.username)
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
        response = await self._once(method, url, what, **kwargs)
        if response.status_code == 401:
            self.tokens.invalidate(self.username)
            response = await self._once(method, url, what, **kwargs)
            if response.status_code == 401:
                _, message = error_code(response)
                raise Temporary(f"{what}: HTTP 401 even with a fresh token: {message}")
        if ok(response.status_code):
            return response
        raise classify(response, what)

    async def _once(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {await self._token()}"}
        return await send(self.client, method, url, what, headers=headers, **kwargs)


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
