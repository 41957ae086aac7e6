"""Google sign-in in the sandbox, driven over HTTPS by google_auth_oauthlib and google-auth.

Blocking library calls (requests underneath) run in threads: the sandbox serves from this loop.
Every requests session ignores the environment's CA variables, which would otherwise override the
sandbox CA (docs/DESIGN.md, "TLS trust").
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
from pathlib import Path
from typing import Any

import google.auth.jwt
import httpx
import pytest
import requests
from google.auth.exceptions import RefreshError
from google.auth.transport.requests import Request
from google.oauth2 import service_account
from google.oauth2.credentials import Credentials
from google_auth_oauthlib.flow import Flow
from oauthlib.oauth2.rfc6749.errors import InvalidGrantError

from mailgw_sandbox import App, Sandbox, User

SEND = "https://www.googleapis.com/auth/gmail.send"
READONLY = "https://www.googleapis.com/auth/gmail.readonly"
MAIL = "https://mail.google.com/"
REDIRECT = "http://127.0.0.1:8765/"
USERINFO_EMAIL = "https://www.googleapis.com/auth/userinfo.email"


@pytest.fixture
def app(sandbox: Sandbox) -> App:
    """A Desktop app client, as google_auth_oauthlib's installed-app flow uses."""
    return sandbox.add_app("google", desktop=True, name="Mail gateway")


@pytest.fixture
def ada(sandbox: Sandbox) -> User:
    return sandbox.add_user("google", "ada@example.com", "Ada Lovelace")


@pytest.fixture
async def http(sandbox: Sandbox, sandbox_tls: ssl.SSLContext) -> Any:
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        yield client


def session_trusting(ca_file: Path) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca_file)
    return session


def new_flow(sandbox: Sandbox, app: App, scopes: list[str]) -> Flow:
    config = {
        "installed": {
            "client_id": app.client_id,
            "client_secret": app.client_secret,
            "auth_uri": f"{sandbox.url}/o/oauth2/auth",
            "token_uri": f"{sandbox.url}/token",
            "redirect_uris": ["http://127.0.0.1/"],
        }
    }
    flow = Flow.from_client_config(config, scopes=scopes, redirect_uri=REDIRECT)
    flow.oauth2session.trust_env = False
    flow.oauth2session.verify = str(sandbox.ca_file)
    return flow


def user_credentials(sandbox: Sandbox, app: App, refresh_token: str, scopes: list[str]) -> Any:
    return Credentials(
        None,
        refresh_token=refresh_token,
        token_uri=f"{sandbox.url}/token",
        client_id=app.client_id,
        client_secret=app.client_secret,
        scopes=scopes,
    )


async def refresh(sandbox: Sandbox, credentials: Any) -> None:
    request = Request(session_trusting(sandbox.ca_file))
    await asyncio.to_thread(credentials.refresh, request)


def callback_params(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = httpx.URL(response.headers["location"])
    assert str(location).startswith(REDIRECT)
    return dict(location.params)


async def authorize(http: httpx.AsyncClient, app: App, **params: str) -> dict[str, str]:
    """Sign in with PKCE (plain) through the raw endpoint; return the callback parameters."""
    query = {
        "response_type": "code",
        "client_id": app.client_id,
        "redirect_uri": REDIRECT,
        "scope": SEND,
        "state": "xyz",
        "code_challenge": "v" * 43,
        "code_challenge_method": "plain",
        "access_type": "offline",
        **params,
    }
    return callback_params(await http.get("/o/oauth2/v2/auth", params=query))


def token_form(app: App, code: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": "v" * 43,
        "client_id": app.client_id,
        "client_secret": app.client_secret or "",
        **extra,
    }


async def test_flow_signs_in_and_credentials_refresh_after_expiry(
    sandbox: Sandbox,
    app: App,
    ada: User,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sandbox.add_user("google", "grace@example.com")  # two accounts: login_hint picks one
    flow = new_flow(sandbox, app, [READONLY, "openid", "email"])
    url, state = flow.authorization_url(prompt="consent", login_hint=ada.address)
    params = callback_params(await http.get(url))
    assert params["state"] == state
    assert params["scope"] == f"{READONLY} openid {USERINFO_EMAIL}"  # Google's spelling

    with pytest.raises(Warning, match="Scope has changed"):  # what oauthlib makes of that
        await asyncio.to_thread(flow.fetch_token, code=params["code"])
    monkeypatch.setenv("OAUTHLIB_RELAX_TOKEN_SCOPE", "1")  # as real Google clients must
    url, _ = flow.authorization_url(prompt="consent", login_hint=ada.address)
    params = callback_params(await http.get(url))
    token = await asyncio.to_thread(flow.fetch_token, code=params["code"])
    assert token["scope"] == [READONLY, "openid", USERINFO_EMAIL]
    assert set(token) >= {"access_token", "expires_in", "refresh_token", "scope", "id_token"}
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3599
    claims = google.auth.jwt.decode(token["id_token"], verify=False)
    assert (claims["email"], claims["aud"]) == (ada.address, app.client_id)
    signed_in = flow.credentials
    with pytest.raises(InvalidGrantError):  # a code works once
        await asyncio.to_thread(flow.fetch_token, code=params["code"])

    first = signed_in.token
    profile = "/gmail/v1/users/me/profile"
    assert (await http.get(profile, headers={"Authorization": f"Bearer {first}"})).is_success
    sandbox.directory.expire_access_tokens("google")
    expired = await http.get(profile, headers={"Authorization": f"Bearer {first}"})
    assert expired.status_code == 401

    credentials = user_credentials(sandbox, app, signed_in.refresh_token, [READONLY])
    await refresh(sandbox, credentials)
    assert credentials.token not in (None, first)
    assert credentials.refresh_token == signed_in.refresh_token  # not rotated
    renewed = await http.get(profile, headers={"Authorization": f"Bearer {credentials.token}"})
    assert renewed.json()["emailAddress"] == ada.address
    grant = sandbox.directory.find(credentials.token, "access", "google")
    assert grant is not None and grant.scopes == {READONLY}  # the subset asked for


async def test_refresh_of_a_revoked_user_is_invalid_grant(
    sandbox: Sandbox, app: App, ada: User, http: httpx.AsyncClient
) -> None:
    code = (await authorize(http, app))["code"]
    token = (await http.post("/token", data=token_form(app, code))).json()
    sandbox.directory.revoke_user(ada.address)
    credentials = user_credentials(sandbox, app, token["refresh_token"], [SEND])
    with pytest.raises(RefreshError, match=r"invalid_grant: Token has been expired or revoked\."):
        await refresh(sandbox, credentials)


async def test_code_exchange_failures_answer_like_google(
    sandbox: Sandbox, app: App, ada: User, http: httpx.AsyncClient
) -> None:
    cases = [
        ({"code_verifier": "w" * 43}, 400, "invalid_grant", "Invalid code verifier."),
        ({"code_verifier": ""}, 400, "invalid_grant", "Missing code verifier."),
        ({"redirect_uri": "http://127.0.0.1:9/"}, 400, "redirect_uri_mismatch", "Bad Request"),
        ({"client_secret": "GOCSPX-wrong"}, 401, "invalid_client", "Unauthorized"),
        ({"client_id": "nobody.apps.googleusercontent.com"}, 401, "invalid_client", None),
    ]
    for extra, status, error, description in cases:
        code = (await authorize(http, app))["code"]
        answer = await http.post("/token", data=token_form(app, code, **extra))
        assert answer.status_code == status, extra
        assert answer.json()["error"] == error
        assert answer.json()["error_description"] == (
            description or "The OAuth client was not found."
        )


async def test_s256_with_basic_auth_and_no_refresh_token_when_online(
    app: App, ada: User, http: httpx.AsyncClient
) -> None:
    verifier = "k" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    code = (
        await authorize(
            http,
            app,
            code_challenge=challenge.decode(),
            code_challenge_method="S256",
            access_type="online",
        )
    )["code"]
    form = token_form(app, code, code_verifier=verifier)
    del form["client_id"], form["client_secret"]
    answer = await http.post("/token", data=form, auth=(app.client_id, app.client_secret or ""))
    assert answer.status_code == 200, answer.text
    assert list(answer.json()) == ["access_token", "expires_in", "scope", "token_type"]


async def test_returning_user_adds_scopes_without_a_new_refresh_token(
    app: App, ada: User, http: httpx.AsyncClient
) -> None:
    first = await authorize(http, app)
    assert (
        "refresh_token" in (await http.post("/token", data=token_form(app, first["code"]))).json()
    )
    again = await authorize(http, app, scope=READONLY, include_granted_scopes="true")
    assert again["scope"] == f"{READONLY} {SEND}"  # what was granted before comes along
    token = (await http.post("/token", data=token_form(app, again["code"]))).json()
    assert "refresh_token" not in token  # only the first consent, or prompt=consent, gives one
    assert token["scope"] == f"{READONLY} {SEND}"


async def test_service_account_acts_for_a_user_within_its_delegated_scopes(
    sandbox: Sandbox, ada: User
) -> None:
    info = sandbox.google.add_service_account([SEND], origin=sandbox.url)
    delegated = service_account.Credentials.from_service_account_info(
        info, scopes=[SEND], subject=ada.address
    )
    await refresh(sandbox, delegated)
    grant = sandbox.directory.find(delegated.token, "access", "google")
    assert grant is not None and (grant.user, grant.scopes) == (ada.address, {SEND})

    undelegated = service_account.Credentials.from_service_account_info(
        info, scopes=[MAIL], subject=ada.address
    )
    with pytest.raises(RefreshError, match="unauthorized_client: Client is unauthorized"):
        await refresh(sandbox, undelegated)
    stranger = service_account.Credentials.from_service_account_info(
        info, scopes=[SEND], subject="eve@example.com"
    )
    with pytest.raises(RefreshError, match="invalid_grant: Invalid email or User ID"):
        await refresh(sandbox, stranger)


async def test_device_flow_refuses_gmail_scopes(app: App, http: httpx.AsyncClient) -> None:
    refused = await http.post("/device/code", data={"client_id": app.client_id, "scope": SEND})
    assert refused.status_code == 400
    assert refused.json() == {
        "error": "invalid_scope",
        "error_description": f"Invalid device flow scope: {SEND}",
    }
    allowed = await http.post(
        "/device/code", data={"client_id": app.client_id, "scope": "openid email"}
    )
    assert allowed.status_code == 200
    assert {"device_code", "user_code", "verification_url", "interval"} <= set(allowed.json())


async def test_user_who_denies_is_sent_back_with_access_denied(
    sandbox: Sandbox, app: App, ada: User, http: httpx.AsyncClient
) -> None:
    sandbox.context.consent = "deny"
    params = await authorize(http, app)
    assert params == {"state": "xyz", "error": "access_denied"}


async def test_consent_screen_chooses_account_once(
    sandbox: Sandbox, app: App, ada: User, http: httpx.AsyncClient
) -> None:
    grace = sandbox.add_user("google", "grace@example.com")
    sandbox.context.consent = "screen"
    page = await http.get(
        "/o/oauth2/v2/auth",
        params={
            "response_type": "code",
            "client_id": app.client_id,
            "redirect_uri": REDIRECT,
            "scope": SEND,
            "state": "s1",
        },
    )
    assert page.status_code == 200 and "Mail gateway" in page.text
    assert ada.address in page.text and grace.address in page.text
    match = re.search(r'name=request value="([^"]+)"', page.text)
    assert match is not None
    form = {"request": match[1], "account": grace.address, "decision": "allow"}
    forged = await http.post(
        "/o/oauth2/consent", data=form, headers={"Origin": "https://evil.example"}
    )
    assert forged.status_code == 403
    params = callback_params(await http.post("/o/oauth2/consent", data=form))
    assert params["state"] == "s1" and params["code"].startswith("4/0A")
    replay = await http.post("/o/oauth2/consent", data=form)
    assert replay.status_code == 400
    form = token_form(app, params["code"])
    del form["code_verifier"]
    token = (await http.post("/token", data=form)).json()
    assert "refresh_token" not in token  # access_type was not offline
    grant = sandbox.directory.find(token["access_token"], "access", "google")
    assert grant is not None and grant.user == grace.address


async def test_redirect_uris_follow_the_client_type(
    sandbox: Sandbox, app: App, ada: User, http: httpx.AsyncClient
) -> None:
    """A Desktop app client takes only loopback redirects (any port); a Web application only
    its registered URIs, exactly: a gateway reached by a host name needs a Web client."""
    gateway = "https://gateway.example.com/oauth/callback"
    web = sandbox.add_app("google", redirect_uris=[gateway, "http://localhost:8025/oauth/callback"])

    async def outcome(client: App, redirect_uri: str) -> int:
        query = {"response_type": "code", "client_id": client.client_id, "scope": SEND}
        answer = await http.get("/o/oauth2/v2/auth", params={**query, "redirect_uri": redirect_uri})
        return answer.status_code

    assert await outcome(app, "http://127.0.0.1:5000/anything") == 302
    assert await outcome(app, "http://localhost:8025/oauth/callback") == 302
    assert await outcome(app, gateway) == 400  # redirect_uri_mismatch
    assert await outcome(web, gateway) == 302
    assert await outcome(web, "http://localhost:8025/oauth/callback") == 302
    assert await outcome(web, "http://localhost:8026/oauth/callback") == 400
    assert await outcome(web, "https://gateway.example.com/oauth/callback2") == 400


async def test_identity_scopes_are_granted_in_their_url_form(
    app: App, ada: User, http: httpx.AsyncClient
) -> None:
    params = await authorize(http, app, scope=f"openid email profile {SEND}")
    token = (await http.post("/token", data=token_form(app, params["code"]))).json()
    profile = "https://www.googleapis.com/auth/userinfo.profile"
    assert token["scope"].split() == ["openid", USERINFO_EMAIL, profile, SEND]
    assert google.auth.jwt.decode(token["id_token"], verify=False)["email"] == ada.address


@pytest.mark.parametrize(
    ("change", "status", "error"),
    [
        ({"client_id": "unknown.apps.googleusercontent.com"}, 401, "invalid_client"),
        ({"redirect_uri": "https://evil.example/cb"}, 400, "redirect_uri_mismatch"),
        ({"scope": "https://www.googleapis.com/auth/gmail.sendd"}, 400, "invalid_scope"),
    ],
)
async def test_broken_authorize_requests_get_an_error_page(
    app: App,
    ada: User,
    http: httpx.AsyncClient,
    change: dict[str, str],
    status: int,
    error: str,
) -> None:
    query = {
        "response_type": "code",
        "client_id": app.client_id,
        "redirect_uri": REDIRECT,
        "scope": SEND,
        **change,
    }
    page = await http.get("/o/oauth2/v2/auth", params=query)
    assert page.status_code == status
    assert f"Error {status}: {error}" in page.text


async def test_revoking_the_access_token_revokes_the_refresh_token(
    sandbox: Sandbox, app: App, ada: User, http: httpx.AsyncClient
) -> None:
    code = (await authorize(http, app))["code"]
    token = (await http.post("/token", data=token_form(app, code))).json()
    assert (await http.post("/revoke", data={"token": token["access_token"]})).status_code == 200
    again = await http.post("/revoke", data={"token": token["access_token"]})
    assert again.json()["error"] == "invalid_token"
    refreshed = await http.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token["refresh_token"],
            "client_id": app.client_id,
            "client_secret": app.client_secret or "",
        },
    )
    assert refreshed.status_code == 400
    assert refreshed.json()["error_description"] == "Token has been expired or revoked."
