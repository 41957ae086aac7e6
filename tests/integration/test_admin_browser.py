"""The admin page in a real browser: Debian's Chromium, driven by Playwright's async API.

An admin signs in, enters the Google OAuth client, and connects a Microsoft and a Google mailbox
by clicking through the sandbox's consent screens, as a person would; then forms without their
CSRF token are refused, the page is checked on a phone-sized screen, and no token or secret may
appear in any gateway page the browser was shown.

Playwright's async driver runs in a subprocess that this test awaits, so the session loop keeps
serving the gateway and the sandbox meanwhile. ``playwright install`` (its own browser download)
is not used: the test launches /usr/bin/chromium. A machine without Chromium or Playwright FAILS
here and points to scripts/install-test-deps.sh; it never skips.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.app import Gateway
from mailgw_sandbox import Sandbox
from tests.helpers import GOOGLE_ADDRESS, MS_ADDRESS, PASSWORD, running_gateway, sandbox_config

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = (
    "run scripts/install-test-deps.sh as root (Debian package chromium) and "
    "pip install -e '.[test]' (PyPI playwright); `playwright install` is not used"
)
PHONE = {"width": 390, "height": 844}


def _require_browser() -> Any:
    """Playwright's async entry point, or FAIL (never skip) saying how to install it."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(f"Playwright is not installed: {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL_HINT}", pytrace=False)
    return async_playwright


async def _sandbox_spki_pin(sandbox: Sandbox) -> str:
    """base64(sha256(SPKI)) of the certificate the sandbox serves, after checking that the
    sandbox's own CA signed it.

    Chromium takes no CA file on its command line (on Linux it trusts an NSS database in $HOME,
    which a test must not modify), so rather than ignore_https_errors=True, which would accept
    any certificate from anyone, the browser is told to accept exactly this one public key
    (--ignore-certificate-errors-spki-list, honoured because Playwright passes --user-data-dir).
    """
    trust = ssl.create_default_context(cafile=sandbox.ca_file)
    url = urlsplit(sandbox.url)
    _, writer = await asyncio.open_connection(url.hostname, url.port, ssl=trust)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        await writer.wait_closed()
    spki = x509.load_der_x509_certificate(der).public_key()
    digest = hashlib.sha256(spki.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    return base64.b64encode(digest.digest()).decode()


@pytest.fixture
async def wired(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[tuple[Gateway, Sandbox]]:
    """A gateway wired to the sandbox, whose sign-in pages show a consent screen to click."""
    config, google_app = sandbox_config(sandbox, tmp_path / "state")
    sandbox.context.consent = "screen"
    async with running_gateway(config, tmp_path / "config.yaml", sandbox) as gateway:
        gateway.google_app = google_app  # type: ignore[attr-defined]
        yield gateway, sandbox


@pytest.fixture
async def chromium(sandbox: Sandbox) -> AsyncIterator[Any]:
    async_playwright = _require_browser()
    args = [
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--ignore-certificate-errors-spki-list={await _sandbox_spki_pin(sandbox)}",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's own sandbox refuses to run as root
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=args, timeout=20_000
        )
        try:
            yield browser
        finally:
            await browser.close()


class Pages:
    """The HTML of every gateway page the browser showed, to search for secrets afterwards."""

    def __init__(self, page: Any, admin: str) -> None:
        self.page = page
        self.admin = admin
        self.html: dict[str, str] = {}
        self.console: list[str] = []  # what Chromium reported (CSP violations, script errors)
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))

    async def click(self, target: Any) -> Any:
        """Click a button or link, wait for the page it leads to, and return its response."""
        async with self.page.expect_navigation() as navigation:
            await target.click()
        return await navigation.value

    async def wait_for(self, url: str) -> None:
        """Wait to arrive at ``url``; if the browser stays put, say what Chromium reported."""
        try:
            await self.page.wait_for_url(url, timeout=5_000)
        except Exception as error:
            raise AssertionError(
                f"never reached {url} (at {self.page.url}); Chromium said: {self.console}"
            ) from error

    async def seen(self, path: str | None = None) -> str:
        """Record the current page; it must be the gateway's (at ``path`` if given)."""
        await self.page.wait_for_load_state()
        url = urlsplit(self.page.url)
        assert f"{url.scheme}://{url.netloc}" == self.admin, self.page.url
        if path is not None:
            assert url.path == path, self.page.url
        html = await self.page.content()
        self.html[f"{len(self.html)}:{url.path}"] = html
        return html


async def test_admin_connects_both_clouds_in_chromium(
    wired: tuple[Gateway, Sandbox], chromium: Any, tmp_path: Path
) -> None:
    gateway, sandbox = wired
    google_app = gateway.google_app  # type: ignore[attr-defined]
    admin = gateway.broker.admin_url()  # the origin the gateway names in its OAuth redirect URI
    context = await chromium.new_context(locale="en-US")
    context.set_default_timeout(10_000)
    page = await context.new_page()
    pages = Pages(page, admin)

    # (1) The accounts page sends a stranger to sign-in; the admin password lets them in.
    await page.goto(f"{admin}/")
    await pages.seen("/login")
    await page.get_by_label("Admin password").fill(PASSWORD)
    await pages.click(page.get_by_role("button", name="Sign in"))
    html = await pages.seen("/")
    assert "crm@contoso.example" in html and "scanner@example.com" in html

    # (2) The Google OAuth client form: Client ID, Client secret, Save (Close goes back).
    await pages.click(page.get_by_role("link", name="Google OAuth client"))
    await pages.seen("/google-client")
    await pages.click(page.get_by_role("link", name="Close"))
    await pages.seen("/")
    await pages.click(page.get_by_role("link", name="Google OAuth client"))
    await page.get_by_label("Client ID").fill(google_app.client_id)
    await page.get_by_label("Client secret").fill(google_app.client_secret)
    await pages.click(page.get_by_role("button", name="Save"))
    html = await pages.seen("/")
    assert google_app.client_id in html

    # (3a) Microsoft: Connect, the sandbox's consent screen, the mailbox's own user, Accept; the
    # answer comes back by form_post to the gateway's callback.
    row = page.get_by_role("row").filter(has_text=MS_ADDRESS)
    await row.get_by_role("button", name="Connect").click()
    await pages.wait_for(f"{sandbox.url}/**")
    await page.get_by_role("heading", name="Permissions requested").wait_for()
    owner = page.get_by_role("radio", name=MS_ADDRESS)
    assert await owner.is_checked()  # the gateway's login_hint picked the mailbox's own user
    await page.get_by_role("radio", name="someone.else@contoso.example").check()
    await owner.check()  # a person changes their mind: the owner it is
    await page.get_by_role("button", name="Accept").click()
    await pages.wait_for(f"{admin}/oauth/callback**")
    assert f"{MS_ADDRESS} is connected" in await pages.seen("/oauth/callback")

    # (3b) Google: Connect, choose the account, Allow; a redirect back to the callback.
    await page.goto(f"{admin}/")
    await pages.seen("/")
    row = page.get_by_role("row").filter(has_text=GOOGLE_ADDRESS)
    await row.get_by_role("button", name="Connect").click()
    await pages.wait_for(f"{sandbox.url}/**")
    await page.get_by_text("wants to access your Google Account").wait_for()
    owner = page.get_by_role("radio", name=GOOGLE_ADDRESS)
    assert await owner.is_checked()  # the gateway's login_hint picked the mailbox's own user
    await owner.check()
    await page.get_by_role("button", name="Allow").click()
    await pages.wait_for(f"{admin}/oauth/callback**")
    assert f"{GOOGLE_ADDRESS} is connected" in await pages.seen("/oauth/callback")

    # (4) Both connected, as the right people.
    await page.goto(f"{admin}/")
    await pages.seen("/")
    for address in (MS_ADDRESS, GOOGLE_ADDRESS):
        state = page.get_by_role("row").filter(has_text=address).locator("td[class^=state-]")
        assert f"connected as {address}" in (await state.inner_text()).lower()
    for username in ("crm", "scanner"):
        assert (await gateway.broker.status(username)).state == "connected"

    # (5) A form whose csrf_token was removed, and one whose token was altered, are refused and
    # change nothing: the admin stays signed in and the account stays connected.
    await page.locator('form[action="/logout"] input[name=csrf_token]').evaluate("i => i.remove()")
    refused = await pages.click(page.get_by_role("button", name="Sign out"))
    assert refused.status == 403
    assert "did not come from this page" in await pages.seen("/logout")
    await page.goto(f"{admin}/")
    await pages.seen("/")  # still signed in: not sent to /login
    disconnect = page.locator('form[action="/accounts/crm/disconnect"]')
    await disconnect.locator("input[name=csrf_token]").evaluate("i => { i.value = 'forged' }")
    refused = await pages.click(disconnect.get_by_role("button"))
    assert refused.status == 403
    await pages.seen("/accounts/crm/disconnect")
    assert (await gateway.broker.status("crm")).state == "connected"
    await page.goto(f"{admin}/")
    await pages.seen("/")

    # (6) On a phone: the accounts page fits 390 px without scrolling sideways.
    phone = await chromium.new_context(
        storage_state=await context.storage_state(),
        viewport=PHONE,
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        locale="en-US",
    )
    small = await phone.new_page()
    await small.goto(f"{admin}/")
    assert urlsplit(small.url).path == "/", small.url
    pages.html["phone:/"] = await small.content()
    shot = tmp_path / "accounts-phone.png"
    await small.screenshot(path=str(shot), full_page=True)
    width = await small.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width}px wide on a 390px phone; see {shot}"
    await phone.close()
    await context.close()

    # No token, client secret or password in any gateway page the browser was shown.
    secrets = {
        "Google client secret": google_app.client_secret,
        "admin password": PASSWORD,
        **{f"{g.provider} {g.kind} token": token for token, g in sandbox.directory.grants.items()},
    }
    assert any("refresh" in name for name in secrets), secrets.keys()
    for name, secret in secrets.items():
        for where, html in pages.html.items():
            assert secret not in html, f"{name} appears in the page {where}"
