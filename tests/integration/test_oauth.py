"""Connecting mailboxes, end to end: the gateway's own pages, real MSAL and google-auth, the
sandbox clouds over HTTPS, and the token lifecycle afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from gateway.app import Gateway
from gateway.logs import configure_logging
from gateway.oauth import ReauthRequired
from mailgw_sandbox import Sandbox
from mailgw_sandbox._faults import Fault
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    AdminBrowser,
    csrf_token,
    running_gateway,
    sandbox_config,
)


@pytest.fixture
async def wired(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[tuple[Gateway, Sandbox]]:
    config, google_app = sandbox_config(sandbox, tmp_path / "state")
    async with running_gateway(config, tmp_path / "config.yaml", sandbox) as gateway:
        gateway.google_app = google_app  # type: ignore[attr-defined]
        yield gateway, sandbox


@pytest.fixture
async def browser(wired: tuple[Gateway, Sandbox]) -> AsyncIterator[AdminBrowser]:
    client = AdminBrowser(*wired)
    await client.sign_in()
    yield client
    await client.close()


async def test_microsoft_connect_through_the_admin_page(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, sandbox = wired
    start = await browser.post("/accounts/crm/connect")
    assert start.status_code == 303
    query = parse_qs(urlsplit(start.headers["location"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["login_hint"] == [MS_ADDRESS]
    done = await browser.consent(start.headers["location"])
    assert done.status_code == 200 and f"{MS_ADDRESS} is connected" in done.text
    page = await browser.admin.get("/")
    assert f"connected as {MS_ADDRESS}" in page.text and "Mail.ReadWrite" in page.text
    token = await gateway.broker.access_token("crm")
    assert "access token valid until" in (await browser.admin.get("/")).text
    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=sandbox.ca_file)
    ) as graph:
        me = await graph.get(f"{sandbox.url}/v1.0/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["mail"].lower() == MS_ADDRESS
    assert token not in page.text


async def test_forged_state_is_refused(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, _ = wired
    start = await browser.post("/accounts/crm/connect")
    answer = await browser.cloud.get(start.headers["location"])
    fields = dict(re.findall(r"name='([^']+)' value='([^']*)'", answer.text))
    assert fields["state"] and fields["code"]
    refused = await browser.admin.post("/oauth/callback", data={**fields, "state": "forged"})
    assert refused.status_code == 409 and "was not started here" in refused.text
    assert (await gateway.broker.status("crm")).state == "not_connected"


async def test_only_the_mailbox_owner_can_consent(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, _ = wired
    start = await browser.post("/accounts/crm/connect")
    url = urlsplit(start.headers["location"])
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query["login_hint"] == MS_ADDRESS
    query["login_hint"] = "someone.else@contoso.example"  # a colleague signs in instead
    refused = await browser.consent(url._replace(query=urlencode(query)).geturl())
    assert refused.status_code == 409
    assert "its owner must sign in" in refused.text
    assert (await gateway.broker.status("crm")).state == "not_connected"


async def test_google_client_form_then_connect(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, sandbox = wired
    app = gateway.google_app  # type: ignore[attr-defined]
    before = await browser.post("/accounts/scanner/connect")
    assert before.status_code == 409 and "client ID and secret" in before.text
    form = await browser.admin.get("/google-client")
    assert "Client ID" in form.text and "Client secret" in form.text
    saved = await browser.admin.post(
        "/google-client",
        data={
            "csrf_token": csrf_token(form),
            "client_id": app.client_id,
            "client_secret": app.client_secret,
        },
    )
    assert saved.status_code == 303
    page = await browser.admin.get("/")
    assert app.client_id in page.text and app.client_secret not in page.text
    start = await browser.post("/accounts/scanner/connect")
    query = parse_qs(urlsplit(start.headers["location"]).query)
    assert query["access_type"] == ["offline"] and query["prompt"] == ["consent"]
    done = await browser.consent(start.headers["location"])
    assert f"{GOOGLE_ADDRESS} is connected" in done.text, done.text
    connected = await browser.admin.get("/")
    assert "userinfo.email" in connected.text  # Google's spelling of the email scope
    assert "Missing scopes" not in connected.text
    token = await gateway.broker.access_token("scanner")
    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=sandbox.ca_file)
    ) as gmail:
        profile = await gmail.get(
            f"{sandbox.url}/gmail/v1/users/me/profile",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert profile.status_code == 200 and profile.json()["emailAddress"] == GOOGLE_ADDRESS


async def connect_microsoft(browser: AdminBrowser, sandbox: Sandbox) -> None:
    # MSAL serves a cached access token until less than 5 minutes remain; with shorter-lived
    # tokens every silent call really refreshes, which is what these tests need to observe.
    sandbox.directory.access_lifetime["microsoft"] = 240
    start = await browser.post("/accounts/crm/connect")
    done = await browser.consent(start.headers["location"])
    assert "is connected" in done.text, done.text


async def test_fifty_concurrent_callers_cause_one_refresh(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, sandbox = wired
    await connect_microsoft(browser, sandbox)
    broker = gateway.broker
    first = await broker.access_token("crm")
    sandbox.directory.expire_access_tokens()
    broker.invalidate("crm")  # as after the provider answered 401
    before = broker.refresh_count["crm"]
    tokens = await asyncio.gather(*(broker.access_token("crm") for _ in range(50)))
    assert broker.refresh_count["crm"] == before + 1
    assert len(set(tokens)) == 1 and tokens[0] != first


async def test_revoked_grant_marks_needs_reconsent_once(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, sandbox = wired
    await connect_microsoft(browser, sandbox)
    told: list[str] = []

    async def notify(account: str, message: str) -> None:
        told.append(account)

    broker = gateway.broker
    broker.notifier = notify
    sandbox.directory.revoke_user(MS_ADDRESS)
    broker.invalidate("crm")
    for _ in range(2):
        with pytest.raises(ReauthRequired) as refused:
            await broker.access_token("crm")
        assert f"{MS_ADDRESS} must be connected again" in str(refused.value)
        assert broker.admin_url() in str(refused.value)
    assert told == ["crm"]
    page = await browser.admin.get("/")
    assert "needs re-consent since" in page.text
    assert (await gateway.broker.status("crm")).state == "needs_reconsent"


async def test_consent_link_works_once_without_the_admin_password(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, _ = wired
    link = await browser.consent_link("crm")
    owner = AdminBrowser(gateway, wired[1])  # no admin sign-in
    try:
        done = await owner.connect_through(link, MS_ADDRESS)
        assert f"{MS_ADDRESS} is connected" in done.text
        again = await owner.admin.get(link)
        assert again.status_code == 404 and "already used or has expired" in again.text
    finally:
        await owner.close()


async def test_no_token_or_secret_in_the_database_logs_or_pages(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser, captured_log: io.StringIO
) -> None:
    gateway, sandbox = wired
    log = captured_log
    configure_logging("debug", "json", log)  # every library at DEBUG, through our formatter
    logging.getLogger("mail.log").setLevel(logging.DEBUG)
    await connect_microsoft(browser, sandbox)
    gateway.broker.invalidate("crm")
    token = await gateway.broker.access_token("crm")
    refresh = [g.token for g in sandbox.directory.grants.values() if g.kind == "refresh"]
    page = (await browser.admin.get("/")).text
    state = gateway.settings.state_dir
    database = b"".join(p.read_bytes() for p in sorted(state.glob("gateway.db*")))
    codes = [c for c in re.findall(r"code=([\w.-]{20,})", log.getvalue())]
    for secret in [token, *refresh]:
        assert secret.encode() not in database and secret not in page
        assert secret not in log.getvalue()
    assert "oauth.connected" in log.getvalue() and not codes
    assert refresh  # the sandbox did issue refresh tokens to look for


async def test_gmail_send_as_aliases_become_allowed_from_addresses(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    """The default allowed From: the mailbox and its verified send-as aliases (learned)."""
    gateway, sandbox = wired
    sandbox.directory.user(GOOGLE_ADDRESS).send_as = ("info@example.com",)
    app = gateway.google_app  # type: ignore[attr-defined]
    await gateway.broker.set_google_client(app.client_id, app.client_secret)
    scanner = gateway.accounts.get("scanner")
    assert not gateway.accounts.may_send_as(scanner, "info@example.com")
    start = await browser.post("/accounts/scanner/connect")
    assert "is connected" in (await browser.consent(start.headers["location"])).text
    assert gateway.accounts.may_send_as(scanner, "info@example.com")
    assert not gateway.accounts.may_send_as(scanner, "ceo@example.com")


# -- Entra app types: what the admin registered decides public or confidential -------------------


@contextlib.asynccontextmanager
async def _entra_gateway(
    sandbox: Sandbox, tmp_path: Path, web: bool, secret: str | None
) -> AsyncIterator[tuple[Gateway, AdminBrowser]]:
    """A gateway whose Entra app has its redirect URI under Web (``web``) or under Mobile and
    desktop applications, and whose config holds ``secret`` as microsoft.client_secret."""
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    app = sandbox.directory.apps[config["microsoft"]["client_id"]]
    if web:
        app.public_client_redirect_uris = ()  # running_gateway registers the callback under Web
    if secret is not None:
        app.client_secret = secret
        config["microsoft"]["client_secret"] = secret
    sandbox.directory.access_lifetime["microsoft"] = 240  # every silent call really refreshes
    async with running_gateway(config, tmp_path / "config.yaml", sandbox) as gateway:
        browser = AdminBrowser(gateway, sandbox)
        await browser.sign_in()
        try:
            yield gateway, browser
        finally:
            await browser.close()


async def _connect(browser: AdminBrowser) -> httpx.Response:
    start = await browser.post("/accounts/crm/connect")
    assert start.status_code == 303, start.text
    return await browser.consent(start.headers["location"])


async def test_web_app_without_a_secret_is_refused_with_what_to_change(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """The setup the README used to document: a Web redirect URI and no secret."""
    async with _entra_gateway(sandbox, tmp_path, web=True, secret=None) as (gateway, browser):
        refused = await _connect(browser)
        assert refused.status_code == 409 and "AADSTS7000218" in refused.text
        assert "Entra treats this app as a Web app" in refused.text
        assert "microsoft.client_secret" in refused.text
        page = await browser.admin.get("/")
        assert f"{gateway.broker.redirect_uri()} (platform: Mobile and desktop applications" in (
            page.text
        )
        browser.admin.headers["Accept-Language"] = "ja"
        japanese = await _connect(browser)
        assert japanese.status_code == 409 and "Web アプリとして扱っており" in japanese.text
        assert (await gateway.broker.status("crm")).state == "not_connected"


async def test_web_app_with_its_secret_connects_and_refreshes(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with _entra_gateway(sandbox, tmp_path, web=True, secret="s3cret-value") as (
        gateway,
        browser,
    ):
        assert "(platform: Web)" in (await browser.admin.get("/")).text
        done = await _connect(browser)
        assert f"{MS_ADDRESS} is connected" in done.text, done.text
        first = await gateway.broker.access_token("crm")
        gateway.broker.invalidate("crm")
        assert await gateway.broker.access_token("crm") != first  # refreshed with the secret


async def test_public_client_with_a_secret_is_refused_with_what_to_change(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with _entra_gateway(sandbox, tmp_path, web=False, secret="s3cret-value") as (
        gateway,
        browser,
    ):
        refused = await _connect(browser)
        assert refused.status_code == 409 and "AADSTS700025" in refused.text
        assert "Entra treats this app as a public client" in refused.text
        browser.admin.headers["Accept-Language"] = "ja"
        japanese = await _connect(browser)
        assert "パブリック クライアントとして扱っており" in japanese.text
        assert (await gateway.broker.status("crm")).state == "not_connected"


async def test_lost_consent_shows_last_error_with_what_to_change(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, sandbox = wired
    await connect_microsoft(browser, sandbox)
    sandbox.microsoft.identity.consents.clear()  # an administrator removed the permissions
    gateway.broker.invalidate("crm")
    with pytest.raises(ReauthRequired):
        await gateway.broker.access_token("crm")
    page = await browser.admin.get("/")
    assert "AADSTS65001" in page.text and "Nobody has consented to the permissions" in page.text


# -- provider outages on every page a person can reach ---------------------------------------------


def _outage(sandbox: Sandbox, target: str, path_suffix: str) -> None:
    sandbox.faults.add(Fault(target=target, kind="503", remaining=50, path_suffix=path_suffix))


async def test_consent_link_survives_a_provider_outage(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    """A 503 while the owner uses the link: a sentence to try again later, and the link works
    until the mailbox is connected, then no more."""
    gateway, sandbox = wired
    path = await browser.consent_link("crm")
    owner = AdminBrowser(gateway, sandbox)
    try:
        landing = await owner.admin.get(path)
        _outage(sandbox, "microsoft-login", "/openid-configuration")
        failed = await owner.admin.post(path, data={"csrf_token": csrf_token(landing)})
        assert failed.status_code == 503
        assert "Open this same link again in a few minutes" in failed.text
        owner.admin.headers["Accept-Language"] = "ja"
        assert (
            "この同じリンク"
            in (await owner.admin.post(path, data={"csrf_token": csrf_token(landing)})).text
        )
        del owner.admin.headers["Accept-Language"]
        sandbox.faults.clear()
        again = await owner.admin.get(path)
        assert again.status_code == 200  # not spent by the failed attempt
        go = await owner.admin.post(path, data={"csrf_token": csrf_token(again)})
        assert go.status_code == 303
        abandoned = await owner.admin.get(path)
        assert abandoned.status_code == 200  # nor by a sign-in that has not come back yet
        done = await owner.consent(go.headers["location"])
        assert f"{MS_ADDRESS} is connected" in done.text
        assert (await owner.admin.get(path)).status_code == 404  # one connection per link
    finally:
        await owner.close()


async def test_connect_button_and_callback_answer_a_provider_outage_with_a_sentence(
    wired: tuple[Gateway, Sandbox], browser: AdminBrowser
) -> None:
    gateway, sandbox = wired
    _outage(sandbox, "microsoft-login", "/openid-configuration")
    connect = await browser.post("/accounts/crm/connect")
    assert connect.status_code == 503 and "not available right now" in connect.text
    sandbox.faults.clear()
    start = await browser.post("/accounts/crm/connect")
    _outage(sandbox, "microsoft-login", "/oauth2/v2.0/token")
    callback = await browser.consent(start.headers["location"])
    assert callback.status_code == 503 and "not available right now" in callback.text
    sandbox.faults.clear()

    app = gateway.google_app  # type: ignore[attr-defined]
    await gateway.broker.set_google_client(app.client_id, app.client_secret)
    start = await browser.post("/accounts/scanner/connect")
    _outage(sandbox, "google-oauth", "/token")
    google = await browser.consent(start.headers["location"])
    assert google.status_code == 503 and "not available right now" in google.text
    sandbox.faults.clear()
    assert (await gateway.broker.status("crm")).state == "not_connected"
