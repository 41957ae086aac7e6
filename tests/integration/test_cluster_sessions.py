"""Two gateways in-process on one PostgreSQL, as behind a load balancer that may send each
request to either: an admin signed in on one is signed in on the other (and signed out on both),
wrong passwords spread over both count in one budget, and a consent link made on one works on
the other. Each instance has its own state directory and ports and the same secret key.
"""

from __future__ import annotations

import asyncio
import imaplib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from gateway.app import Gateway
from gateway.login_gate import MAILBOX
from mailgw_sandbox import Sandbox
from mailgw_sandbox.postgres import PostgresServer
from tests.helpers import (
    MS_ADDRESS,
    PASSWORD,
    AdminBrowser,
    base_config,
    csrf_token,
    running_cluster,
    sandbox_config,
)

HOST = "127.0.0.1"
THROTTLED = "Too many failed logins for this username from your address; try again in 5 minute(s)"


@pytest.fixture
async def pair(tmp_path: Path, pg_url: str) -> AsyncIterator[list[Gateway]]:
    async with running_cluster(base_config(tmp_path / "unused"), tmp_path, pg_url) as gateways:
        yield gateways


def _admin(gateway: Gateway, cookies: httpx.Cookies | None = None) -> httpx.AsyncClient:
    base = f"http://{HOST}:{gateway.ports['admin']}"
    return httpx.AsyncClient(base_url=base, timeout=30, cookies=cookies)


async def test_an_admin_signed_in_on_one_instance_is_signed_in_on_the_other(
    pair: list[Gateway],
) -> None:
    a, b = pair
    async with _admin(a) as on_a:
        page = await on_a.get("/login")
        data = {"csrf_token": csrf_token(page), "password": PASSWORD}
        assert (await on_a.post("/login", data=data)).status_code == 303
        cookie = on_a.cookies["gw_admin"]
        async with _admin(b, httpx.Cookies({"gw_admin": cookie})) as on_b:
            status = await on_b.get("/")
            assert status.status_code == 200 and "crm@contoso.example" in status.text
            # A form rendered by A is accepted by B: the CSRF token is the session's.
            form = await on_a.get("/")
            signed_out = await on_b.post("/logout", data={"csrf_token": csrf_token(form)})
            assert signed_out.status_code == 303 and signed_out.headers["location"] == "/login"
        refused = await on_a.get("/")  # A still sends the cookie B ended
        assert refused.status_code == 303 and refused.headers["location"] == "/login"


def imap_login(gateway: Gateway, password: str) -> str:
    client = imaplib.IMAP4(HOST, gateway.ports["imap"], timeout=30)
    try:
        client.login("crm", password)
        return "OK"
    except imaplib.IMAP4.error as error:
        return str(error)
    finally:
        client.shutdown()


async def test_wrong_passwords_spread_over_both_instances_count_in_one_budget(
    pair: list[Gateway],
) -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:  # the tarpit's delays, recorded and not waited
        slept.append(seconds)

    for gateway in pair:
        gateway.login_gate.sleep = record
    for n in range(MAILBOX.pair_limit):
        answer = await asyncio.to_thread(imap_login, pair[n % 2], f"wrong {n}")
        assert "AUTHENTICATIONFAILED" in answer, answer
    assert len(slept) == MAILBOX.pair_limit - 3  # each instance saw the other's failures
    for gateway in pair:  # the 11th, through either, is refused without a check
        answer = await asyncio.to_thread(imap_login, gateway, PASSWORD)
        assert "[UNAVAILABLE]" in answer and THROTTLED in answer, answer
    checks = sum(gateway.login_gate.checks_started for gateway in pair)
    assert checks == MAILBOX.pair_limit


async def test_a_consent_link_made_on_one_instance_completes_on_the_other(
    sandbox: Sandbox, tmp_path: Path, pg_url: str
) -> None:
    async with AsyncExitStack() as stack:
        config, _ = sandbox_config(sandbox, tmp_path / "unused")
        cluster = running_cluster(config, tmp_path, pg_url, sandbox=sandbox)
        a, b = await stack.enter_async_context(cluster)  # both callbacks registered
        admin = AdminBrowser(a, sandbox)
        owner = AdminBrowser(b, sandbox)  # the mailbox's owner, without the admin password
        stack.push_async_callback(admin.close)
        stack.push_async_callback(owner.close)
        await admin.sign_in()
        link = await admin.consent_link("crm")
        done = await owner.connect_through(link, MS_ADDRESS)
        assert f"{MS_ADDRESS} is connected" in done.text
        assert a.stores is not None
        auth = await a.stores.auth.get_account_auth("crm")
        assert auth is not None and auth.state == "connected"
        spent = await admin.admin.get(link)  # spent for both instances
        assert spent.status_code == 404 and "already used or has expired" in spent.text


async def test_with_postgresql_down_the_admin_page_says_so_and_logins_are_still_judged(
    tmp_path: Path,
) -> None:
    """The page answers 503 with a sentence (no 500, no traceback); a login is still judged,
    its failure counted by this instance alone; the session outlives the outage."""
    with PostgresServer() as own:  # stopped and started by this test alone
        url = own.new_database()
        cluster = running_cluster(base_config(tmp_path), tmp_path, url, count=1)
        async with cluster as (gateway,), _admin(gateway) as browser:
            page = await browser.get("/login")
            data = {"csrf_token": csrf_token(page), "password": PASSWORD}
            assert (await browser.post("/login", data=data)).status_code == 303
            await asyncio.to_thread(own.stop)
            down = await browser.get("/")
            assert down.status_code == 503, down.text
            assert "cannot reach its database" in down.text
            answer = await asyncio.to_thread(imap_login, gateway, "wrong")
            assert "AUTHENTICATIONFAILED" in answer, answer
            await asyncio.to_thread(own.restart_after)
            # The pool reconnects in its own time (backing off while the server was down).
            deadline = asyncio.get_running_loop().time() + 60
            while (back := await browser.get("/")).status_code == 503:
                assert asyncio.get_running_loop().time() < deadline, "PostgreSQL is back"
                await asyncio.sleep(0.5)
            assert back.status_code == 200, back.text  # still signed in, not sent to /login
