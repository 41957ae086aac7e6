"""A running gateway serving Graph, Gmail and upstream accounts, and raw-byte IMAP clients.

Shared by the integration tests that talk to the whole gateway over real sockets
(``test_imap_robustness``, ``test_gateway_differential``, ``test_mail_clients``). Both accounts
use the connection modes that need no consent (Microsoft app-only, a Google service account),
so the INBOX is served right after start; mail is seeded through the sandbox's own operations.
"""

from __future__ import annotations

import contextlib
import imaplib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailgw_sandbox import Sandbox, User
from mailgw_sandbox.upstream import Dovecot, MailUser
from tests.helpers import (
    CLOUD_ACCOUNTS,
    PASSWORD,
    PASSWORD_HASH,
    running_gateway,
    sandbox_config,
    serve_without_consent,
)

HOST = "127.0.0.1"
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
ACCOUNTS = CLOUD_ACCOUNTS

# What a Python error looks like when it leaks to a client; no response may contain any of it.
PYTHON_LEAKS = (
    b"Traceback",
    b'File "',
    b"Error:",
    b"Exception",
    b"NoneType",
    b"object has no attribute",
    b"invalid literal for int",
    b"codec can't",
    b"index out of range",
    b"unexpected keyword",
    b"positional argument",
    b"Server error",
)


@dataclass
class Gateway:
    """The running gateway, the sandbox behind it and the users of its two accounts."""

    gateway: Any
    sandbox: Sandbox
    users: dict[str, User]  # account name -> sandbox user
    cafile: str
    seeded: dict[str, int] = field(default_factory=dict)
    upstream: dict[str, tuple[Dovecot, MailUser]] = field(default_factory=dict)

    @property
    def ports(self) -> dict[str, int]:
        return self.gateway.ports

    def seed(self, account: str, raw: bytes) -> None:
        """Deliver ``raw`` into the account's INBOX; arrival times follow the seeding order."""
        if account in self.upstream:
            dovecot, mail_user = self.upstream[account]
            dovecot.deliver(mail_user.name, raw)
            return
        user = self.users[account]
        n = self.seeded.get(account, 0)
        self.seeded[account] = n + 1
        self.sandbox.ops(user).seed_inbox(user, raw, received_at=T0 + timedelta(minutes=n))

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)

    def imap(self, account: str, implicit: bool = False) -> imaplib.IMAP4:
        """A logged-in imaplib client (STARTTLS, or IMAPS with ``implicit``)."""
        if implicit:
            client: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                HOST, self.ports["imaps"], ssl_context=self.tls(), timeout=15
            )
        else:
            client = imaplib.IMAP4(HOST, self.ports["imap"], timeout=15)
            client.starttls(ssl_context=self.tls())
        client.login(account, PASSWORD)
        return client

    def raw_imaps(self) -> RawIMAP:
        """An unauthenticated raw client on the IMAPS port."""
        sock = socket.create_connection((HOST, self.ports["imaps"]), timeout=15)
        return RawIMAP(self.tls().wrap_socket(sock, server_hostname="localhost"))


@contextlib.asynccontextmanager
async def two_account_gateway(
    directory: Path, dovecot: Dovecot | None = None
) -> AsyncIterator[Gateway]:
    """A sandbox and a gateway serving ``crm`` (Graph, app-only) and ``scanner`` (Gmail); with
    ``dovecot``, also ``legacy`` (its INBOX from upstream IMAP) and ``legacypop`` (from upstream
    POP3), each a fresh Dovecot user reached over STARTTLS with the Dovecot CA."""
    sandbox = Sandbox(directory / "sandbox")
    await sandbox.start()
    try:
        config, _ = sandbox_config(sandbox, directory / "state")
        serve_without_consent(sandbox, config, directory)
        users = {}
        for account, address in ACCOUNTS.values():
            user = sandbox.directory.user(address)
            assert user is not None
            users[account] = user
        upstream = _upstream_accounts(config, dovecot) if dovecot is not None else {}
        async with running_gateway(config, directory / "gateway.yaml") as gateway:
            cafile = str(gateway.settings.state_dir / "tls" / "ca.crt")
            yield Gateway(gateway, sandbox, users, cafile, upstream=upstream)
    finally:
        await sandbox.stop()


def _upstream_accounts(config: dict, dovecot: Dovecot) -> dict[str, tuple[Dovecot, MailUser]]:
    accounts = {}
    for account, protocol, port in (
        ("legacy", "imap", dovecot.imap_port),
        ("legacypop", "pop3", dovecot.pop3_port),
    ):
        user = dovecot.new_user(account)
        server = {
            "host": "localhost",
            "port": port,
            "security": "starttls",
            "username": user.name,
            "password": user.password,
            "ca_file": str(dovecot.ca_file),
        }
        config["accounts"].append(
            {
                "username": account,
                "password_hash": PASSWORD_HASH,
                "provider": "upstream",
                "address": f"{account}@upstream.test",
                "upstream": {protocol: server},
            }
        )
        accounts[account] = (dovecot, user)
    return accounts


class RawIMAP:
    """A blocking IMAP client that returns whole responses as bytes, literals included.

    Built on a connected socket, or on a logged-in imaplib client (whose socket, after
    STARTTLS, is the TLS one): the bytes compared are exactly what the server sent.
    """

    def __init__(self, sock: socket.socket, reader: Any = None) -> None:
        self.sock = sock
        self.file = reader if reader is not None else sock.makefile("rb")
        self.greeting = b"" if reader is not None else self.file.readline()
        self.counter = 0

    @classmethod
    def over(cls, client: imaplib.IMAP4) -> RawIMAP:
        return cls(client.sock, client.file)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> bytes:
        """One response: a line, plus any literal it announces and the rest of its line."""
        out = b""
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"server closed the connection after {out!r}")
            out += line
            if line.endswith(b"}\r\n") and b"{" in line:
                size = int(line[line.rindex(b"{") + 1 : -3])
                out += self.file.read(size)
                continue
            return out

    def read_until(self, tag: bytes) -> list[bytes]:
        """Responses up to and including the one tagged ``tag``."""
        responses: list[bytes] = []
        while True:
            responses.append(self.response())
            if responses[-1].startswith(tag + b" "):
                return responses

    def command(self, line: bytes | str) -> list[bytes]:
        """Send one command under a fresh tag; its responses, the tagged one last."""
        self.counter += 1
        tag = b"t%d" % self.counter
        data = line.encode() if isinstance(line, str) else line
        self.send(tag + b" " + data + b"\r\n")
        return self.read_until(tag)

    def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def login_raw(gw: Gateway, account: str) -> RawIMAP:
    """A raw IMAPS client, logged in and with INBOX selected."""
    client = gw.raw_imaps()
    assert client.command(f'LOGIN {account} "{PASSWORD}"')[-1].split()[1] == b"OK"
    assert client.command("SELECT INBOX")[-1].split()[1] == b"OK"
    return client
