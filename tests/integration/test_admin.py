"""The admin page as a browser uses it: sign-in, CSRF, throttling, languages, headers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import smtplib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway import tls
from gateway.app import Gateway
from mailgw_sandbox.upstream import INSTALL_HINT
from tests.helpers import PASSWORD, base_config, free_port, running_gateway


def _csrf(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


@pytest.fixture
async def browser(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    base = f"http://127.0.0.1:{gateway.ports['admin']}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        yield client


async def sign_in(browser: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    page = await browser.get("/login")
    return await browser.post("/login", data={"csrf_token": _csrf(page), "password": password})


async def test_pages_need_sign_in(browser: httpx.AsyncClient) -> None:
    response = await browser.get("/")
    assert response.status_code == 303 and response.headers["location"] == "/login"


async def test_sign_in_shows_accounts_and_rotates_the_session(browser: httpx.AsyncClient) -> None:
    await browser.get("/login")
    before = browser.cookies["gw_admin"]
    response = await sign_in(browser)
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert browser.cookies["gw_admin"] != before  # no session fixation
    assert "HttpOnly" in response.headers["set-cookie"]
    assert "SameSite=Strict" in response.headers["set-cookie"]
    page = await browser.get("/")
    assert page.status_code == 200
    for text in ("crm@contoso.example", "scanner@example.com", "not connected", "smtps"):
        assert text in page.text
    assert page.text.count("IMAP/POP3: nothing changes at the provider") == 2  # the default
    assert PASSWORD not in page.text


async def test_accounts_page_shows_each_reading_policy_and_its_scope(tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["accounts"][0]["reading"] = {"mirror_flags": True, "on_delete": "archive"}
    config["accounts"][1]["reading"] = {"on_delete": "trash"}
    async with running_gateway(config, tmp_path / "policy.yaml") as gateway:
        base = f"http://127.0.0.1:{gateway.ports['admin']}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            await sign_in(client)
            page = (await client.get("/")).text
    assert "IMAP flags are copied to the provider; deleted mail is archived at the provider" in (
        " ".join(page.split())
    )
    assert "deleted mail goes to the provider&#39;s trash" in page
    assert "gmail.modify" in page and "gmail.readonly" not in page  # the write scope, and why


async def test_wrong_password_is_refused_then_throttled(browser: httpx.AsyncClient) -> None:
    for _ in range(5):
        wrong = await sign_in(browser, "not the password")
        assert wrong.status_code == 401 and "Wrong password." in wrong.text
    throttled = await sign_in(browser)  # even the right password waits now
    assert throttled.status_code == 429 and "Too many failed attempts" in throttled.text
    assert (await browser.get("/")).status_code == 303


async def test_posts_without_the_csrf_token_are_refused(browser: httpx.AsyncClient) -> None:
    await sign_in(browser)
    missing = await browser.post("/logout", data={})
    forged = await browser.post("/logout", data={"csrf_token": "guess"})
    page = await browser.get("/")
    cross_site = await browser.post(
        "/logout",
        data={"csrf_token": _csrf(page)},
        headers={"Origin": "https://evil.example"},
    )
    for refused in (missing, forged, cross_site):
        assert (
            refused.status_code == 403 and "expired or did not come from this page" in refused.text
        )
    assert (await browser.get("/")).status_code == 200  # still signed in
    logged_out = await browser.post("/logout", data={"csrf_token": _csrf(page)})
    assert logged_out.status_code == 303
    assert (await browser.get("/")).status_code == 303


async def test_login_form_itself_needs_a_session(browser: httpx.AsyncClient) -> None:
    response = await browser.post("/login", data={"password": PASSWORD})
    assert response.status_code == 403


async def test_japanese_by_accept_language_and_by_choice(browser: httpx.AsyncClient) -> None:
    japanese = await browser.get("/login", headers={"Accept-Language": "ja,en;q=0.5"})
    assert "管理者パスワード" in japanese.text and '<html lang="ja">' in japanese.text
    switched = await browser.get("/lang", params={"to": "en", "next": "/login"})
    assert switched.status_code == 303 and switched.headers["location"] == "/login"
    english = await browser.get("/login", headers={"Accept-Language": "ja"})
    assert "Admin password" in english.text
    escape = await browser.get("/lang", params={"to": "ja", "next": "//evil.example/"})
    assert escape.headers["location"] == "/"


async def test_security_headers(browser: httpx.AsyncClient) -> None:
    page = await browser.get("/login")
    assert page.headers["x-frame-options"] == "DENY"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert (
        "form-action 'self' https://accounts.google.com" in page.headers["content-security-policy"]
    )
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["cache-control"] == "no-store"
    assert 'name="viewport"' in page.text  # readable on a phone


async def test_queue_page_shows_held_mail_and_deletes_it(
    gateway: Gateway, browser: httpx.AsyncClient
) -> None:
    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", gateway.ports["smtp"], timeout=10) as client:
            client.login("crm", PASSWORD)  # plaintext AUTH is allowed from loopback
            client.sendmail(
                "crm@contoso.example",
                ["someone@example.net"],
                b"From: crm@contoso.example\r\nSubject: held\r\nMessage-ID: <held-1@test>\r\n"
                b"\r\nbody\r\n",
            )

    await asyncio.to_thread(submit)
    await sign_in(browser)
    for _ in range(100):  # the worker marks it held after its first attempt
        if [m.state for m in gateway.spool.messages()] == ["held"]:
            break
        await asyncio.sleep(0.05)
    page = await browser.get("/queue")
    assert page.status_code == 200
    assert "&lt;held-1@test&gt;" in page.text and "held (mailbox must be reconnected)" in page.text
    (message,) = gateway.spool.messages()
    deleted = await browser.post(f"/queue/{message.id}/delete", data={"csrf_token": _csrf(page)})
    assert deleted.status_code == 303 and gateway.spool.messages() == []
    log = await browser.get("/queue")
    assert "Nothing is waiting" in log.text and "deleted" in log.text


@pytest.mark.parametrize(
    "target",
    [
        "/%09/evil.example",
        "/%0A/evil.example",
        "/%0D/evil.example",
        "/%5Cevil.example",
        "/%5C/evil.example",
        "%5C%5Cevil.example",
        "//evil.example",
        "///evil.example",
        "/%2F/evil.example",
        "https://evil.example/",
        "https:evil.example",
    ],
)
async def test_language_switch_never_redirects_off_site(
    browser: httpx.AsyncClient, target: str
) -> None:
    response = await browser.get(f"/lang?to=ja&next={target}")
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert response.cookies["gw_lang"] == "ja"  # the switch itself still happens


async def test_security_headers_on_every_response(browser: httpx.AsyncClient) -> None:
    responses = {
        "page": await browser.get("/login"),
        "redirect to sign-in": await browser.get("/"),
        "language redirect": await browser.get("/lang?to=en&next=/login"),
        "refused form": await browser.post("/logout", data={}),
    }
    await sign_in(browser)
    responses["not found"] = await browser.get("/no-such-page")
    responses["wrong method"] = await browser.get("/logout")
    statuses = {name: response.status_code for name, response in responses.items()}
    assert list(statuses.values()) == [200, 303, 303, 403, 404, 405], statuses
    for name, response in responses.items():
        headers = response.headers
        assert headers.get("x-content-type-options") == "nosniff", name
        assert headers.get("x-frame-options") == "DENY", name
        assert headers.get("referrer-policy") == "same-origin", name
        assert headers.get("cache-control") == "no-store", name
        policy = headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, name


def _proxy_config(directory: Path, port: int, admin_port: int) -> tuple[Path, Path]:
    """nginx's configuration (the README's example, in a private prefix) and the CA file a
    browser would trust for it."""
    pair = tls.create_ca_signed_pair(directory, "proxy", "localhost")
    assert pair.ca is not None
    config = directory / "nginx.conf"
    config.write_text(
        f"""daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pair.cert};
        ssl_certificate_key {pair.key};
        location / {{
            proxy_pass http://127.0.0.1:{admin_port};
        }}
    }}
}}
"""
    )
    return config, pair.ca


@contextlib.asynccontextmanager
async def https_proxy(directory: Path, port: int, admin_port: int) -> AsyncIterator[Path]:
    """nginx terminating HTTPS on ``port`` in front of the admin page; yields its CA file."""
    if shutil.which("nginx") is None:
        pytest.fail(f"nginx is missing: {INSTALL_HINT}", pytrace=False)
    config, ca = await asyncio.to_thread(_proxy_config, directory, port, admin_port)
    log = directory / "error.log"
    nginx = await asyncio.create_subprocess_exec(
        "nginx", "-p", str(directory), "-c", str(config), "-e", str(log)
    )
    try:
        for _ in range(200):  # until it listens
            if nginx.returncode is not None:
                pytest.fail(await asyncio.to_thread(log.read_text))
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"nginx did not listen on port {port}: {log.read_text()}")
        yield ca
    finally:
        nginx.terminate()
        await nginx.wait()


@contextlib.asynccontextmanager
async def behind_proxy(tmp_path: Path, public_url: bool) -> AsyncIterator[httpx.AsyncClient]:
    """A browser on https://localhost:PORT, nginx, and the gateway (with or without
    ``admin.public_url`` set to that address)."""
    port = free_port()
    config = base_config(tmp_path / "state")
    if public_url:
        config["admin"]["public_url"] = f"https://localhost:{port}"
    async with (
        running_gateway(config, tmp_path / "gateway.yaml") as gateway,
        https_proxy(tmp_path / "nginx", port, gateway.ports["admin"]) as ca,
        httpx.AsyncClient(
            base_url=f"https://localhost:{port}",
            verify=ssl.create_default_context(cafile=ca),
            headers={"Origin": f"https://localhost:{port}"},  # as a browser sends with a form
            timeout=10,
        ) as browser,
    ):
        yield browser


async def test_forms_work_behind_an_https_reverse_proxy(tmp_path: Path) -> None:
    async with behind_proxy(tmp_path, public_url=True) as browser:
        login_page = await browser.get("/login")
        assert "Secure" in login_page.headers["set-cookie"]  # the browser sees https
        signed_in = await sign_in(browser)
        assert signed_in.status_code == 303, signed_in.text
        page = await browser.get("/")
        assert page.status_code == 200
        token = {"csrf_token": _csrf(page)}
        for forged in ("https://evil.example", f"http://{browser.base_url.netloc.decode()}"):
            refused = await browser.post("/logout", data=token, headers={"Origin": forged})
            assert refused.status_code == 403, forged
        logged_out = await browser.post("/logout", data=token)
        assert logged_out.status_code == 303 and logged_out.headers["location"] == "/login"


async def test_without_public_url_forms_through_a_proxy_are_refused(tmp_path: Path) -> None:
    """The request arrives as http://127.0.0.1: only ``admin.public_url`` can vouch for the
    https origin the browser names."""
    async with behind_proxy(tmp_path, public_url=False) as browser:
        assert (await sign_in(browser)).status_code == 403
