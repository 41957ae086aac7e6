"""A token the provider refuses (HTTP 401): one forced refresh, then deliver, hold or wait.

Everything is real between the legacy program's SMTP session and the sandbox's Sent list:
smtplib → SMTP front → spool → Graph / Gmail senders (httpx) → tokens from MSAL and google-auth
against the sandbox's sign-in, after a consent given through the admin page. The access tokens
live an hour, so MSAL holds a valid one in its cache: only a forced refresh gets past it.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.app import Gateway
from mailgw_sandbox import Fault, Sandbox
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    PASSWORD,
    AdminBrowser,
    running_gateway,
    sandbox_config,
    until,
)

HOST = "127.0.0.1"
ADDRESS = {"crm": MS_ADDRESS, "scanner": GOOGLE_ADDRESS}
BIG = 10 * 1024 * 1024


@dataclass
class World:
    gateway: Gateway
    sandbox: Sandbox
    browser: AdminBrowser
    webhook: list[dict[str, Any]] = field(default_factory=list)

    async def connect(self, account: str) -> None:
        """The mailbox owner consents on the admin page (Google: after the client is set)."""
        if account == "scanner":
            app = self.gateway.google_app  # type: ignore[attr-defined]
            await self.gateway.broker.set_google_client(app.client_id, app.client_secret)
        start = await self.browser.post(f"/accounts/{account}/connect")
        done = await self.browser.consent(start.headers["location"])
        assert "is connected" in done.text, done.text

    def refreshes(self, account: str) -> int:
        return self.gateway.broker.refresh_count.get(account, 0)

    def issued(self, account: str) -> int:
        """Access tokens the sandbox's sign-in service has issued for the account's mailbox."""
        grants = self.sandbox.directory.grants.values()
        return sum(1 for g in grants if g.kind == "access" and g.user == ADDRESS[account])

    async def submit(self, account: str, subject: str, attachment: bytes = b"") -> str:
        """Send a message through the SMTP front as a legacy program does; its Message-ID."""
        message = EmailMessage()
        message["From"] = ADDRESS[account]
        message["To"] = "alice@example.org"
        message["Subject"] = subject
        message["Message-ID"] = make_msgid(domain="refresh.test")
        message.set_content(f"{subject}\n")
        if attachment:
            message.add_attachment(
                attachment, maintype="application", subtype="octet-stream", filename="scan.bin"
            )

        def send() -> dict:
            with smtplib.SMTP(HOST, self.gateway.ports["smtp"], timeout=60) as client:
                client.login(account, PASSWORD)
                return client.send_message(message)

        assert await asyncio.to_thread(send) == {}
        return str(message["Message-ID"])

    def sent_ids(self, account: str) -> list[str]:
        user = self.sandbox.directory.user(ADDRESS[account])
        assert user is not None
        return [
            str(message_from_bytes(s.raw, policy=policy.default)["Message-ID"]).strip()
            for s in self.sandbox.ops(user).sent(user)
        ]

    def spool_state(self) -> list[tuple[str, str]]:
        return [(r.state, r.reason) for r in self.gateway.spool.messages()]

    async def delivered(self, account: str, message_id: str, within: float = 30.0) -> None:
        """Wait until the message was sent exactly once; a dead letter fails at once."""

        def done() -> bool:
            dead = [reason for state, reason in self.spool_state() if state == "dead"]
            assert not dead, f"{message_id} dead-lettered: {dead}"
            return message_id in self.sent_ids(account)

        await until(done, within, lambda: f"{message_id} sent; spool: {self.spool_state()}")
        assert self.sent_ids(account).count(message_id) == 1


@pytest.fixture
async def world(sandbox: Sandbox, tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[World]:
    """A gateway wired to the sandbox, a webhook receiver for the admin's alerts, and an
    admin signed in on the admin page (no mailbox connected yet)."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner = web.AppRunner(receiver)
    await runner.setup()
    await web.TCPSite(runner, HOST, unused_tcp_port).start()
    config, google_app = sandbox_config(sandbox, tmp_path / "state")
    config["admin"]["notify_webhook"] = f"http://{HOST}:{unused_tcp_port}/hook"
    config["spool"] = {"first_backoff_seconds": 1}
    try:
        async with running_gateway(config, tmp_path / "c.yaml", sandbox) as gateway:
            gateway.google_app = google_app  # type: ignore[attr-defined]
            browser = AdminBrowser(gateway, sandbox)
            try:
                await browser.sign_in()
                yield World(gateway, sandbox, browser, received)
            finally:
                await browser.close()
    finally:
        await runner.cleanup()


# -- Microsoft ---------------------------------------------------------------------------------


async def test_revoked_access_token_gets_one_forced_refresh_and_the_mail_goes_out(
    world: World,
) -> None:
    """Graph refuses the cached token (continuous access evaluation, the refresh token still
    good): MSAL is made to refresh despite its cached token, and the mail goes out without
    anyone reconnecting."""
    await world.connect("crm")
    await world.delivered("crm", await world.submit("crm", "before"))  # a token is now cached
    before, asked = world.refreshes("crm"), world.issued("crm")
    assert world.sandbox.directory.revoke_access_tokens(MS_ADDRESS) >= 1
    await world.delivered("crm", await world.submit("crm", "after the revocation"))
    assert world.refreshes("crm") == before + 1
    assert world.issued("crm") == asked + 1  # MSAL did ask Entra, once
    status = await world.gateway.broker.status("crm")
    assert status.state == "connected" and world.webhook == []


async def test_callers_refused_the_same_token_cause_one_refresh(world: World) -> None:
    await world.connect("crm")
    broker = world.gateway.broker
    refused = await broker.access_token("crm")
    world.sandbox.directory.revoke_access_tokens(MS_ADDRESS)
    before = world.refreshes("crm")
    tokens = await asyncio.gather(*(broker.refreshed_token("crm", refused) for _ in range(20)))
    assert world.refreshes("crm") == before + 1
    assert len(set(tokens)) == 1 and tokens[0] != refused
    assert await broker.access_token("crm") == tokens[0]
    # A caller whose 401 arrives after the replacement takes it, without another refresh.
    assert await broker.refreshed_token("crm", refused) == tokens[0]
    assert world.refreshes("crm") == before + 1


async def test_revoked_refresh_token_holds_the_mail_and_tells_the_admin(world: World) -> None:
    """A password reset revokes every token: the forced refresh gets invalid_grant, so the
    account needs re-consent, the mail is held (not retried, not dead) and the webhook fires."""
    await world.connect("crm")
    await world.delivered("crm", await world.submit("crm", "before"))
    world.sandbox.directory.revoke_user(MS_ADDRESS)
    after = await world.submit("crm", "after the password reset")
    await until(
        lambda: [state for state, _ in world.spool_state()] == ["held"],
        30,
        lambda: f"held; spool: {world.spool_state()}",
    )
    ((_, reason),) = world.spool_state()
    assert f"{MS_ADDRESS} must be connected again" in reason
    assert (await world.gateway.broker.status("crm")).state == "needs_reconsent"
    await until(lambda: len(world.webhook) == 1, 10, lambda: f"webhook: {world.webhook}")
    assert world.webhook[0]["event"] == "needs_reconsent"
    assert world.webhook[0]["account"] == "crm"
    await world.connect("crm")  # the owner reconnects: the held mail goes out
    await world.delivered("crm", after)


async def test_a_new_token_refused_too_leaves_the_mail_queued_with_the_true_reason(
    world: World,
) -> None:
    await world.connect("crm")
    await world.delivered("crm", await world.submit("crm", "before"))
    refused = await world.gateway.broker.access_token("crm")
    before, asked = world.refreshes("crm"), world.issued("crm")
    # A plain 401, no claims challenge: only forcing gets MSAL past its cached token.
    world.sandbox.faults.add(Fault("graph", "401", remaining=2, path_suffix="/sendMail"))
    message_id = await world.submit("crm", "refused twice")
    await until(
        lambda: (
            [state for state, _ in world.spool_state()] == ["queued"]
            and "newly issued" in world.spool_state()[0][1]
        ),
        30,
        lambda: f"queued with a reason; spool: {world.spool_state()}",
    )
    ((_, reason),) = world.spool_state()
    assert "the provider refused a newly issued access token too (HTTP 401" in reason
    assert world.refreshes("crm") == before + 1  # the refresh really happened, once
    assert world.issued("crm") == asked + 1
    assert await world.gateway.broker.access_token("crm") != refused
    assert (await world.gateway.broker.status("crm")).state == "connected"
    await world.delivered("crm", message_id)  # the next attempt goes through


# -- Gmail ---------------------------------------------------------------------------------------


async def test_revoked_gmail_access_token_is_replaced_and_the_mail_goes_out(
    world: World,
) -> None:
    await world.connect("scanner")
    await world.delivered("scanner", await world.submit("scanner", "before"))
    before, asked = world.refreshes("scanner"), world.issued("scanner")
    assert world.sandbox.directory.revoke_access_tokens(GOOGLE_ADDRESS) >= 1
    await world.delivered("scanner", await world.submit("scanner", "after the revocation"))
    assert world.refreshes("scanner") == before + 1
    assert world.issued("scanner") == asked + 1  # google-auth did ask the token endpoint
    assert (await world.gateway.broker.status("scanner")).state == "connected"


async def test_10mb_gmail_message_through_the_resumable_upload(world: World) -> None:
    """Over 5 MB Gmail takes a resumable upload; the sandbox refuses any PUT of the session
    without the bearer token, so delivery shows that each one carries it."""
    await world.connect("scanner")
    payload = os.urandom(BIG)
    message_id = await world.submit("scanner", "ten megabytes", payload)
    await world.delivered("scanner", message_id, within=60)
    user = world.sandbox.directory.user(GOOGLE_ADDRESS)
    (sent,) = world.sandbox.ops(user).sent(user)
    parsed = message_from_bytes(sent.raw, policy=policy.default)
    (part,) = [p for p in parsed.iter_attachments() if p.get_filename() == "scan.bin"]
    assert part.get_content() == payload


async def test_401_at_an_upload_step_refreshes_once_and_delivers(world: World) -> None:
    await world.connect("scanner")
    await world.gateway.broker.access_token("scanner")  # cached, as in steady operation
    before = world.refreshes("scanner")
    world.sandbox.faults.add(Fault("gmail", "401", method="PUT"))
    message_id = await world.submit("scanner", "refused mid-upload", os.urandom(BIG))
    await world.delivered("scanner", message_id, within=60)
    assert world.sandbox.faults.pending == []  # the 401 was served, to a PUT of the session
    assert world.refreshes("scanner") == before + 1
