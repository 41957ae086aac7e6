"""Values and builders shared by tests (importable, unlike conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import email
import imaplib
import json
import os
import re
import secrets
import signal
import smtplib
import socket
import ssl
import string
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from gateway.passwords import hash_password
from gateway.store import KEY_ENV_VAR, MailboxStore, SecretBox, migrate_postgresql, open_sqlite
from mailgw_sandbox import App, Sandbox, SentMessage, User

PASSWORD = "correct horse battery"
# A cheap hash (2**10) keeps the suite fast; production hashes use 2**15.
PASSWORD_HASH = hash_password(PASSWORD, log2_n=10)


def free_port() -> int:
    """A port that was free a moment ago, for subprocesses that cannot report port 0's choice."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_config(state_dir: Path, **overrides: Any) -> dict:
    """A valid config as a dict: every listener on port 0 (any free port), two accounts."""
    config: dict[str, Any] = {
        "state_dir": str(state_dir),
        "listeners": {
            f"{name}_port": 0
            for name in ("smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "admin")
        },
        "microsoft": {"client_id": "11111111-2222-3333-4444-555555555555"},
        "admin": {"password_hash": PASSWORD_HASH},
        "logging": {"level": "debug"},
        "accounts": [
            {
                "username": "crm",
                "password_hash": PASSWORD_HASH,
                "provider": "microsoft",
                "address": "crm@contoso.example",
            },
            {
                "username": "scanner",
                "password_hash": PASSWORD_HASH,
                "provider": "google",
                "address": "scanner@example.com",
            },
        ],
    }
    config.update(overrides)
    return config


def csrf_token(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


class AdminBrowser:
    """An admin's browser: cookies for the gateway, and the sandbox's CA for the clouds."""

    def __init__(self, gateway: Any, sandbox: Any) -> None:
        self.admin = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gateway.ports['admin']}", timeout=30
        )
        self.cloud = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=sandbox.ca_file), timeout=30
        )

    async def sign_in(self, password: str = PASSWORD) -> None:
        page = await self.admin.get("/login")
        data = {"csrf_token": csrf_token(page), "password": password}
        assert (await self.admin.post("/login", data=data)).status_code == 303

    async def post(self, path: str, **data: str) -> httpx.Response:
        page = await self.admin.get("/")
        return await self.admin.post(path, data={"csrf_token": csrf_token(page), **data})

    async def consent(self, provider_url: str) -> httpx.Response:
        """Follow the provider's (auto-consent) answer back into the gateway's callback:
        a redirect (Google) or an auto-submitting form (Microsoft's form_post)."""
        answer = await self.cloud.get(provider_url)
        if answer.status_code in (302, 303):
            callback = urlsplit(answer.headers["location"])
            return await self.admin.get(f"{callback.path}?{callback.query}")
        assert answer.status_code == 200, answer.text
        action = urlsplit(re.search(r"action='([^']+)'", answer.text).group(1))
        fields = dict(re.findall(r"name='([^']+)' value='([^']*)'", answer.text))
        return await self.admin.post(action.path, data=fields)

    async def consent_link(self, account: str) -> str:
        """The path of a consent link the (signed-in) admin makes for ``account``."""
        page = await self.post(f"/accounts/{account}/consent-link")
        link = re.search(r'value="(http://localhost:\d+/consent/[^"]+)"', page.text)
        assert link is not None, page.text
        return urlsplit(link.group(1)).path

    async def connect_through(self, link: str, address: str) -> httpx.Response:
        """As the mailbox's owner (no admin password): open the consent link, whose page names
        ``address``, press Connect and consent at the provider; the gateway's last answer."""
        landing = await self.admin.get(link)
        assert landing.status_code == 200 and address in landing.text, landing.text
        go = await self.admin.post(link, data={"csrf_token": csrf_token(landing)})
        assert go.status_code == 303, go.text
        return await self.consent(go.headers["location"])

    async def close(self) -> None:
        await self.admin.aclose()
        await self.cloud.aclose()


MS_ADDRESS = "crm@contoso.example"
GOOGLE_ADDRESS = "scanner@example.com"
CLOUD_ACCOUNTS = {"microsoft": ("crm", MS_ADDRESS), "google": ("scanner", GOOGLE_ADDRESS)}
"""provider → (the gateway account, its sandbox mailbox) in ``sandbox_config``."""


def sandbox_config(sandbox: Sandbox, state_dir: Path, **overrides: object) -> tuple[dict, App]:
    """A gateway config wired to the sandbox clouds, and the Google app (entered later)."""
    # As the README documents: an Entra public client (the gateway's callback under Mobile and
    # desktop applications, public client flows allowed, no secret) and a Google Web application.
    ms_app = sandbox.add_app(
        "microsoft",
        public_client_redirect_uris=("http://localhost/oauth/callback",),
        allow_public_client_flows=True,
        secret=False,
    )
    google_app = sandbox.add_app("google")
    sandbox.add_user("microsoft", MS_ADDRESS)
    sandbox.add_user("microsoft", "someone.else@contoso.example")
    sandbox.add_user("google", GOOGLE_ADDRESS)
    config = base_config(state_dir)
    config.update(
        ca_bundle=str(sandbox.ca_file),
        microsoft={
            "client_id": ms_app.client_id,
            "tenant": sandbox.microsoft.tenant_id,
            "authority_host": sandbox.url,
            "graph_url": f"{sandbox.url}/v1.0",
        },
        google={
            "auth_uri": f"{sandbox.url}/o/oauth2/v2/auth",
            "token_uri": f"{sandbox.url}/token",
            "gmail_url": sandbox.url,
        },
    )
    config.update(overrides)
    return config, google_app


@contextlib.asynccontextmanager
async def running_gateway(
    config: dict, path: Path, sandbox: Sandbox | None = None
) -> AsyncIterator[Any]:
    """Write ``config`` to ``path`` and run a gateway on it; sandbox apps learn its callback."""
    from gateway.app import Gateway
    from gateway.config import load_settings

    await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
    gateway = Gateway(load_settings(path))
    await gateway.start()
    if sandbox is not None:
        register_callbacks(sandbox, gateway)
    try:
        yield gateway
    finally:
        await gateway.stop()


def register_callbacks(sandbox: Sandbox, *gateways: Any) -> None:
    """Every sandbox app accepts these gateways' callbacks as redirect URIs, and no other, on
    the platform it was registered for (mobile and desktop for a public client, else web)."""
    callbacks = tuple(gateway.broker.redirect_uri() for gateway in gateways)
    for app in sandbox.directory.apps.values():
        if app.public_client_redirect_uris:
            app.public_client_redirect_uris = callbacks
        else:
            app.redirect_uris = callbacks


@contextlib.asynccontextmanager
async def running_cluster(
    config: dict,
    directory: Path,
    url: str,
    count: int = 2,
    sandbox: Sandbox | None = None,
) -> AsyncIterator[list[Any]]:
    """``count`` gateways in this process sharing the PostgreSQL database ``url``, as behind
    a load balancer. The database is migrated first (instances never migrate it themselves)
    and all seal with one secret key (each checks it when it opens the database). Instance
    "a", "b", ... runs on its own copy of ``config`` with its own state directory and config
    file (``directory``/a, ``directory``/a.yaml, ...) and its own ports (``config``'s port 0);
    with ``sandbox``, the apps there accept every instance's callback. Started in order, stopped
    in reverse."""
    await migrate_postgresql(url)
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    async with contextlib.AsyncExitStack() as stack:
        environment = stack.enter_context(pytest.MonkeyPatch.context())
        environment.setenv(KEY_ENV_VAR, key)
        gateways = []
        for name in string.ascii_lowercase[:count]:
            own = copy.deepcopy(config)
            own["state_dir"] = str(directory / name)
            own["store"] = {**own.get("store", {}), "url": url}
            path = directory / f"{name}.yaml"
            gateways.append(await stack.enter_async_context(running_gateway(own, path)))
        if sandbox is not None:
            register_callbacks(sandbox, *gateways)
        yield gateways


def serve_without_consent(
    sandbox: Sandbox,
    config: dict,
    directory: Path,
    google_scopes: tuple[str, ...] = ("gmail.send", "gmail.readonly"),
) -> None:
    """Connection modes nobody has to consent to, so the gateway serves both sandbox accounts
    right after start: Microsoft app-only (Mail.Send, Mail.ReadWrite granted) and a Google
    service account with domain-wide delegation of ``google_scopes``."""
    app = sandbox.add_app("microsoft", app_permissions=("Mail.Send", "Mail.ReadWrite"))
    config["microsoft"].update(
        client_id=app.client_id, app_only=True, client_secret=app.client_secret
    )
    scopes = [f"https://www.googleapis.com/auth/{scope}" for scope in google_scopes]
    key_file = directory / "service-account.json"
    key_file.write_text(json.dumps(sandbox.google.add_service_account(scopes, sandbox.url)))
    config["google"]["service_account_file"] = str(key_file)


READ_SCOPES = {
    "microsoft": {"Mail.Read"},
    "google": {"https://www.googleapis.com/auth/gmail.readonly"},
}


class SandboxTokens:
    """Broker stand-in for provider-side tests: a real read-only sandbox access token (the
    broker itself is tested through the admin pages)."""

    def __init__(self, sandbox: Sandbox, user: Any) -> None:
        self.sandbox, self.user = sandbox, user
        self.app = sandbox.add_app(user.provider).client_id
        self._token: str | None = None

    async def access_token(self, username: str) -> str:
        if self._token is None:
            grant = self.sandbox.directory.issue(
                "access",
                self.user.provider,
                self.app,
                self.user.address,
                READ_SCOPES[self.user.provider],
            )
            self._token = grant.token
        return self._token

    async def refreshed_token(self, username: str, rejected: str, claims: str | None = None) -> str:
        if self._token == rejected:
            self._token = None
        return await self.access_token(username)


IDLE_WAIT = 15.0  # seconds an IDLE waits for a push: many poll intervals, never reached when green


@contextlib.contextmanager
def idling(client: imaplib.IMAP4) -> Iterator[Any]:
    """IDLE on imaplib's socket; yields ``wait(pattern)`` → the first untagged line matching."""
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    assert client.readline().startswith(b"+"), "no continuation for IDLE"

    def wait(pattern: bytes) -> bytes:
        deadline = time.monotonic() + IDLE_WAIT
        while time.monotonic() < deadline:
            client.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                line = client.readline()
            except TimeoutError:
                break
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no untagged {pattern!r} within {IDLE_WAIT} s of IDLE")

    try:
        yield wait
    finally:
        client.sock.settimeout(IDLE_WAIT)
        client.send(b"DONE\r\n")
        while True:
            line = client.readline()
            if line.startswith(tag):
                assert b"OK" in line, line
                break


HOST = "127.0.0.1"


def imap_starttls_login(port: int, cafile: str, account: str) -> imaplib.IMAP4:
    """An IMAP client of the gateway, signed in as ``account`` after STARTTLS (trusting the
    gateway's own CA, ``cafile``), with a timeout that outlasts an IDLE wait."""
    client = imaplib.IMAP4(HOST, port, timeout=IDLE_WAIT + 5)
    client.starttls(ssl_context=ssl.create_default_context(cafile=cafile))
    client.login(account, PASSWORD)
    return client


class InboxSeeder:
    """Puts small messages (Message-ID ``<subject@example.org>``) in a sandbox user's INBOX,
    received one minute apart from ``start`` in the order seeded."""

    def __init__(self, sandbox: Sandbox, user: User, start: datetime) -> None:
        self.sandbox, self.user, self.start = sandbox, user, start
        self.seeded = 0

    def __call__(self, subject: str) -> str:
        """Seed one message; its provider id."""
        raw = (
            f"From: s@example.org\r\nTo: {self.user.address}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\n\r\nBody of {subject}.\r\n"
        ).encode()
        received = self.start + timedelta(minutes=self.seeded)
        self.seeded += 1
        return self.sandbox.ops(self.user).seed_inbox(self.user, raw, received_at=received)


GMAIL_SCOPES = [
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.readonly",
]


def connected_config(sandbox: Sandbox, tmp_path: Path) -> dict:
    """A config wired to the sandbox whose accounts need no interactive consent: Microsoft
    app-only (client credentials) and a Google service account with domain-wide delegation,
    so a gateway started on it, in-process or as a subprocess, delivers at once."""
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    app = sandbox.add_app("microsoft", app_permissions=("Mail.Send", "Mail.ReadWrite"))
    config["microsoft"].update(
        client_id=app.client_id, client_secret=app.client_secret, app_only=True
    )
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(sandbox.google.add_service_account(GMAIL_SCOPES, sandbox.url)))
    config["google"]["service_account_file"] = str(key_file)
    return config


class GatewayProcess:
    """``python -m gateway run`` as a child process; its output goes to a file (a full pipe
    would block it), which failing assertions show."""

    def __init__(
        self, config: Path, log: Path, smtp_port: int, env: dict[str, str] | None = None
    ) -> None:
        self.config, self.log, self.smtp_port = config, log, smtp_port
        self.env = env  # e.g. the shared GATEWAY_SECRET_KEY of a cluster's instances
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, within: float = 30.0) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "run", "-c", str(self.config),
                stdout=out, stderr=subprocess.STDOUT,
                env=None if self.env is None else {**os.environ, **self.env},
            )  # fmt: skip
        deadline = time.monotonic() + within
        while True:
            assert self.process.returncode is None, self.output()
            try:
                _, writer = await asyncio.open_connection(HOST, self.smtp_port)
            except OSError:
                assert time.monotonic() < deadline, self.output()
                await asyncio.sleep(0.1)
                continue
            writer.close()
            return

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), 30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


class Burst:
    """Concurrent smtplib clients submitting numbered messages; records which got a 250 and
    which were in doubt (DATA sent, no reply: the gateway may or may not have stored them)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.accepted: set[str] = set()
        self.in_doubt: set[str] = set()
        self.lock = threading.Lock()

    def client(self, worker: int, workers: int, port: int) -> None:
        address = {"crm": MS_ADDRESS, "scanner": GOOGLE_ADDRESS}
        account = ("crm", "scanner")[worker % 2]
        try:
            with smtplib.SMTP(HOST, port, timeout=20) as client:
                client.login(account, PASSWORD)
                for n in range(worker, self.total, workers):
                    message_id = f"<burst-{n}@crash.e2e.test>"
                    data = (
                        f"From: {address[account]}\r\nTo: alice@example.org\r\n"
                        f"Subject: burst {n}\r\nMessage-ID: {message_id}\r\n\r\nmessage {n}\r\n"
                    ).encode()
                    with self.lock:
                        self.in_doubt.add(message_id)
                    client.sendmail(address[account], ["alice@example.org"], data)
                    with self.lock:  # sendmail returned: the server answered 250 to DATA
                        self.in_doubt.discard(message_id)
                        self.accepted.add(message_id)
        except (OSError, smtplib.SMTPException):
            return  # the gateway was killed under us


def sent_of(sandbox: Sandbox, address: str) -> list[SentMessage]:
    user = sandbox.directory.user(address)
    assert user is not None
    return list(sandbox.ops(user).sent(user))


def parsed(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def message_ids(sent: list[SentMessage]) -> list[str]:
    return [str(parsed(s.raw)["Message-ID"]).strip() for s in sent]


async def until(check: Callable[[], bool], within: float, what: str | Callable[[], str]) -> None:
    """Poll ``check`` on the loop (the gateway and the sandbox run on it) for a bounded time;
    ``what`` (or what it returns, evaluated on failure) says what was awaited."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() >= deadline:
            pytest.fail(f"not reached within {within} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.05)


class ManualClock:
    """An injectable clock whose seconds move only when a test moves ``now``, and a ``sleep``
    that records each delay asked for (``slept``) instead of waiting it out."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def sqlite_mailboxes(directory: Path) -> AsyncIterator[MailboxStore]:
    """The mailbox store of the SQLite state database in ``directory`` (made on first use,
    sealed with a fixed key, so a second opening reads what the first wrote), closed after."""
    stores = await open_sqlite(directory, SecretBox(bytes(range(32))))
    try:
        yield stores.mailboxes
    finally:
        await stores.close()
