"""``gateway demo``: a new user's first run, from the command line, with nothing configured."""

from __future__ import annotations

import asyncio
import os
import poplib
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from gateway.config import load_settings
from gateway.demo import Demo
from tests.helpers import AdminBrowser, csrf_token


async def test_demo_wires_the_gateway_to_seeded_sandbox_mailboxes(tmp_path: Path) -> None:
    demo = Demo(tmp_path / "demo")
    await demo.start()
    try:
        text = demo.instructions()
        sandbox = demo.sandbox
        for provider in ("microsoft", "google"):
            (account,) = [a for a in demo.accounts if a.provider == provider]
            user = sandbox.directory.user(account.address)
            assert user is not None and user.provider == provider
            assert len(sandbox.ops(user).inbox_ids(user)) == 3
            assert f"{account.username:<8} / {account.password}" in text
        (upstream,) = [a for a in demo.accounts if a.provider == "upstream"]
        assert f"{upstream.username:<8} / {upstream.password}" in text
        assert demo.dovecot is not None and demo.dovecot.message_count("legacy") == 3
        settings = load_settings(tmp_path / "demo" / "config.yaml")
        assert settings.microsoft.authority_host == sandbox.url
        assert settings.google.token_uri == f"{sandbox.url}/token"
        assert settings.ca_bundle == sandbox.ca_file
        imap = settings.accounts[2].upstream.imap
        assert imap.port == demo.dovecot.imaps_port and imap.ca_file == demo.dovecot.ca_file
        assert f"admin password {demo.admin_password}" in " ".join(text.split())
        assert await asyncio.to_thread(_read_upstream_inbox, demo, upstream.password) == 3
        assert f"-u legacy:{upstream.password} 'pop3s://localhost:" in text
        assert "(upstream; reads only, sends nothing)" in text
        assert "it can only read mail: it has no upstream.smtp server" in text
        refusal = await asyncio.to_thread(_send_as_upstream_account, demo, upstream.password)
        assert refusal[0] == 550 and "can only read mail" in refusal[1]
        await _connect_through_the_admin_page(demo, text)
    finally:
        await demo.stop()
    assert demo.dovecot is not None and not demo.dovecot.running


def _read_upstream_inbox(demo: Demo, password: str) -> int:
    """The printed upstream example works before anyone consents: POP3S to the demo gateway."""
    cafile = str(demo.gateway.settings.state_dir / "tls" / "ca.crt")
    context = ssl.create_default_context(cafile=cafile)
    client = poplib.POP3_SSL("localhost", demo.gateway.ports["pop3s"], context=context, timeout=15)
    try:
        client.user("legacy")
        client.pass_(password)
        return client.stat()[0]
    finally:
        client.quit()


def _send_as_upstream_account(demo: Demo, password: str) -> tuple[int, str]:
    """What the text says holds: the read-only account logs in and is refused at MAIL FROM."""
    cafile = str(demo.gateway.settings.state_dir / "tls" / "ca.crt")
    context = ssl.create_default_context(cafile=cafile)
    with smtplib.SMTP("localhost", demo.gateway.ports["smtp"], timeout=15) as client:
        client.starttls(context=context)
        client.login("legacy", password)
        try:
            client.sendmail(
                "legacy@upstream.example", ["someone@example.org"], b"Subject: x\r\n\r\nx\r\n"
            )
        except smtplib.SMTPSenderRefused as error:
            return error.smtp_code, error.smtp_error.decode()
    return 250, "accepted"


async def _connect_through_the_admin_page(demo: Demo, instructions: str) -> None:
    """What the printed instructions tell a new user to do, for both cloud accounts."""
    demo.sandbox.context.consent = "auto"  # the consent screen itself is tested in the sandbox
    browser = AdminBrowser(demo.gateway, demo.sandbox)
    try:
        await browser.sign_in(demo.admin_password)
        client_id = re.search(r"Google client ID\s+(\S+)", instructions).group(1)
        secret = re.search(r"Google client secret\s+(\S+)", instructions).group(1)
        form = await browser.admin.get("/google-client")
        data = {"csrf_token": csrf_token(form), "client_id": client_id, "client_secret": secret}
        assert (await browser.admin.post("/google-client", data=data)).status_code == 303
        for username in ("crm", "scanner"):
            start = await browser.post(f"/accounts/{username}/connect")
            done = await browser.consent(start.headers["location"])
            assert "is connected" in done.text, done.text
        for username in ("crm", "scanner"):
            assert (await demo.gateway.broker.status(username)).state == "connected"
    finally:
        await browser.close()
    await _send_as_the_printed_example_does(demo)
    await _read_the_inbox_over_pop3(demo)


async def _send_as_the_printed_example_does(demo: Demo) -> None:
    crm = next(a for a in demo.accounts if a.username == "crm")

    def submit() -> None:
        with smtplib.SMTP("localhost", demo.gateway.ports["smtp"], timeout=10) as client:
            client.starttls(context=ssl.create_default_context(cafile=_gateway_ca(demo)))
            client.login(crm.username, crm.password)
            client.sendmail(
                crm.address,
                ["someone@example.org"],
                f"From: {crm.address}\r\nTo: someone@example.org\r\nSubject: demo\r\n\r\nhi\r\n",
            )

    await asyncio.to_thread(submit)
    user = demo.sandbox.directory.user(crm.address)
    for _ in range(200):
        sent = demo.sandbox.ops(user).sent(user)
        if sent:
            break
        await asyncio.sleep(0.05)
    assert [m.recipients for m in sent] == [("someone@example.org",)]


async def _read_the_inbox_over_pop3(demo: Demo) -> None:
    """The seeded INBOX through the gateway's POP3S listener, read from the sandbox Graph."""
    crm = next(a for a in demo.accounts if a.username == "crm")

    def session() -> list[bytes]:
        context = ssl.create_default_context(cafile=_gateway_ca(demo))
        client = poplib.POP3_SSL("localhost", demo.gateway.ports["pop3s"], context=context)
        try:
            client.user(crm.username)
            client.pass_(crm.password)
            count, _ = client.stat()
            return [b"\r\n".join(client.retr(n + 1)[1]) for n in range(count)]
        finally:
            client.quit()

    messages = await asyncio.to_thread(session)
    assert len(messages) == 3
    joined = b"\n".join(messages)
    assert b"Subject: Quarterly figures" in joined and b'filename="q.csv"' in joined


def _gateway_ca(demo: Demo) -> str:
    return str(demo.gateway.settings.state_dir / "tls" / "ca.crt")


def test_demo_command_prints_how_to_connect_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        output = ""
        deadline = time.monotonic() + 60
        while "  config " not in output and time.monotonic() < deadline:  # the last line
            line = proc.stdout.readline()
            if not line:
                break
            output += line
        admin = re.search(r"admin page\s+(http://\S+)", output)
        assert admin, output
        assert httpx.get(admin.group(1), timeout=10, follow_redirects=True).status_code == 200
        assert re.search(r"crm\s+/ \S+\s+->\s+crm@contoso.example \(microsoft\)", output)
        config = yaml.safe_load((state / "config.yaml").read_text())
        assert {a["provider"] for a in config["accounts"]} == {"microsoft", "google", "upstream"}
        assert os.stat(state / "config.yaml").st_mode & 0o077 == 0  # it holds passwords
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read()
