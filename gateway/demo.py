"""``gateway demo``: the sandbox clouds, a private Dovecot, and a gateway wired to all of them.

A new user sees the whole product on one machine without any cloud account: a Microsoft 365
mailbox, a Google Workspace mailbox and (where Dovecot is installed) a password-based upstream
mailbox, each with mail in its INBOX, behind the gateway's local listeners.

The listeners get free ports unless asked for fixed ones (8025, the gateway's default admin port,
is also MailHog's and Mailpit's), and a temporary state directory (tokens, the key) is removed
when the demo stops, unless the user asked to keep it.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import yaml

from mailgw_sandbox import App, Sandbox
from mailgw_sandbox.upstream import Dovecot, missing_binaries

from .app import Gateway
from .config import Settings, load_settings
from .logs import get_logger
from .passwords import hash_password

log = get_logger(__name__)

MICROSOFT_ADDRESS = "crm@contoso.example"
GOOGLE_ADDRESS = "scanner@fabrikam.example"
GOOGLE_ALIAS = "info@fabrikam.example"
LISTENERS = ("smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "admin")
"""In the order ``first_port`` numbers them."""


@dataclass(frozen=True)
class DemoAccount:
    username: str
    password: str
    provider: str
    address: str


def _seed_messages(address: str) -> list[bytes]:
    """A small, realistic INBOX: plain text, Japanese, and one with an attachment."""
    now = datetime.now(UTC)
    plain = EmailMessage()
    plain["Subject"] = "Quarterly figures"
    plain.set_content("Hello,\n\nthe figures are attached to the next message.\n")
    japanese = EmailMessage()
    japanese["Subject"] = "お見積もりのご依頼"
    japanese.set_content("いつもお世話になっております。\nお見積もりをお願いいたします。\n")
    attached = EmailMessage()
    attached["Subject"] = "Figures (CSV)"
    attached.set_content("See attachment.\n")
    attached.add_attachment(
        b"quarter,revenue\nQ1,100\nQ2,120\n", maintype="text", subtype="csv", filename="q.csv"
    )
    messages = []
    for age, message in enumerate((plain, japanese, attached)):
        message["From"] = "Partner <partner@partner.example>"
        message["To"] = address
        message["Date"] = format_datetime(now - timedelta(hours=3 - age))
        message["Message-ID"] = make_msgid(domain="partner.example")
        messages.append(message.as_bytes())
    return messages


class Demo:
    """Everything the demo runs; :meth:`start` it, print :meth:`instructions`, then :meth:`stop`."""

    def __init__(
        self, state_dir: Path | None = None, *, keep: bool = False, first_port: int | None = None
    ) -> None:
        """``state_dir`` is kept; without it a temporary one is made and removed by :meth:`stop`
        unless ``keep``. ``first_port`` fixes the listeners' ports (see :data:`LISTENERS`);
        without it each gets a free port."""
        self.temporary = state_dir is None and not keep
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="gateway-demo-"))
        self.first_port = first_port
        self.sandbox = Sandbox(self.state_dir / "sandbox")
        self.dovecot: Dovecot | None = None
        self.accounts: list[DemoAccount] = []
        self.gateway: Gateway | None = None
        self.admin_password = _password()
        self.microsoft_app: App | None = None
        self.google_app: App | None = None

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.sandbox.context.consent = "screen"  # a person clicks Accept, as in the real clouds
        await self.sandbox.start()
        self.accounts = [
            DemoAccount("crm", _password(), "microsoft", MICROSOFT_ADDRESS),
            DemoAccount("scanner", _password(), "google", GOOGLE_ADDRESS),
        ]
        self._seed_sandbox()
        upstream = await asyncio.to_thread(self._start_dovecot)
        settings = self._write_config(upstream)
        self.gateway = Gateway(settings)
        await self.gateway.start()
        assert self.gateway.broker is not None
        # Registered as the README says: Entra's Mobile and desktop applications platform (a
        # public client), and a Google Web application client.
        callback = self.gateway.broker.redirect_uri()
        assert self.microsoft_app is not None and self.google_app is not None  # _write_config
        self.microsoft_app.public_client_redirect_uris = (callback,)
        self.google_app.redirect_uris = (callback,)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await self.sandbox.stop()
        if self.dovecot is not None:
            await asyncio.to_thread(self.dovecot.stop)
        if self.temporary:
            await asyncio.to_thread(shutil.rmtree, self.state_dir, True)

    @property
    def admin_url(self) -> str:
        """The admin page as printed: the same origin as the OAuth callback, so the session
        cookie set at sign-in comes back with the provider's redirect."""
        assert self.gateway is not None and self.gateway.broker is not None
        return f"{self.gateway.broker.admin_url()}/"

    def _seed_sandbox(self) -> None:
        sandbox = self.sandbox
        for user in (
            sandbox.add_user("microsoft", MICROSOFT_ADDRESS),
            sandbox.add_user("google", GOOGLE_ADDRESS, send_as=(GOOGLE_ALIAS,)),
        ):
            for raw in _seed_messages(user.address):
                sandbox.ops(user).seed_inbox(user, raw)

    def _start_dovecot(self) -> dict[str, Any] | None:
        """Start a private Dovecot for the upstream account, if this machine has one."""
        if missing_binaries(("dovecot", "doveadm")):
            log.info("demo.upstream_skipped", reason="dovecot is not installed")
            return None
        dovecot = Dovecot()
        dovecot.start()
        self.dovecot = dovecot
        mailbox_password = _password()
        dovecot.add_user("legacy", mailbox_password)
        for raw in _seed_messages("legacy@upstream.example"):
            dovecot.deliver("legacy", raw)
        self.accounts.append(
            DemoAccount("legacy", _password(), "upstream", "legacy@upstream.example")
        )
        server = {
            "host": "localhost",
            "username": "legacy",
            "password": mailbox_password,
            "ca_file": str(dovecot.ca_file),  # the private Dovecot's certificate has its own CA
        }
        return {"imap": {**server, "port": dovecot.imaps_port, "security": "tls"}}

    def _write_config(self, upstream: dict[str, Any] | None) -> Settings:
        sandbox = self.sandbox
        self.microsoft_app = sandbox.add_app(
            "microsoft", allow_public_client_flows=True, secret=False, name="mail gateway demo"
        )
        # The Google client is *not* written to the config: as with a real Workspace, the admin
        # enters its ID and secret on the admin page first.
        self.google_app = sandbox.add_app("google", name="mail gateway demo")
        accounts = []
        for account in self.accounts:
            entry: dict[str, Any] = {
                "username": account.username,
                "password_hash": hash_password(account.password),
                "provider": account.provider,
                "address": account.address,
            }
            if account.provider == "upstream":
                entry["upstream"] = upstream
            accounts.append(entry)
        config = {
            "state_dir": str(self.state_dir / "gateway"),
            "admin": {"password_hash": hash_password(self.admin_password)},
            "listeners": {
                f"{name}_port": self.first_port + offset if self.first_port else 0
                for offset, name in enumerate(LISTENERS)
            },
            "ca_bundle": str(sandbox.ca_file),
            "microsoft": {
                "client_id": self.microsoft_app.client_id,
                "tenant": sandbox.microsoft.tenant_id,
                "authority_host": sandbox.url,
                "graph_url": f"{sandbox.url}/v1.0",
            },
            "google": {
                "auth_uri": f"{sandbox.url}/o/oauth2/v2/auth",
                "token_uri": f"{sandbox.url}/token",
                "gmail_url": sandbox.url,
            },
            "accounts": accounts,
        }
        path = self.state_dir / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        path.chmod(0o600)
        return load_settings(path)

    def instructions(self) -> str:
        assert self.gateway is not None and self.google_app is not None  # set by start()
        ports = self.gateway.ports
        ca = self.gateway.settings.state_dir / "tls" / "ca.crt"
        lines = [
            "",
            "Mail gateway demo is running. Stop it with Ctrl-C.",
            "",
            f"  admin page     {self.admin_url}  (admin password {self.admin_password})",
            f"  SMTP           localhost:{ports.get('smtp')} (STARTTLS), "
            f"localhost:{ports.get('smtps')} (TLS)",
            f"  IMAP           localhost:{ports.get('imap')} (STARTTLS), "
            f"localhost:{ports.get('imaps')} (TLS)",
            f"  POP3           localhost:{ports.get('pop3')}, localhost:{ports.get('pop3s')} (TLS)",
            f"  TLS CA         {ca}",
            "",
            "  accounts (username / password -> mailbox):",
        ]
        for account in self.accounts:
            reads_only = "; reads only, sends nothing" if account.provider == "upstream" else ""
            lines.append(
                f"    {account.username:<8} / {account.password}  ->  "
                f"{account.address} ({account.provider}{reads_only})"
            )
        if self.dovecot is None:
            lines.append("    (no upstream account: Dovecot is not installed)")
        lines += [
            "",
            "  To connect the mailboxes: sign in to the admin page; enter this Google OAuth",
            '  client under "Google OAuth client", then press Connect for each account and',
            "  accept on the sandbox's consent page (your browser will not know the sandbox's",
            "  certificate authority: accept the warning, or import the CA file below).",
            f"    Google client ID      {self.google_app.client_id}",
            f"    Google client secret  {self.google_app.client_secret}",
            "",
            "  Then send as a legacy program would, for example:",
            f"    swaks --server localhost:{ports.get('smtp')} --tls --auth-user crm "
            f"--auth-password {self.accounts[0].password} \\",
            f"      --from {MICROSOFT_ADDRESS} --to someone@example.org",
            "  read the INBOX as a legacy program would:",
            f"    curl --cacert {ca} "
            f"-u crm:{self.accounts[0].password} 'imaps://localhost:{ports.get('imaps')}/INBOX;UID=1'",
            *self._upstream_example(ports, ca),
            "  and see what the sandbox cloud sent:",
            f"    curl -s --cacert {self.sandbox.ca_file} -H 'X-Sandbox-Control: 1' "
            f"{self.sandbox.url}/_sandbox/users/{MICROSOFT_ADDRESS}/sent",
            "",
            f"  sandbox clouds {self.sandbox.url}  (CA {self.sandbox.ca_file})",
            f"  config         {self.state_dir / 'config.yaml'}",
            f"  state          {self.state_dir}  "
            + ("(removed on exit; --keep keeps it)" if self.temporary else "(kept on exit)"),
            "",
        ]
        return "\n".join(lines)

    def _upstream_example(self, ports: dict[str, int], ca: Path) -> list[str]:
        """The upstream account needs no consent: its INBOX can be read at once. It has no
        upstream.smtp server (the demo starts no SMTP server), so the gateway refuses its mail
        at MAIL FROM; the text says so rather than letting a user find out by trying."""
        legacy = [a for a in self.accounts if a.provider == "upstream"]
        if not legacy:
            return []
        return [
            "  (the upstream account needs no consent; its INBOX comes from a private Dovecot:",
            f"    curl --cacert {ca} -u legacy:{legacy[0].password} "
            f"'pop3s://localhost:{ports.get('pop3s')}/1'",
            "   it can only read mail: it has no upstream.smtp server, so mail it submits is",
            "   refused at MAIL FROM with 550 5.7.1)",
        ]


def _password() -> str:
    return secrets.token_urlsafe(9)


async def run_demo(
    stop: asyncio.Event,
    state_dir: Path | None = None,
    *,
    keep: bool = False,
    first_port: int | None = None,
) -> None:
    demo = Demo(state_dir, keep=keep, first_port=first_port)
    try:
        await demo.start()
        print(demo.instructions(), flush=True)
        await stop.wait()
    finally:
        await demo.stop()
