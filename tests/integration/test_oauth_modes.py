"""The other ways to connect: device code from the CLI, app-only (client credentials), a
Google service account with domain-wide delegation; and the admin webhook on re-consent."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from gateway.app import Gateway
from gateway.oauth import ReauthRequired
from mailgw_sandbox import Sandbox
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    AdminBrowser,
    running_gateway,
    sandbox_config,
)


async def _gateway_cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_device_code_from_the_cli(sandbox: Sandbox, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(sandbox_config(sandbox, tmp_path / "state")[0]))
    sandbox.microsoft.set_device_poll_interval(1)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "connect", "crm", "--device", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    instruction = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    user_code = re.search(r"enter the code (\S+)", instruction).group(1)
    sandbox.microsoft.approve_device_code(user_code, MS_ADDRESS)
    rest = (await asyncio.wait_for(process.stdout.read(), 60)).decode()
    assert await process.wait() == 0, rest
    assert f"crm: connected as {MS_ADDRESS}" in rest
    code, listing = await _gateway_cli("accounts", "-c", str(config))
    assert code == 0 and re.search(rf"crm\s+{MS_ADDRESS}\s+microsoft\s+connected as", listing)
    code, refused = await _gateway_cli("connect", "scanner", "--device", "-c", str(config))
    assert code == 1 and "Google does not allow Gmail scopes in the device flow" in refused


def _app_certificate(path: Path) -> bytes:
    """An RSA key and self-signed certificate in one PEM file; returns the certificate PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway app")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(key_pem + certificate_pem)
    return certificate_pem


@pytest.mark.parametrize("credential", ["secret", "certificate"])
async def test_app_only_needs_nobody_to_sign_in(
    sandbox: Sandbox, tmp_path: Path, credential: str
) -> None:
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    app = sandbox.add_app("microsoft", app_permissions=("Mail.Send", "Mail.ReadWrite"))
    config["microsoft"].update(client_id=app.client_id, app_only=True)
    if credential == "secret":
        config["microsoft"]["client_secret"] = app.client_secret
    else:
        pem_file = tmp_path / "app.pem"
        certificate = await asyncio.to_thread(_app_certificate, pem_file)
        sandbox.microsoft.register_certificate(app.client_id, certificate)
        config["microsoft"]["client_certificate"] = str(pem_file)
    async with running_gateway(config, tmp_path / "c.yaml") as gateway:
        assert (await gateway.broker.status("crm")).state == "app_only"
        token = await gateway.broker.access_token("crm")
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=sandbox.ca_file)
        ) as graph:
            inbox = await graph.get(
                f"{sandbox.url}/v1.0/users/{MS_ADDRESS}/mailFolders/inbox/messages",
                headers={"Authorization": f"Bearer {token}"},
            )
        assert inbox.status_code == 200, inbox.text


async def test_google_service_account_with_domain_wide_delegation(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    key = sandbox.google.add_service_account(
        [
            "https://www.googleapis.com/auth/gmail.send",
            "https://www.googleapis.com/auth/gmail.readonly",
        ],
        sandbox.url,
    )
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(key))
    config["google"]["service_account_file"] = str(key_file)
    async with running_gateway(config, tmp_path / "c.yaml") as gateway:
        token = await gateway.broker.access_token("scanner")
        async with httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=sandbox.ca_file)
        ) as gmail:
            profile = await gmail.get(
                f"{sandbox.url}/gmail/v1/users/me/profile",
                headers={"Authorization": f"Bearer {token}"},
            )
        assert profile.status_code == 200 and profile.json()["emailAddress"] == GOOGLE_ADDRESS
        assert (await gateway.broker.status("scanner")).state == "app_only"


async def test_webhook_is_told_once_when_a_mailbox_needs_reconsent(
    sandbox: Sandbox, tmp_path: Path, unused_tcp_port: int
) -> None:
    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    config["admin"]["notify_webhook"] = f"http://127.0.0.1:{unused_tcp_port}/hook"
    try:
        async with running_gateway(config, tmp_path / "c.yaml", sandbox) as gateway:
            await _revoke_three_times(gateway, sandbox)
            assert len(received) == 1
            assert received[0]["event"] == "needs_reconsent"
            assert received[0]["account"] == "crm"
            assert received[0]["admin_url"] == gateway.broker.admin_url()
    finally:
        await runner.cleanup()


async def _revoke_three_times(gateway: Gateway, sandbox: Sandbox) -> None:
    browser = AdminBrowser(gateway, sandbox)
    try:
        sandbox.directory.access_lifetime["microsoft"] = 240  # MSAL refreshes every call
        await browser.sign_in()
        start = await browser.post("/accounts/crm/connect")
        assert "is connected" in (await browser.consent(start.headers["location"])).text
        sandbox.directory.revoke_user(MS_ADDRESS)
        for _ in range(3):
            gateway.broker.invalidate("crm")
            with pytest.raises(ReauthRequired, match="must be connected again"):
                await gateway.broker.access_token("crm")
    finally:
        await browser.close()
