"""A provider sign-in completes on an instance that did not start it (issue 16): the pending
sign-in (MSAL's flow, Google's PKCE verifier) is in the shared store, not in one process.

Two gateways run in this process on one PostgreSQL, each with its own state directory and
ports and the same secret key, as behind a load balancer: the admin presses Connect on A's
page and the provider's redirect back reaches B's /oauth/callback. The sign-in is real (MSAL
and the Google code exchange against the sandbox over HTTPS); only A's callback is registered
at the provider, so B's code exchange succeeds only with the redirect URI A started with.
On SQLite, a gateway restarted between the click and the callback completes the sign-in too.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.app import Gateway
from mailgw_sandbox import App, Sandbox
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    AdminBrowser,
    register_callbacks,
    running_cluster,
    running_gateway,
    sandbox_config,
)

ADDRESS = {"crm": MS_ADDRESS, "scanner": GOOGLE_ADDRESS}
NOT_STARTED = "was not started here or has expired"


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    sandbox: Sandbox
    google_app: App
    admin: AdminBrowser  # signed in on A's admin page
    to_b: AdminBrowser  # the same person's browser, whose return the balancer sends to B
    to_a: AdminBrowser  # ... and one whose return goes to A


@pytest.fixture
async def pair(sandbox: Sandbox, tmp_path: Path, pg_url: str) -> AsyncIterator[Pair]:
    config, google_app = sandbox_config(sandbox, tmp_path / "a")
    async with contextlib.AsyncExitStack() as stack:
        a, b = await stack.enter_async_context(running_cluster(config, tmp_path, pg_url))
        register_callbacks(sandbox, a)  # A's alone: B must redeem with the URI A started with
        browsers = [AdminBrowser(gateway, sandbox) for gateway in (a, b, a)]
        for browser in browsers:
            stack.push_async_callback(browser.close)
        await browsers[0].sign_in()
        yield Pair(a, b, sandbox, google_app, *browsers)


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_a_sign_in_started_on_a_completes_on_b(pair: Pair, account: str) -> None:
    if account == "scanner":  # the Google client, entered on A's page, is in the shared store
        await pair.a.broker.set_google_client(
            pair.google_app.client_id, pair.google_app.client_secret
        )
    start = await pair.admin.post(f"/accounts/{account}/connect")
    assert start.status_code == 303, start.text
    done = await pair.to_b.consent(start.headers["location"])
    assert done.status_code == 200 and f"{ADDRESS[account]} is connected" in done.text, done.text
    for gateway in (pair.a, pair.b):
        status = await gateway.broker.status(account)
        assert status.state == "connected" and status.principal == ADDRESS[account]
    token = await pair.b.broker.access_token(account)
    assert await pair.a.broker.access_token(account) == token  # one grant, read by both
    page = await pair.admin.admin.get("/")
    assert f"connected as {ADDRESS[account]}" in page.text


async def test_the_same_answer_on_the_other_instance_is_refused(pair: Pair) -> None:
    """Single use holds across instances: B completes the sign-in, the same provider answer
    replayed to A finds nothing (and nothing changes)."""
    start = await pair.admin.post("/accounts/crm/connect")
    answer = await pair.to_b.cloud.get(start.headers["location"])  # Entra's form_post page
    fields = dict(re.findall(r"name='([^']+)' value='([^']*)'", answer.text))
    assert fields.get("state") and fields.get("code"), answer.text
    done = await pair.to_b.admin.post("/oauth/callback", data=fields)
    assert f"{MS_ADDRESS} is connected" in done.text, done.text
    replayed = await pair.to_a.admin.post("/oauth/callback", data=fields)
    assert replayed.status_code == 409 and NOT_STARTED in replayed.text, replayed.text
    assert (await pair.a.broker.status("crm")).state == "connected"


async def test_a_sign_in_survives_a_restart_before_the_callback(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """SQLite, one instance: stopped and started again between the click and the provider's
    answer, the gateway still completes the sign-in."""
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    async with running_gateway(config, tmp_path / "config.yaml", sandbox) as before:
        browser = AdminBrowser(before, sandbox)
        try:
            await browser.sign_in()
            start = await browser.post("/accounts/crm/connect")
        finally:
            await browser.close()
    # Started without the sandbox: the apps keep the first run's callback, which the stored
    # sign-in names (in production both runs have the same admin.public_url).
    async with running_gateway(config, tmp_path / "config.yaml") as after:
        browser = AdminBrowser(after, sandbox)
        try:
            done = await browser.consent(start.headers["location"])
        finally:
            await browser.close()
        assert f"{MS_ADDRESS} is connected" in done.text, done.text
        assert (await after.broker.status("crm")).state == "connected"
