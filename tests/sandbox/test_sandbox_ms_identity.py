"""The sandbox's Microsoft identity platform, driven by the real msal library over HTTPS.

MSAL is blocking and the sandbox serves from the test loop, so every MSAL call runs in a thread.
MSAL caches error responses per app instance, so each scenario builds its own app. MSAL gets a
``requests`` session that trusts exactly the sandbox CA: this machine sets REQUESTS_CA_BUNDLE,
which would override ``verify=`` on MSAL's own session.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from mailgw_sandbox import App, Sandbox, User

ADDRESS = "adele@contoso.example"
REDIRECT = "http://localhost:8400/callback"
SCOPES = ["Mail.Read", "https://graph.microsoft.com/Mail.Send"]
GRAPH_DEFAULT = ["https://graph.microsoft.com/.default"]

# MSAL nudges towards form_post on every auth-code flow; the query mode is what these tests use.
pytestmark = pytest.mark.filterwarnings("ignore:response_mode='form_post' is recommended")


def _session(sandbox: Sandbox) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(sandbox.ca_file)
    return session


def _authority(sandbox: Sandbox, tenant: str | None = None) -> str:
    return f"{sandbox.url}/{tenant or sandbox.microsoft.tenant_id}"


async def _public_app(sandbox: Sandbox, app: App, **options: Any) -> msal.PublicClientApplication:
    """Built in a thread: MSAL fetches the discovery document in its constructor."""
    return await asyncio.to_thread(
        msal.PublicClientApplication,
        app.client_id,
        authority=_authority(sandbox),
        instance_discovery=False,
        http_client=options.pop("http_client", None) or _session(sandbox),
        **options,
    )


async def _confidential_app(
    sandbox: Sandbox, app: App, credential: Any
) -> msal.ConfidentialClientApplication:
    return await asyncio.to_thread(
        msal.ConfidentialClientApplication,
        app.client_id,
        client_credential=credential,
        authority=_authority(sandbox),
        instance_discovery=False,
        http_client=_session(sandbox),
    )


def _setup(sandbox: Sandbox) -> tuple[App, User]:
    """A public client: the redirect URI under Mobile and desktop applications, no secret."""
    app = sandbox.add_app(
        "microsoft",
        public_client_redirect_uris=[REDIRECT],
        allow_public_client_flows=True,
        secret=False,
        name="gateway",
    )
    return app, sandbox.add_user("microsoft", ADDRESS, "Adele Vance")


async def _browse(sandbox_tls: ssl.SSLContext, url: str) -> httpx.Response:
    """The browser's part: load the authorize URL without following the redirect."""
    async with httpx.AsyncClient(verify=sandbox_tls) as browser:
        return await browser.get(url)


def _query(location: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}


async def _sign_in(
    sandbox_tls: ssl.SSLContext, client: msal.ClientApplication
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Auth code + PKCE through the authorize redirect; returns (flow, token result)."""
    flow = client.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT, login_hint=ADDRESS)
    redirect = await _browse(sandbox_tls, flow["auth_uri"])
    assert redirect.status_code == 302
    result = await asyncio.to_thread(
        client.acquire_token_by_auth_code_flow, flow, _query(redirect.headers["Location"])
    )
    return flow, result


async def _graph_me(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext, token: str, path: str = "/v1.0/me"
) -> httpx.Response:
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        return await client.get(path, headers={"Authorization": f"Bearer {token}"})


async def _token_post(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext, data: dict[str, str], **options: Any
) -> httpx.Response:
    url = f"{_authority(sandbox)}/oauth2/v2.0/token"
    async with httpx.AsyncClient(verify=sandbox_tls) as client:
        return await client.post(url, data=data, **options)


# -- discovery ------------------------------------------------------------------------------


async def test_discovery_by_tenant_id_alias_and_domain(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    _setup(sandbox)
    tenant = sandbox.microsoft.tenant_id
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        by_id = await client.get(f"/{tenant}/v2.0/.well-known/openid-configuration")
        by_domain = await client.get("/contoso.example/v2.0/.well-known/openid-configuration")
        alias = await client.get("/organizations/v2.0/.well-known/openid-configuration")
        unknown = await client.get("/fabrikam.example/v2.0/.well-known/openid-configuration")
    assert by_id.json()["token_endpoint"] == f"{sandbox.url}/{tenant}/oauth2/v2.0/token"
    assert by_id.json()["issuer"] == f"{sandbox.url}/{tenant}/v2.0"
    # A domain resolves to the tenant's GUID, which MSAL then uses as the cache realm.
    assert (
        by_domain.json()["authorization_endpoint"]
        == f"{sandbox.url}/{tenant}/oauth2/v2.0/authorize"
    )
    assert alias.json()["device_authorization_endpoint"].endswith(
        "/organizations/oauth2/v2.0/devicecode"
    )
    assert alias.json()["issuer"] == f"{sandbox.url}/{{tenantid}}/v2.0"
    assert unknown.status_code == 400
    assert unknown.json()["error"] == "invalid_tenant"
    assert unknown.json()["error_codes"] == [90002]


# -- authorization code + PKCE --------------------------------------------------------------


async def test_auth_code_with_pkce_gives_tokens_graph_accepts(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, user = _setup(sandbox)
    client = await _public_app(sandbox, app)
    flow, result = await _sign_in(sandbox_tls, client)

    assert "access_token" in result, result
    assert result["scope"] == " ".join(SCOPES)  # verbatim, so MSAL's cache lookups hit
    assert "refresh_token" in result
    claims = result["id_token_claims"]
    assert claims["nonce"] == _query(flow["auth_uri"])["nonce"]  # MSAL checks it, too
    assert (claims["oid"], claims["tid"]) == (user.id, sandbox.microsoft.tenant_id)
    assert claims["preferred_username"] == ADDRESS and claims["aud"] == app.client_id
    [account] = client.get_accounts()
    assert account["home_account_id"] == f"{user.id}.{sandbox.microsoft.tenant_id}"
    me = await _graph_me(
        sandbox, sandbox_tls, result["access_token"], "/v1.0/me/mailFolders/inbox/messages"
    )
    assert me.status_code == 200
    grant = sandbox.directory.find(result["access_token"], "access", "microsoft")
    assert grant is not None and grant.scopes == {"Mail.Read", "Mail.Send"}


# -- app types: the redirect URI's platform decides public or confidential ---------------------


async def test_web_platform_redirect_needs_a_credential(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    """A redirect URI under Web makes the code confidential: a secretless redemption gets
    AADSTS7000218 (the setup the README used to document), the secret redeems it, and its
    refresh token again needs the secret."""
    sandbox.add_user("microsoft", ADDRESS)
    unsecured = sandbox.add_app("microsoft", redirect_uris=[REDIRECT], secret=False)
    _, refused = await _sign_in(sandbox_tls, await _public_app(sandbox, unsecured))
    assert refused["error"] == "invalid_client" and refused["error_codes"] == [7000218]

    web = sandbox.add_app("microsoft", redirect_uris=[REDIRECT])
    confidential = await _confidential_app(sandbox, web, web.client_secret)
    _, result = await _sign_in(sandbox_tls, confidential)
    assert "access_token" in result, result
    refresh = {
        "client_id": web.client_id,
        "grant_type": "refresh_token",
        "refresh_token": result["refresh_token"],
    }
    without = await _token_post(sandbox, sandbox_tls, refresh)
    with_secret = await _token_post(
        sandbox, sandbox_tls, {**refresh, "client_secret": web.client_secret or ""}
    )
    assert without.json()["error_codes"] == [7000218]
    assert with_secret.status_code == 200 and "refresh_token" in with_secret.json()


async def test_public_client_redirect_refuses_a_secret(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    """Under Mobile and desktop applications the code is a public client's: PKCE alone redeems
    it, and a secret sent along (even the app's own) gets AADSTS700025."""
    sandbox.add_user("microsoft", ADDRESS)
    app = sandbox.add_app("microsoft", public_client_redirect_uris=["http://localhost/callback"])
    _, refused = await _sign_in(
        sandbox_tls, await _confidential_app(sandbox, app, app.client_secret)
    )
    assert refused["error"] == "invalid_client" and refused["error_codes"] == [700025]
    client = await _public_app(sandbox, app)
    _, result = await _sign_in(sandbox_tls, client)  # localhost: any port matches
    assert "access_token" in result, result
    [account] = client.get_accounts()
    renewed = await asyncio.to_thread(
        client.acquire_token_silent_with_error, SCOPES, account, force_refresh=True
    )
    assert renewed is not None and "access_token" in renewed, renewed


async def test_device_flow_needs_public_client_flows_allowed(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    sandbox.add_user("microsoft", ADDRESS)
    app = sandbox.add_app("microsoft", public_client_redirect_uris=[REDIRECT], secret=False)
    poll = {
        "client_id": app.client_id,
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": "x",
    }
    refused = await _token_post(sandbox, sandbox_tls, poll)
    assert refused.json()["error_codes"] == [7000218]
    app.allow_public_client_flows = True
    unknown = await _token_post(sandbox, sandbox_tls, poll)
    assert unknown.json()["error"] != "invalid_client"  # authenticated; the code is unknown


async def test_auth_code_is_single_use_and_checks_pkce(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    client = await _public_app(sandbox, app)
    flow = client.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT, login_hint=ADDRESS)
    code = _query((await _browse(sandbox_tls, flow["auth_uri"])).headers["Location"])["code"]
    form = {
        "client_id": app.client_id,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "scope": " ".join(SCOPES),
    }
    wrong_verifier = await _token_post(sandbox, sandbox_tls, {**form, "code_verifier": "x" * 43})
    wrong_redirect = await _token_post(
        sandbox,
        sandbox_tls,
        {**form, "code_verifier": flow["code_verifier"], "redirect_uri": "http://localhost:1/x"},
    )
    first = await _token_post(
        sandbox, sandbox_tls, {**form, "code_verifier": flow["code_verifier"]}
    )
    again = await _token_post(
        sandbox, sandbox_tls, {**form, "code_verifier": flow["code_verifier"]}
    )
    assert wrong_verifier.json()["error_codes"] == [501481]
    assert wrong_redirect.json()["error"] == "invalid_grant"
    assert first.status_code == 200 and "access_token" in first.json()
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant" and again.json()["error_codes"] == [54005]
    assert again.json()["error_description"].startswith("AADSTS54005: ")


async def test_forged_state_is_refused_by_msal(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    client = await _public_app(sandbox, app)
    flow = client.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT, login_hint=ADDRESS)
    redirect = await _browse(sandbox_tls, flow["auth_uri"])
    response = _query(redirect.headers["Location"])
    assert response["state"] == flow["state"]
    with pytest.raises(ValueError, match="state mismatch"):
        await asyncio.to_thread(
            client.acquire_token_by_auth_code_flow, flow, {**response, "state": "forged"}
        )


async def test_authorize_refuses_unknown_clients_and_redirects(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    base = f"{_authority(sandbox)}/oauth2/v2.0/authorize?response_type=code&scope=Mail.Read"
    unknown_client = await _browse(sandbox_tls, f"{base}&client_id=nobody&redirect_uri={REDIRECT}")
    bad_redirect = await _browse(
        sandbox_tls, f"{base}&client_id={app.client_id}&redirect_uri=https://evil.example/cb"
    )
    bad_scope = await _browse(
        sandbox_tls,
        f"{base}%20Mail.Everything&client_id={app.client_id}&redirect_uri={REDIRECT}&state=s1",
    )
    # Never redirect to an address the app did not register: show the error instead.
    assert unknown_client.status_code == 400 and "AADSTS700016" in unknown_client.text
    assert bad_redirect.status_code == 400 and "AADSTS50011" in bad_redirect.text
    assert bad_scope.status_code == 302
    assert _query(bad_scope.headers["Location"])["error"] == "invalid_scope"
    assert _query(bad_scope.headers["Location"])["state"] == "s1"


async def test_consent_denied_comes_back_as_access_denied(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    sandbox.context.consent = "deny"
    client = await _public_app(sandbox, app)
    flow = client.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT, login_hint=ADDRESS)
    redirect = await _browse(sandbox_tls, flow["auth_uri"])
    result = await asyncio.to_thread(
        client.acquire_token_by_auth_code_flow, flow, _query(redirect.headers["Location"])
    )
    assert result["error"] == "access_denied"
    assert result["error_description"].startswith("AADSTS65004")


async def test_consent_screen_accepts_once_and_only_from_its_own_page(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    sandbox.add_user("microsoft", "bob@contoso.example")
    sandbox.context.consent = "screen"
    client = await _public_app(sandbox, app)
    flow = client.initiate_auth_code_flow(SCOPES, redirect_uri=REDIRECT)
    page = await _browse(sandbox_tls, flow["auth_uri"])
    assert page.status_code == 200 and page.headers["X-Frame-Options"] == "DENY"
    assert "Mail.Read" in page.text and "bob@contoso.example" in page.text
    key = re.search(r"name='sandbox_request' value='([^']+)'", page.text)
    assert key is not None
    form = {"sandbox_request": key.group(1), "user": "bob@contoso.example", "decision": "accept"}
    async with httpx.AsyncClient(verify=sandbox_tls) as browser:
        cross_site = await browser.post(
            flow["auth_uri"], data=form, headers={"Origin": "https://evil.example"}
        )
        accepted = await browser.post(flow["auth_uri"], data=form)
        replayed = await browser.post(flow["auth_uri"], data=form)
    assert cross_site.status_code == 403
    assert accepted.status_code == 302
    assert replayed.status_code == 400
    result = await asyncio.to_thread(
        client.acquire_token_by_auth_code_flow, flow, _query(accepted.headers["Location"])
    )
    assert result["id_token_claims"]["preferred_username"] == "bob@contoso.example"


async def test_form_post_response_mode(sandbox: Sandbox, sandbox_tls: ssl.SSLContext) -> None:
    app, _ = _setup(sandbox)
    client = await _public_app(sandbox, app)
    flow = client.initiate_auth_code_flow(
        SCOPES, redirect_uri=REDIRECT, login_hint=ADDRESS, response_mode="form_post"
    )
    page = await _browse(sandbox_tls, flow["auth_uri"])
    assert page.status_code == 200
    assert f"action='{REDIRECT}'" in page.text
    fields = dict(re.findall(r"name='([^']+)' value='([^']*)'", page.text))
    result = await asyncio.to_thread(client.acquire_token_by_auth_code_flow, flow, fields)
    assert "access_token" in result, result


# -- refresh --------------------------------------------------------------------------------


async def test_silent_refresh_after_expiry_rotates_the_refresh_token(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    # MSAL refreshes any cached token with under five minutes left: it will see the expiry.
    sandbox.directory.access_lifetime["microsoft"] = 299
    client = await _public_app(sandbox, app)
    _, first = await _sign_in(sandbox_tls, client)
    [account] = client.get_accounts()
    assert sandbox.directory.expire_access_tokens("microsoft") == 1
    expired = await _graph_me(sandbox, sandbox_tls, first["access_token"])
    assert expired.status_code == 401
    refreshed = await asyncio.to_thread(client.acquire_token_silent, SCOPES, account)

    assert refreshed is not None and refreshed["token_source"] == "identity_provider"
    assert refreshed["access_token"] != first["access_token"]
    [refresh_token] = client.token_cache.search(msal.TokenCache.CredentialType.REFRESH_TOKEN)
    assert refresh_token["secret"] != first["refresh_token"]
    me = await _graph_me(sandbox, sandbox_tls, refreshed["access_token"])
    assert me.status_code == 200 and me.json()["userPrincipalName"] == ADDRESS


async def test_revoked_user_gets_invalid_grant(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    client = await _public_app(sandbox, app)
    await _sign_in(sandbox_tls, client)
    [account] = client.get_accounts()
    assert sandbox.directory.revoke_user(ADDRESS) >= 2  # the access and the refresh token
    result = await asyncio.to_thread(
        client.acquire_token_silent_with_error, SCOPES, account, force_refresh=True
    )
    assert result is not None
    assert result["error"] == "invalid_grant" and result["error_codes"] == [50173]


async def test_expired_refresh_token_and_unconsented_scope(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    client = await _public_app(sandbox, app)
    _, result = await _sign_in(sandbox_tls, client)
    form = {
        "client_id": app.client_id,
        "grant_type": "refresh_token",
        "refresh_token": result["refresh_token"],
    }
    wider = await _token_post(
        sandbox, sandbox_tls, {**form, "scope": "Mail.ReadWrite offline_access"}
    )
    later = sandbox.directory.refresh_lifetime["microsoft"] + 1
    sandbox.directory.clock = lambda: time.time() + later
    expired = await _token_post(sandbox, sandbox_tls, {**form, "scope": "Mail.Read offline_access"})
    assert (
        wider.json()["error"] == "invalid_grant" and wider.json()["suberror"] == "consent_required"
    )
    assert expired.json()["error"] == "invalid_grant" and expired.json()["error_codes"] == [700082]


# -- device code ----------------------------------------------------------------------------


async def test_device_code_flow_with_httpx_under_msal(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    sandbox.microsoft.set_device_poll_interval(1)
    # httpx sends MSAL's ``claims: None`` as an empty ``claims=``, which Entra tolerates.
    with httpx.Client(verify=sandbox_tls) as http:
        client = await _public_app(sandbox, app, http_client=http)
        flow = await asyncio.to_thread(client.initiate_device_flow, ["Mail.Read"])
        assert f"{sandbox.url}/devicelogin" in flow["message"]
        polling = asyncio.create_task(asyncio.to_thread(client.acquire_token_by_device_flow, flow))
        await sandbox.microsoft.device.first_poll(flow["user_code"])  # it is waiting now
        sandbox.microsoft.approve_device_code(flow["user_code"], ADDRESS)
        result = await polling
    assert "access_token" in result, result
    assert result["id_token_claims"]["preferred_username"] == ADDRESS


async def test_device_code_errors(sandbox: Sandbox, sandbox_tls: ssl.SSLContext) -> None:
    app, _ = _setup(sandbox)
    client = await _public_app(sandbox, app)
    declined = await asyncio.to_thread(client.initiate_device_flow, ["Mail.Read"])
    sandbox.microsoft.deny_device_code(declined["user_code"])
    result = await asyncio.to_thread(client.acquire_token_by_device_flow, declined)
    assert result["error"] == "authorization_declined"

    flow = await asyncio.to_thread(client.initiate_device_flow, ["Mail.Read"])
    poll = {
        "client_id": app.client_id,
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": flow["device_code"],
    }
    pending = await _token_post(sandbox, sandbox_tls, poll)
    too_fast = await _token_post(sandbox, sandbox_tls, poll)
    sandbox.directory.clock = lambda: time.time() + 900
    expired = await _token_post(sandbox, sandbox_tls, poll)
    assert pending.json()["error"] == "authorization_pending"
    assert pending.json()["error_codes"] == [70016]
    assert too_fast.json()["error"] == "slow_down"
    assert expired.json()["error"] == "expired_token"


async def test_device_login_page_signs_the_device_in(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app, _ = _setup(sandbox)
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as browser:
        start = await browser.post(
            f"/{sandbox.microsoft.tenant_id}/oauth2/v2.0/devicecode",
            data={
                "client_id": app.client_id,
                "scope": "Mail.Read offline_access openid",
                "claims": "",
            },
        )
        page = await browser.get("/devicelogin")
        token = re.search(r"name='sandbox_form' value='([^']+)'", page.text)
        assert token is not None
        user_code = start.json()["user_code"]
        form = {
            "sandbox_form": token.group(1),
            "user_code": user_code.lower(),
            "user": ADDRESS,
            "decision": "accept",
        }
        done = await browser.post("/devicelogin", data=form)
        reused = await browser.post("/devicelogin", data=form)
    assert start.json()["expires_in"] == 900 and start.json()["interval"] == 5
    assert "signed in" in done.text
    assert "enter the code again" in reused.text
    tokens = await _token_post(
        sandbox,
        sandbox_tls,
        {
            "client_id": app.client_id,
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "code": start.json()["device_code"],
        },
    )
    assert {"access_token", "refresh_token", "id_token"} <= tokens.json().keys()


# -- client credentials ---------------------------------------------------------------------


async def test_client_credentials_with_secret_use_app_permissions(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    app = sandbox.add_app("microsoft", app_permissions=["Mail.Read", "Mail.Send"])
    sandbox.add_user("microsoft", ADDRESS)
    client = await _confidential_app(sandbox, app, app.client_secret)
    result = await asyncio.to_thread(client.acquire_token_for_client, GRAPH_DEFAULT)
    assert "access_token" in result, result
    assert "refresh_token" not in result and "id_token" not in result
    token = result["access_token"]
    inbox = await _graph_me(
        sandbox, sandbox_tls, token, f"/v1.0/users/{ADDRESS}/mailFolders/inbox/messages"
    )
    me = await _graph_me(sandbox, sandbox_tls, token)
    assert inbox.status_code == 200
    assert me.status_code == 400
    assert (
        me.json()["error"]["message"]
        == "/me request is only valid with delegated authentication flow."
    )


def _certificate() -> tuple[str, str, str]:
    """(private key PEM, certificate PEM, SHA-1 thumbprint hex) of a fresh self-signed cert."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    return key_pem, cert_pem, certificate.fingerprint(hashes.SHA1()).hex()  # noqa: S303


async def test_client_credentials_with_certificate(sandbox: Sandbox) -> None:
    app = sandbox.add_app("microsoft", app_permissions=["Mail.Send"])
    key_pem, cert_pem, thumbprint = _certificate()
    other_key, _, other_thumbprint = _certificate()
    sandbox.microsoft.register_certificate(app.client_id, cert_pem.encode())
    credentials = {
        "RS256 with x5t": {"private_key": key_pem, "thumbprint": thumbprint},
        "PS256 with x5t#S256": {"private_key": key_pem, "public_certificate": cert_pem},
    }
    for label, credential in credentials.items():
        client = await _confidential_app(sandbox, app, credential)
        result = await asyncio.to_thread(client.acquire_token_for_client, GRAPH_DEFAULT)
        assert "access_token" in result, (label, result)
    stranger = await _confidential_app(
        sandbox, app, {"private_key": other_key, "thumbprint": other_thumbprint}
    )
    refused = await asyncio.to_thread(stranger.acquire_token_for_client, GRAPH_DEFAULT)
    assert refused["error"] == "invalid_client" and refused["error_codes"] == [700027]


async def test_client_authentication_errors(sandbox: Sandbox, sandbox_tls: ssl.SSLContext) -> None:
    confidential = sandbox.add_app("microsoft", app_permissions=["Mail.Send"])
    public = sandbox.add_app("microsoft", allow_public_client_flows=True, secret=False)
    grant = {"grant_type": "client_credentials", "scope": GRAPH_DEFAULT[0]}
    unknown = await _token_post(
        sandbox, sandbox_tls, {**grant, "client_id": "nobody", "client_secret": "x"}
    )
    wrong = await _token_post(
        sandbox, sandbox_tls, {**grant, "client_id": confidential.client_id, "client_secret": "x"}
    )
    basic = await _token_post(
        sandbox, sandbox_tls, grant, auth=(confidential.client_id, confidential.client_secret or "")
    )
    bad_scope = await _token_post(
        sandbox,
        sandbox_tls,
        {
            **grant,
            "scope": "Mail.Send",
            "client_id": confidential.client_id,
            "client_secret": confidential.client_secret or "",
        },
    )
    public_secret = await _token_post(
        sandbox,
        sandbox_tls,
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": "x",
            "client_id": public.client_id,
            "client_secret": "s",
        },
    )
    assert (unknown.status_code, unknown.json()["error_codes"]) == (400, [700016])
    assert unknown.json()["error"] == "unauthorized_client"
    assert (wrong.status_code, wrong.json()["error"], wrong.json()["error_codes"]) == (
        401,
        "invalid_client",
        [7000215],
    )
    assert basic.status_code == 200
    assert bad_scope.json()["error"] == "invalid_scope"
    assert public_secret.json()["error_codes"] == [700025]
