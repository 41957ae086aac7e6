"""Every listener is a real server on a real socket, and answers real clients sensibly.

Each listener greets, negotiates TLS the way its port promises, and refuses what it must with
a clear protocol reply: no mail without AUTH, and a mailbox that is not connected yet named,
with the admin page's address, in the IMAP/POP3 login answer.
"""

from __future__ import annotations

import asyncio
import imaplib
import poplib
import smtplib
import ssl
import subprocess

import httpx
import pytest

from gateway.app import Gateway
from tests.helpers import PASSWORD

HOST = "127.0.0.1"


def _client_tls(gateway: Gateway) -> ssl.SSLContext:
    """Trust exactly the gateway's generated certificate, as an admin would configure a client."""
    return ssl.create_default_context(cafile=gateway.settings.state_dir / "tls" / "ca.crt")


async def test_smtp_starttls_then_no_mail_without_auth(gateway: Gateway) -> None:
    def session() -> tuple:
        with smtplib.SMTP(HOST, gateway.ports["smtp"], timeout=10) as client:
            banner = client.ehlo()
            advertised = client.has_extn("starttls")
            client.starttls(context=_client_tls(gateway))
            client.ehlo()
            return banner, advertised, client.mail("app@contoso.example")

    (code, _), advertised, (mail_code, mail_text) = await asyncio.to_thread(session)
    assert code == 250 and advertised
    assert mail_code == 530 and mail_text.startswith(b"5.7.0")


async def test_smtps_is_implicit_tls(gateway: Gateway) -> None:
    def session() -> tuple:
        context = _client_tls(gateway)
        with smtplib.SMTP_SSL(HOST, gateway.ports["smtps"], context=context, timeout=10) as client:
            return client.ehlo(), client.sock.version()

    (code, text), tls_version = await asyncio.to_thread(session)
    assert code == 250 and text.startswith(b"localhost")
    assert tls_version in ("TLSv1.2", "TLSv1.3")


async def test_imap_greets_offers_starttls_and_refuses_login_clearly(gateway: Gateway) -> None:
    def session() -> tuple:
        client = imaplib.IMAP4(HOST, gateway.ports["imap"], timeout=10)
        try:
            greeting = client.welcome
            before = client.capabilities
            client.starttls(ssl_context=_client_tls(gateway))
            with pytest.raises(imaplib.IMAP4.error) as wrong:
                client.login("crm", "whatever")
            with pytest.raises(imaplib.IMAP4.error) as unconnected:
                client.login("crm", PASSWORD)
            return greeting, before, str(wrong.value), str(unconnected.value)
        finally:
            client.shutdown()

    greeting, capabilities, wrong, unconnected = await asyncio.to_thread(session)
    assert greeting.startswith(b"* OK")
    # reading.plaintext_auth defaults to loopback: LOGIN in clear text from this machine is
    # allowed (test_imap_live covers "never"), STARTTLS is still offered.
    assert "STARTTLS" in capabilities and "LOGINDISABLED" not in capabilities
    assert "[AUTHENTICATIONFAILED]" in wrong
    # The right password: the answer names what to do and where.
    assert "[UNAVAILABLE] The mailbox crm@contoso.example must be connected again" in unconnected
    assert f"http://localhost:{gateway.ports['admin']}" in unconnected


async def test_imaps_is_implicit_tls(gateway: Gateway) -> None:
    def session() -> bytes:
        context = _client_tls(gateway)
        client = imaplib.IMAP4_SSL(HOST, gateway.ports["imaps"], ssl_context=context, timeout=10)
        try:
            return client.welcome
        finally:
            client.logout()

    assert (await asyncio.to_thread(session)).startswith(b"* OK [CAPABILITY IMAP4rev1")


@pytest.mark.parametrize("listener", ["pop3", "pop3s"])
async def test_pop3_greets_and_refuses_pass_clearly(gateway: Gateway, listener: str) -> None:
    def session() -> tuple:
        port = gateway.ports[listener]
        if listener == "pop3s":
            client = poplib.POP3_SSL(HOST, port, context=_client_tls(gateway), timeout=10)
        else:
            client = poplib.POP3(HOST, port, timeout=10)
        try:
            greeting = client.getwelcome()
            client.user("crm")
            with pytest.raises(poplib.error_proto) as wrong:
                client.pass_("whatever")
            client.user("scanner")
            with pytest.raises(poplib.error_proto) as unconnected:
                client.pass_(PASSWORD)
            return greeting, str(wrong.value), str(unconnected.value)
        finally:
            client.quit()

    greeting, wrong, unconnected = await asyncio.to_thread(session)
    assert greeting.startswith(b"+OK") and b"<" not in greeting  # no APOP timestamp
    assert "-ERR [AUTH]" in wrong
    assert "[SYS/TEMP] The mailbox scanner@example.com must be connected again" in unconnected


async def test_admin_page_and_health(gateway: Gateway) -> None:
    base = f"http://{HOST}:{gateway.ports['admin']}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        page = await client.get("/login")
        health = await client.get("/healthz")
    assert page.status_code == 200 and "Mail gateway" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert health.json()["status"] == "ok"


async def test_listeners_bind_loopback_only(gateway: Gateway) -> None:
    """The default host is loopback, and the sockets are really bound there, one per listener."""
    addresses = {name: (lst.host, lst.port) for name, lst in gateway.listeners.items()}
    assert set(addresses) == {"smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "admin"}
    assert {host for host, _ in addresses.values()} == {"127.0.0.1"}
    assert len({port for _, port in addresses.values()}) == 7


async def test_real_clients_curl_and_swaks(gateway: Gateway) -> None:
    """curl and swaks as the legacy world uses them, against the running gateway."""
    cafile = str(gateway.settings.state_dir / "tls" / "ca.crt")
    ports = gateway.ports

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    imap = await asyncio.to_thread(
        run,
        "curl",
        "-sS",
        "--cacert",
        cafile,
        "-u",
        "crm:pw",
        f"imaps://localhost:{ports['imaps']}/",
    )
    pop3 = await asyncio.to_thread(
        run,
        "curl",
        "-sS",
        "--cacert",
        cafile,
        "-u",
        "crm:pw",
        f"pop3s://localhost:{ports['pop3s']}/",
    )
    admin = await asyncio.to_thread(
        run,
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"http://{HOST}:{ports['admin']}/login",
    )
    swaks = await asyncio.to_thread(
        run,
        "swaks",
        "--server",
        HOST,
        "--port",
        str(ports["smtp"]),
        "--tls",
        "--tls-ca-path",
        cafile,
        "--tls-verify",
        "--tls-sni",
        "localhost",
        "--auth-user",
        "crm",
        "--auth-password",
        PASSWORD,
        "--from",
        "crm@contoso.example",
        "--to",
        "someone@example.net",
    )
    assert imap.returncode == 67, imap.stderr  # 67: curl's "login denied"
    assert pop3.returncode == 67
    assert admin.stdout == "200"
    # Not connected yet: accepted and held until the owner connects the mailbox.
    assert "250 2.0.0" in swaks.stdout and swaks.returncode == 0, swaks.stdout + swaks.stderr
    assert [r.state for r in gateway.spool.messages()] in (["queued"], ["held"])
