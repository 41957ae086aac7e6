"""``providers._http`` and the senders: what a 401 leads to; no auth failure is ever Permanent.

The provider is an ``httpx.MockTransport`` answering as Graph / Gmail do; the token source is
a small fake of the broker (the real one is exercised in tests/integration/test_token_refresh).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import httpx
import pytest

from gateway.config import AccountSettings
from gateway.delivery import Envelope, Permanent, ReauthRequired, Temporary
from gateway.oauth import AuthUnavailable
from gateway.providers import GmailSender, _http
from tests.helpers import PASSWORD_HASH

CLAIMS = '{"access_token":{"nbf":{"essential":true,"value":"1604106651"}}}'
CAE_CHALLENGE = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/'
    'authorize", error="insufficient_claims", '
    f'claims="{base64.b64encode(CLAIMS.encode()).decode()}"'
)


class Tokens:
    def __init__(self, failure: Exception | None = None) -> None:
        self.current = "token-1"
        self.renewals: list[tuple[str, str | None]] = []
        self.failure = failure

    async def access_token(self, username: str) -> str:
        return self.current

    async def refreshed_token(self, username: str, rejected: str, claims: str | None = None) -> str:
        self.renewals.append((rejected, claims))
        if self.failure is not None:
            raise self.failure
        self.current = f"token-{len(self.renewals) + 1}"
        return self.current


def _api(answer: httpx.MockTransport, tokens: Tokens) -> _http.Api:
    return _http.Api(httpx.AsyncClient(transport=answer), tokens, "crm")


def _refusing(refused: set[str], headers: dict[str, str] | None = None) -> httpx.MockTransport:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        seen.append(token)
        if token in refused:
            body = {"error": {"code": "InvalidAuthenticationToken", "message": "revoked"}}
            return httpx.Response(401, json=body, headers=headers or {})
        return httpx.Response(200, json={"ok": token})

    transport = httpx.MockTransport(handle)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


async def test_401_replaces_the_token_once_passing_the_claims_challenge() -> None:
    tokens = Tokens()
    transport = _refusing({"token-1"}, {"WWW-Authenticate": CAE_CHALLENGE})
    response = await _api(transport, tokens).call("GET", "https://graph.test/me", "Graph me")
    assert response.json() == {"ok": "token-2"}
    assert tokens.renewals == [("token-1", CLAIMS)]
    assert transport.seen == ["token-1", "token-2"]  # type: ignore[attr-defined]


async def test_a_plain_401_is_renewed_without_claims() -> None:
    tokens = Tokens()
    await _api(_refusing({"token-1"}), tokens).call("PUT", "https://up.test/s", "Gmail upload")
    assert tokens.renewals == [("token-1", None)]


async def test_a_new_token_refused_too_is_temporary_and_says_so() -> None:
    tokens = Tokens()
    with pytest.raises(Temporary) as refused:
        await _api(_refusing({"token-1", "token-2"}), tokens).call(
            "POST", "https://graph.test/sendMail", "Graph sendMail"
        )
    assert str(refused.value) == (
        "Graph sendMail: the provider refused a newly issued access token too "
        "(HTTP 401 InvalidAuthenticationToken: revoked)"
    )
    assert tokens.renewals == [("token-1", None)]


async def test_a_refresh_that_cannot_happen_now_is_temporary_and_a_lost_grant_holds() -> None:
    unavailable = Tokens(AuthUnavailable("token endpoint answered 503"))
    with pytest.raises(Temporary, match="sign-in service unavailable"):
        await _api(_refusing({"token-1"}), unavailable).call("GET", "https://g.test/", "Gmail")
    gone = Tokens(ReauthRequired("invalid_grant: revoked"))
    with pytest.raises(ReauthRequired):
        await _api(_refusing({"token-1"}), gone).call("GET", "https://g.test/", "Gmail")


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (401, {"error": {"code": "InvalidAuthenticationToken"}}, {}, Temporary),
        (
            403,
            {"error": {"code": 403, "errors": [{"reason": "insufficientPermissions"}]}},
            {},
            ReauthRequired,
        ),
        (403, {"error": {"code": "ErrorAccessDenied"}}, {}, ReauthRequired),
        (
            403,
            {"error": {"code": "Forbidden"}},
            {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="Mail.Send"'},
            ReauthRequired,
        ),
        (400, {"error": {"code": "ErrorInvalidRecipients"}}, {}, Permanent),
    ],
)
def test_classify_never_dead_letters_an_auth_failure(
    status: int, body: dict, headers: dict[str, str], expected: type[Exception]
) -> None:
    response = httpx.Response(status, json=body, headers=headers)
    assert type(_http.classify(response, "Graph sendMail")) is expected


def test_claims_challenge_parsing() -> None:
    assert _http.claims_challenge({"WWW-Authenticate": CAE_CHALLENGE}) == CLAIMS
    unpadded = base64.urlsafe_b64encode(CLAIMS.encode()).decode().rstrip("=")
    header = f'Bearer error="insufficient_claims", claims="{unpadded}"'
    assert json.loads(_http.claims_challenge({"WWW-Authenticate": header}) or "{}")
    assert _http.claims_challenge({"WWW-Authenticate": 'Bearer error="invalid_token"'}) is None
    broken = 'Bearer error="insufficient_claims", claims="%%%"'
    assert _http.claims_challenge({"WWW-Authenticate": broken}) is None
    assert _http.claims_challenge({}) is None


async def test_gmail_from_check_without_the_readonly_scope_holds_instead_of_refusing() -> None:
    """An alias From that cannot be verified because the consent lacks gmail.readonly (a 403)
    is held for re-consent, not dead-lettered: reconnecting with the scope lets it go."""

    def gmail(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/settings/sendAs"), request.url
        challenge = 'Bearer realm="https://accounts.google.com/", error="insufficient_scope"'
        body = {"error": {"code": 403, "errors": [{"reason": "insufficientPermissions"}]}}
        return httpx.Response(403, json=body, headers={"WWW-Authenticate": challenge})

    account = AccountSettings(
        username="scanner",
        password_hash=PASSWORD_HASH,
        provider="google",
        address="scanner@example.com",
    )
    envelope = Envelope(
        "scanner", "app@example.org", ("a@example.org",), False, datetime.now(UTC), "127.0.0.1"
    )
    message = b"From: scans@example.com\r\nTo: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    client = httpx.AsyncClient(transport=httpx.MockTransport(gmail))
    sender = GmailSender(client, Tokens(), "https://gmail.test")
    with pytest.raises(ReauthRequired, match=r"needs the gmail\.readonly scope"):
        await sender.send(account, envelope, message)
