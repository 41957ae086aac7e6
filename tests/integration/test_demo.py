"""``gateway demo``: a new user's first run, from the command line, with nothing configured."""

from __future__ import annotations

import asyncio
import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import yaml

from gateway.config import load_settings
from gateway.demo import LISTENERS, Demo
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
        await _back_to_the_accounts_after_connecting_at_the_printed_address(demo, text)
        await _connect_through_the_admin_page(demo, text)
    finally:
        await demo.stop()
    assert demo.dovecot is not None and not demo.dovecot.running
    assert (tmp_path / "demo" / "config.yaml").exists()  # a directory the user gave is kept


async def _back_to_the_accounts_after_connecting_at_the_printed_address(
    demo: Demo, instructions: str
) -> None:
    """A browser that signs in at the printed address, connects a mailbox and follows the
    callback page's "Back to the accounts" link is still signed in: the printed address and the
    OAuth callback are one origin, so the session cookie comes back (httpx's cookie jar keeps
    cookies per host, as browsers do)."""
    admin_url = re.search(r"admin page\s+(http://\S+)", instructions).group(1)
    assert urlsplit(admin_url).netloc == urlsplit(demo.gateway.broker.redirect_uri()).netloc
    demo.sandbox.context.consent = "auto"
    cloud_tls = ssl.create_default_context(cafile=demo.sandbox.ca_file)
    async with (
        httpx.AsyncClient(timeout=30) as browser,
        httpx.AsyncClient(verify=cloud_tls, timeout=30) as cloud,
    ):
        login = await browser.get(urljoin(admin_url, "/login"))
        data = {"csrf_token": csrf_token(login), "password": demo.admin_password}
        assert (await browser.post(urljoin(admin_url, "/login"), data=data)).status_code == 303
        accounts = await browser.get(admin_url)
        start = await browser.post(
            urljoin(admin_url, "/accounts/crm/connect"), data={"csrf_token": csrf_token(accounts)}
        )
        answer = await cloud.get(start.headers["location"])  # Entra's form_post back to us
        action = re.search(r"action='([^']+)'", answer.text).group(1)
        fields = dict(re.findall(r"name='([^']+)' value='([^']*)'", answer.text))
        done = await browser.post(action, data=fields)
        assert "is connected" in done.text, done.text
        back = re.search(r'<a href="([^"]+)">Back to the accounts</a>', done.text).group(1)
        page = await browser.get(urljoin(str(done.url), back), follow_redirects=True)
        assert page.url.path == "/" and "crm@contoso.example" in page.text, page.text


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


def _start_demo(*args: str) -> tuple[subprocess.Popen, str]:
    """``gateway demo ARGS`` in a child process, and its instructions (up to the last line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    output = ""
    deadline = time.monotonic() + 60
    while "  state " not in output and time.monotonic() < deadline:  # the last line
        line = proc.stdout.readline()
        if not line:
            break
        output += line
    return proc, output


def _stop_demo(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read()


def _printed_ports(output: str) -> dict[str, int]:
    admin = urlsplit(re.search(r"admin page\s+(http://\S+)", output).group(1))
    found = {"admin": admin.port}
    for label, plain, tls in (("SMTP", "smtp", "smtps"), ("IMAP", "imap", "imaps")):
        ports = re.search(rf"{label}\s+localhost:(\d+) \(STARTTLS\), localhost:(\d+)", output)
        found[plain], found[tls] = int(ports.group(1)), int(ports.group(2))
    pop = re.search(r"POP3\s+localhost:(\d+), localhost:(\d+) \(TLS\)", output)
    found["pop3"], found["pop3s"] = int(pop.group(1)), int(pop.group(2))
    return found


def test_demo_command_prints_how_to_connect_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """The README's command: free ports (printed), and its temporary state is gone after Ctrl-C."""
    proc, output = _start_demo()
    try:
        admin = re.search(r"admin page\s+(http://\S+)", output)
        assert admin, output
        assert urlsplit(admin.group(1)).hostname == "localhost"  # the OAuth callback's host
        assert httpx.get(admin.group(1), timeout=10, follow_redirects=True).status_code == 200
        assert re.search(r"crm\s+/ \S+\s+->\s+crm@contoso.example \(microsoft\)", output)
        state = Path(re.search(r"  state\s+(\S+)  \(removed on exit", output).group(1))
        config = yaml.safe_load((state / "config.yaml").read_text())
        assert {a["provider"] for a in config["accounts"]} == {"microsoft", "google", "upstream"}
        assert os.stat(state / "config.yaml").st_mode & 0o077 == 0  # it holds passwords
        assert (state / "gateway" / "secret.key").exists()
        ports = _printed_ports(output)
        assert set(ports) == set(LISTENERS) and all(ports.values())
        assert config["listeners"] == {f"{name}_port": 0 for name in LISTENERS}  # free ones
    finally:
        _stop_demo(proc)
    assert not state.exists()  # tokens, key and config removed


def _free_port_block(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError("no block of free ports")


def test_demo_keeps_its_state_and_takes_fixed_ports_when_asked() -> None:
    first = _free_port_block(len(LISTENERS))
    proc, output = _start_demo("--keep", "--first-port", str(first))
    try:
        assert _printed_ports(output) == {
            name: first + offset for offset, name in enumerate(LISTENERS)
        }, output
        state = Path(re.search(r"  state\s+(\S+)  \(kept on exit\)", output).group(1))
    finally:
        _stop_demo(proc)
    try:
        assert (state / "gateway" / "secret.key").exists() and (state / "config.yaml").exists()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_demo_refuses_a_port_range_that_does_not_fit() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--first-port", "65530"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--first-port: must be 1-65529" in result.stderr


def test_demo_without_the_sandbox_says_how_to_install_it() -> None:
    """The product installs without the sandbox (its own distribution); ``gateway demo`` then
    names the one command that adds it, and no traceback. ``None`` in ``sys.modules`` makes the
    sandbox unimportable in the child, as in an environment that never installed it."""
    child = (
        "import sys; sys.modules['mailgw_sandbox'] = None; "
        "from gateway.cli import main; sys.exit(main(['demo']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    assert "needs the provider sandbox" in result.stderr
    assert "pip install ./sandbox" in result.stderr
    assert "Traceback" not in result.stderr
