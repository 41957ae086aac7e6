"""One token refresh per account across two instances sharing one PostgreSQL (issue 16).

Two gateways run in this process on one database (``store.url``), each with its own state
directory and the same secret key. Everything between them is real: the tokens come from MSAL
and google-auth against the sandbox's sign-in services, the grant is stored encrypted in
PostgreSQL, the refresh lock is a PostgreSQL advisory lock and the instances hear of each
other's connection changes through LISTEN/NOTIFY. The sandbox counts the access tokens it
issues for a mailbox: each refresh of a user's grant issues exactly one.

The sandbox's refresh tokens rotate as Entra's do: every refresh answers a new one and the old
one stays valid ("Refresh tokens in the Microsoft identity platform",
https://learn.microsoft.com/entra/identity-platform/refresh-tokens: "The Microsoft identity
platform doesn't revoke old refresh tokens when used to fetch new access tokens"). The test of
rotation therefore revokes the old refresh token itself, so an instance that used a stale copy
would fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.oauth import AuthUnavailable, ReauthRequired
from gateway.oauth._google import parse_material
from mailgw_sandbox import App, Sandbox
from mailgw_sandbox.postgres import PostgresServer
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    AdminBrowser,
    register_callbacks,
    running_cluster,
    sandbox_config,
    until,
)

ADDRESS = {"crm": MS_ADDRESS, "scanner": GOOGLE_ADDRESS}
PROVIDER = {"crm": "microsoft", "scanner": "google"}
HOUR = 3599  # the clouds' access token lifetime (expires_in)
NOTICE_WAIT = 15.0  # seconds for a notice to cross PostgreSQL; never reached when green


@dataclass
class Cluster:
    a: Gateway
    b: Gateway
    sandbox: Sandbox
    google_app: App
    browser: AdminBrowser  # signed in on instance A's admin page
    followed: dict[str, list[str]] = field(default_factory=dict)  # instance → accounts

    async def connect(self, account: str) -> None:
        """The mailbox owner consents on instance A's admin page."""
        if account == "scanner":
            app = self.google_app
            await self.a.broker.set_google_client(app.client_id, app.client_secret)
        start = await self.browser.post(f"/accounts/{account}/connect")
        done = await self.browser.consent(start.headers["location"])
        assert "is connected" in done.text, done.text

    def issued(self, account: str) -> int:
        """Access tokens the sandbox has issued for the account's mailbox: one per refresh."""
        grants = self.sandbox.directory.grants.values()
        return sum(1 for g in grants if g.kind == "access" and g.user == ADDRESS[account])

    def refresh_tokens(self, account: str) -> list[str]:
        """The mailbox's refresh tokens, oldest first (the sandbox keeps issue order)."""
        grants = self.sandbox.directory.grants.values()
        return [g.token for g in grants if g.kind == "refresh" and g.user == ADDRESS[account]]

    async def followed_on_b(self, account: str) -> None:
        """Wait until instance B has done what follows a connection made on A."""
        await until(
            lambda: account in self.followed["b"],
            NOTICE_WAIT,
            lambda: f"B followed {account}; followed: {self.followed}",
        )


async def listening(sender: Gateway, receiver: Gateway) -> None:
    """Wait until a notice on the ``auth`` channel sent by one instance reaches the other
    (a channel subscribed at start is listened to a moment later)."""
    assert sender.stores is not None and receiver.stores is not None
    heard: list[str | None] = []
    stop = receiver.stores.coordination.subscribe("auth", heard.append)
    probe = json.dumps({"account": "probe", "from": "the test"})
    try:
        deadline = time.monotonic() + NOTICE_WAIT
        while probe not in heard:
            assert time.monotonic() < deadline, "the instances do not hear each other"
            await sender.stores.coordination.notify("auth", probe)
            await asyncio.sleep(0.1)
    finally:
        stop()


def record_followers(gateway: Gateway, name: str, followed: dict[str, list[str]]) -> None:
    """Note each account the instance's ``on_connected`` has finished with (it still runs)."""
    original = gateway.broker.on_connected
    assert original is not None
    done = followed.setdefault(name, [])

    async def recorded(username: str) -> None:
        await original(username)
        done.append(username)

    gateway.broker.on_connected = recorded


@pytest.fixture
async def cluster(sandbox: Sandbox, tmp_path: Path, pg_url: str) -> AsyncIterator[Cluster]:
    config, google_app = sandbox_config(sandbox, tmp_path / "a")
    async with contextlib.AsyncExitStack() as stack:
        a, b = await stack.enter_async_context(running_cluster(config, tmp_path, pg_url))
        register_callbacks(sandbox, a)  # consent goes through A's admin page
        browser = AdminBrowser(a, sandbox)
        stack.push_async_callback(browser.close)
        await browser.sign_in()
        world = Cluster(a, b, sandbox, google_app, browser)
        record_followers(a, "a", world.followed)
        record_followers(b, "b", world.followed)
        await listening(a, b)
        await listening(b, a)
        yield world


def interleaved(count: int, *uses: Callable[[], Awaitable[str]]) -> list[Awaitable[str]]:
    return [uses[i % len(uses)]() for i in range(count)]


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_fifty_uses_across_two_instances_with_an_expired_token_make_one_refresh(
    cluster: Cluster, account: str
) -> None:
    directory = cluster.sandbox.directory
    directory.access_lifetime[PROVIDER[account]] = 0  # the tokens of the consent are stale
    await cluster.connect(account)
    await cluster.followed_on_b(account)  # B's own work after the connection is over
    directory.access_lifetime[PROVIDER[account]] = HOUR
    before = cluster.issued(account)
    a, b = cluster.a.broker, cluster.b.broker
    tokens = await asyncio.gather(
        *interleaved(50, lambda: a.access_token(account), lambda: b.access_token(account))
    )
    assert cluster.issued(account) == before + 1  # one refresh at the provider, not one each
    assert len(set(tokens)) == 1
    assert not directory.grants[tokens[0]].revoked
    assert (await cluster.b.broker.status(account)).state == "connected"


@pytest.mark.parametrize("account", ["crm", "scanner"])
async def test_a_token_refused_on_b_is_replaced_by_the_one_a_renewed(
    cluster: Cluster, account: str
) -> None:
    """Continuous access evaluation revokes the access token: A meets the 401 first and
    renews it; B, refused the same token later, takes A's instead of refreshing again."""
    await cluster.connect(account)
    a, b = cluster.a.broker, cluster.b.broker
    before = cluster.issued(account)
    refused = await a.access_token(account)
    assert await b.access_token(account) == refused  # the stored one: no refresh on B
    assert cluster.issued(account) == before
    assert cluster.sandbox.directory.revoke_access_tokens(ADDRESS[account]) >= 1
    renewed = await a.refreshed_token(account, refused)
    assert cluster.issued(account) == before + 1 and renewed != refused
    assert await b.refreshed_token(account, refused) == renewed
    assert await b.access_token(account) == renewed
    assert cluster.issued(account) == before + 1


async def test_a_refresh_token_rotated_on_a_is_the_one_b_redeems(cluster: Cluster) -> None:
    """Entra answers every refresh with a new refresh token. After A's refresh only the new
    one is left valid here (as when the old one has expired), so B's refresh works only with
    the grant A stored, not with the material B read before."""
    await cluster.connect("crm")
    a, b = cluster.a.broker, cluster.b.broker
    directory = cluster.sandbox.directory
    held_by_b = await b.access_token("crm")
    directory.revoke_access_tokens(MS_ADDRESS)
    first = cluster.refresh_tokens("crm")
    renewed_on_a = await a.refreshed_token("crm", held_by_b)  # a 401 on A: refresh, rotation
    rotated = [token for token in cluster.refresh_tokens("crm") if token not in first]
    assert len(rotated) == 1
    for old in first:
        directory.revoke_token(old)
    directory.revoke_access_tokens(MS_ADDRESS)  # A's new access token is refused as well
    before = cluster.issued("crm")
    assert await b.refreshed_token("crm", held_by_b) == renewed_on_a  # B takes A's token
    assert cluster.issued("crm") == before
    fresh = await b.refreshed_token("crm", renewed_on_a)  # refused too: B redeems A's rotation
    assert cluster.issued("crm") == before + 1 and not directory.grants[fresh].revoked
    assert await a.refreshed_token("crm", renewed_on_a) == fresh  # and A takes B's
    assert cluster.issued("crm") == before + 1
    assert (await b.status("crm")).state == "connected"


async def test_a_google_grant_stored_by_an_earlier_version_is_refreshed_and_kept_whole(
    cluster: Cluster,
) -> None:
    """Earlier versions stored the bare refresh token; it is redeemed as before, and the
    material stored after the refresh carries the new access token for the other instance."""
    await cluster.connect("scanner")
    assert cluster.a.stores is not None
    auth = cluster.a.stores.auth
    stored = await auth.get_account_auth("scanner")
    assert stored is not None and stored.token is not None
    refresh_token, _ = parse_material(stored.token)
    await auth.put_account_auth(replace(stored, token=refresh_token.encode()))
    held = await cluster.b.broker.access_token("scanner")
    before = cluster.issued("scanner")
    token = await cluster.b.broker.refreshed_token("scanner", held)  # Gmail refused it
    assert cluster.issued("scanner") == before + 1
    rewritten = await auth.get_account_auth("scanner")
    assert rewritten is not None and rewritten.token is not None
    kept, access = parse_material(rewritten.token)
    assert kept == refresh_token and access is not None and access.value == token


async def test_disconnect_on_a_stops_b_serving_its_token(cluster: Cluster) -> None:
    await cluster.connect("crm")
    assert await cluster.b.broker.access_token("crm")  # B now holds a token in memory
    page = await cluster.browser.post("/accounts/crm/disconnect")
    assert page.status_code in (200, 303), page.text
    await until_refused(cluster.b, "crm", "it has not been connected yet")


async def test_needs_reconsent_found_on_a_holds_b_and_reconnecting_on_a_frees_it(
    cluster: Cluster,
) -> None:
    """A's refresh meets a revoked grant (a password reset): B drops its token and reports the
    same "connect again" sentence; the owner reconnects on A and B serves again (and has run
    what follows a connection: held mail, send-as aliases)."""
    await cluster.connect("crm")
    await cluster.followed_on_b("crm")
    cluster.followed["b"].clear()
    held = await cluster.b.broker.access_token("crm")
    cluster.sandbox.directory.revoke_user(MS_ADDRESS)
    with pytest.raises(ReauthRequired):
        await cluster.a.broker.refreshed_token("crm", held)
    await until_refused(cluster.b, "crm", "must be connected again")
    assert (await cluster.b.broker.status("crm")).state == "needs_reconsent"
    await cluster.connect("crm")
    await cluster.followed_on_b("crm")
    token = await cluster.b.broker.access_token("crm")
    assert token != held and not cluster.sandbox.directory.grants[token].revoked


async def until_refused(gateway: Gateway, account: str, why: str) -> None:
    """Wait until the instance refuses the account with a sentence containing ``why``."""
    deadline = time.monotonic() + NOTICE_WAIT
    while True:
        try:
            await gateway.broker.access_token(account)
        except ReauthRequired as error:
            assert why in str(error), str(error)
            return
        assert time.monotonic() < deadline, f"{account} still served by the other instance"
        await asyncio.sleep(0.05)


async def test_postgresql_down_makes_the_token_unavailable_then_it_works_again(
    cluster: Cluster, postgres: PostgresServer
) -> None:
    """With the shared store gone the refresh lock cannot be taken: the caller gets
    AuthUnavailable (the spool retries later; a client is told to try again), saying why."""
    await cluster.connect("crm")
    await asyncio.to_thread(postgres.stop)
    try:
        with pytest.raises(AuthUnavailable, match="state store"):
            await cluster.b.broker.access_token("crm")  # B holds no token yet: must ask
    finally:
        await asyncio.to_thread(postgres.restart_after)
    token = await served_again(cluster.b, "crm")
    assert not cluster.sandbox.directory.grants[token].revoked


async def served_again(gateway: Gateway, account: str) -> str:
    """The account's token once the store answers again (a pooled connection from before the
    outage fails once, and that attempt is AuthUnavailable too, as a retry expects)."""
    deadline = time.monotonic() + NOTICE_WAIT
    while True:
        try:
            return await gateway.broker.access_token(account)
        except AuthUnavailable:
            assert time.monotonic() < deadline, "the store is back but the token is not"
            await asyncio.sleep(0.2)
