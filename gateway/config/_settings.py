"""The gateway's settings: the schema of config.yaml, as frozen dataclasses.

Every field's fix hint is what ``gateway check-config`` tells the admin when the value is wrong,
so hints are written for the person editing the file, not for developers.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .. import passwords
from ._schema import Secret, SecretUnavailable, field_info

Provider = Literal["microsoft", "google", "upstream"]
Security = Literal["none", "starttls", "tls"]

_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+\.[^@\s<>()\[\],;:\".]+$")
_USERNAME = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def in_range(low: int, high: int) -> Callable[[int], str | None]:
    """A check that a whole number lies within ``low``-``high``, inclusive."""

    def check(value: int) -> str | None:
        return None if low <= value <= high else f"{value} is outside {low}-{high}"

    return check


def check_port(port: int) -> str | None:
    if not 0 <= port <= 65535:
        return f"port {port} is outside 1-65535"
    return None


def check_host(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    return None if _HOSTNAME.match(host) else f"{host!r} is not an IP address or host name"


def check_https_url(url: str) -> str | None:
    if not re.match(r"^https://[^/\s]+(/\S*)?$", url):
        return f"{url!r} is not an https:// URL (tokens and mail must not travel in clear)"
    return None


def check_address(address: str) -> str | None:
    return None if _ADDRESS.match(address) else f"{address!r} is not an email address"


def check_username(name: str) -> str | None:
    if _USERNAME.match(name):
        return None
    return f"{name!r} may contain only letters, digits and . _ @ + - (at most 128)"


def check_client_id(client_id: str) -> str | None:
    if _GUID.match(client_id):
        return None
    return f"{client_id!r} is not an application (client) ID, which looks like 1b2c3d4e-..."


def check_tenant(tenant: str) -> str | None:
    if tenant in ("common", "organizations", "consumers") or _GUID.match(tenant):
        return None
    return None if _HOSTNAME.match(tenant) and "." in tenant else f"{tenant!r} is not a tenant"


def check_password_hash(text: str) -> str | None:
    try:
        passwords.parse_hash(text)
    except passwords.MalformedHash as error:
        return f"malformed password hash: {error}"
    return None


def check_readable_file(path: Path) -> str | None:
    return None if os.access(path, os.R_OK) and path.is_file() else f"cannot read {path}"


def check_state_dir(path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def check_networks(entries: tuple[str, ...]) -> str | None:
    """Each entry an IP address or a network in CIDR notation without host bits."""
    for entry in entries:
        try:
            ipaddress.ip_network(entry)
        except ValueError as error:
            return f"{entry!r} is not an IP address or network ({error})"
    return None


PORT_FIX = "use a free TCP port number (1-65535), or null to turn this listener off"


def _port(default: int) -> int | None:
    return field_info(default, fix=PORT_FIX, check=check_port)


@dataclass(frozen=True)
class ListenerSettings:
    host: str = field_info(
        "127.0.0.1",
        fix="use 127.0.0.1 (this machine only) or the address of one local interface",
        check=check_host,
    )
    smtp_port: int | None = _port(2525)
    smtps_port: int | None = _port(2465)
    imap_port: int | None = _port(2143)
    imaps_port: int | None = _port(2993)
    pop3_port: int | None = _port(2110)
    pop3s_port: int | None = _port(2995)
    admin_port: int | None = _port(8025)
    preauth_timeout_seconds: int = field_info(
        30,
        fix="seconds a client has from connecting to logging in before it is disconnected "
        "(1-600); the deadline is total, sending slowly does not extend it",
        check=in_range(1, 600),
    )
    max_unauthenticated_per_address: int = field_info(
        20,
        fix="connections not yet logged in that one client address may hold per protocol "
        "(SMTP, IMAP, POP3, admin page) at once (1-10000)",
        check=in_range(1, 10000),
    )
    proxy_protocol_from: tuple[str, ...] = field_info(
        (),
        fix="a list of the addresses or networks of your TCP load balancers, e.g. [127.0.0.1, "
        "10.0.0.0/8] (a network without host bits: 10.0.0.0/8, not 10.0.0.1/8); connections "
        "from them to the SMTP, IMAP and POP3 listeners must start with a PROXY protocol "
        "header (HAProxy: send-proxy-v2), others must not. Leave it empty without one",
        check=check_networks,
    )

    def ports(self) -> dict[str, int]:
        """Enabled listeners by name (``smtp``, ``imaps``...), with their configured port."""
        named = {
            "smtp": self.smtp_port,
            "smtps": self.smtps_port,
            "imap": self.imap_port,
            "imaps": self.imaps_port,
            "pop3": self.pop3_port,
            "pop3s": self.pop3s_port,
            "admin": self.admin_port,
        }
        return {name: port for name, port in named.items() if port is not None}


TLS_FIX = "give the path of a PEM file, or leave both cert and key out to use a generated one"


@dataclass(frozen=True)
class TlsSettings:
    cert: Path | None = field_info(None, fix=TLS_FIX)
    key: Path | None = field_info(None, fix=TLS_FIX)


@dataclass(frozen=True)
class MicrosoftSettings:
    client_id: str | None = field_info(
        None,
        fix="copy the Application (client) ID of your app registration in Microsoft Entra",
        check=check_client_id,
    )
    client_secret: Secret | None = field_info(None)
    client_certificate: Path | None = field_info(
        None,
        fix="a PEM file holding the app's certificate and its unencrypted private key (the "
        "certificate uploaded to the app registration), instead of a client secret",
        check=check_readable_file,
    )
    tenant: str = field_info(
        "organizations",
        fix="use your tenant ID or domain (contoso.onmicrosoft.com), or organizations",
        check=check_tenant,
    )
    authority_host: str = field_info(
        "https://login.microsoftonline.com", fix="an https:// URL", check=check_https_url
    )
    graph_url: str = field_info(
        "https://graph.microsoft.com/v1.0", fix="an https:// URL", check=check_https_url
    )
    app_only: bool = field_info(
        False,
        fix="true to use application permissions (client credentials) for every mailbox of the "
        "tenant; needs client_secret or client_certificate, and an admin's consent in Entra",
    )


@dataclass(frozen=True)
class GoogleSettings:
    client_id: str | None = field_info(
        None,
        fix="copy the OAuth client ID from the Google Cloud console (…apps.googleusercontent.com)",
    )
    client_secret: Secret | None = field_info(None)
    auth_uri: str = field_info(
        "https://accounts.google.com/o/oauth2/v2/auth", fix="an https:// URL", check=check_https_url
    )
    token_uri: str = field_info(
        "https://oauth2.googleapis.com/token", fix="an https:// URL", check=check_https_url
    )
    gmail_url: str = field_info(
        "https://gmail.googleapis.com", fix="an https:// URL", check=check_https_url
    )
    service_account_file: Path | None = field_info(
        None,
        fix="the JSON key file of a service account with domain-wide delegation, or null",
        check=check_readable_file,
    )


_DEFAULT_PORTS = {
    ("smtp", "tls"): 465,
    ("smtp", "starttls"): 587,
    ("smtp", "none"): 25,
    ("imap", "tls"): 993,
    ("imap", "starttls"): 143,
    ("imap", "none"): 143,
    ("pop3", "tls"): 995,
    ("pop3", "starttls"): 110,
    ("pop3", "none"): 110,
}


@dataclass(frozen=True)
class UpstreamServer:
    """A server of a provider that still accepts passwords (SMTP, IMAP or POP3)."""

    host: str = field_info(fix="the server's host name, e.g. mail.example.org", check=check_host)
    port: int | None = field_info(
        None, fix="the server's port, or leave it out for the standard one", check=check_port
    )
    security: Security = field_info(
        "tls", fix="tls (implicit TLS), starttls, or none (only on a trusted network)"
    )
    username: str | None = field_info(None, fix="the login name at that server")
    password: Secret | None = field_info(None)
    ca_file: Path | None = field_info(
        None,
        fix="the path of a PEM file with the CA certificate(s) of this server, for a server "
        "whose certificate is not from a public CA",
        check=check_readable_file,
    )

    def port_for(self, protocol: Literal["smtp", "imap", "pop3"]) -> int:
        return self.port or _DEFAULT_PORTS[(protocol, self.security)]


@dataclass(frozen=True)
class UpstreamSmtpServer(UpstreamServer):
    """The upstream SMTP server, and how many logged-in sessions the gateway keeps open to it.

    Sessions carry many messages each, so a burst costs one TLS handshake and AUTH per session,
    not per message. The spool sends this many of the account's messages at once (one per
    session). At most 16: each session is a worker thread and one connection to the server, and
    past the server's own concurrency (Postfix's default smtpd process limit is 100, shared by
    every client) more sessions only queue there.
    """

    max_sessions: int = field_info(
        4,
        fix="how many sessions may send this account's mail at once (1-16)",
        check=in_range(1, 16),
    )
    idle_seconds: int = field_info(
        60,
        fix="seconds an unused session stays open before the gateway closes it (1-3600)",
        check=in_range(1, 3600),
    )


@dataclass(frozen=True)
class UpstreamSettings:
    smtp: UpstreamSmtpServer | None = None
    imap: UpstreamServer | None = None
    pop3: UpstreamServer | None = None


@dataclass(frozen=True)
class SendingSettings:
    """How one account's outgoing mail is handled."""

    allowed_from: tuple[str, ...] = field_info(
        (),
        fix="a list of addresses this account may use as From/sender besides its mailbox "
        "address and the provider's send-as aliases",
    )
    save_to_sent: bool = field_info(
        True,
        fix="true to keep a copy in the sent mail; false to leave none (Microsoft only: Gmail "
        "always keeps one, and the gateway files none for an upstream SMTP server either way)",
    )
    pace_per_minute: int | None = field_info(
        None,
        fix="at most this many messages per minute to the provider, or null for no pacing",
        check=in_range(1, 10000),
    )


OnDelete = Literal["keep", "archive", "trash"]


@dataclass(frozen=True)
class AccountReadingSettings:
    """What this account's IMAP/POP3 clients may change at the provider (nothing by default)."""

    mirror_flags: bool = field_info(
        False,
        fix="true to copy \\Seen and \\Flagged set by IMAP clients to the provider (needs "
        "Mail.ReadWrite / gmail.modify: reconnect the account after turning it on), false to "
        "keep flags in the gateway",
    )
    on_delete: OnDelete = field_info(
        "keep",
        fix="what an IMAP EXPUNGE or POP3 DELE does at the provider: keep (nothing; the "
        "message is only hidden from this account's clients), archive, or trash (both need "
        "Mail.ReadWrite / gmail.modify); nothing is ever deleted for good",
    )

    @property
    def writes(self) -> bool:
        """Whether the provider is changed at all (so the write scope is needed)."""
        return self.mirror_flags or self.on_delete != "keep"


@dataclass(frozen=True)
class AccountSettings:
    """A local login of a legacy program, and the mailbox it stands for."""

    username: str = field_info(
        fix="the login name the legacy program will use, e.g. crm", check=check_username
    )
    password_hash: str = field_info(
        fix="run `gateway hash-password` and paste its output (it starts with $scrypt$)",
        check=check_password_hash,
    )
    provider: Provider = field_info(fix="microsoft, google or upstream")
    address: str = field_info(
        fix="the mailbox's email address, e.g. sales@example.com", check=check_address
    )
    upstream: UpstreamSettings | None = field_info(
        None, fix="describe the smtp and imap (or pop3) servers of this mailbox"
    )
    sending: SendingSettings = field_info(SendingSettings())
    reading: AccountReadingSettings = field_info(AccountReadingSettings())

    @property
    def can_send(self) -> bool:
        """Whether the gateway has a way to send this account's mail: the API providers always;
        an upstream account only through its upstream.smtp server (without one it only reads,
        which is legitimate: a program that fetches mail and never sends)."""
        return self.provider != "upstream" or (
            self.upstream is not None and self.upstream.smtp is not None
        )


@dataclass(frozen=True)
class AdminSettings:
    """The local admin web page."""

    password_hash: str | None = field_info(
        None,
        fix="run `gateway hash-password` and paste its output; without it nobody can sign in",
        check=check_password_hash,
    )
    public_url: str | None = field_info(
        None,
        fix="the address browsers use for this page, e.g. http://localhost:8025 (the default) or "
        "a reverse proxy's https://host; sign-in redirects, consent links and the forms' "
        "origin check use it",
        check=lambda url: (
            None
            if re.match(r"^https?://[^/\s]+$", url)
            else (f"{url!r} must be http(s)://host[:port] without a path")
        ),
    )
    notify_webhook: str | None = field_info(
        None,
        fix="an http(s):// URL that receives a JSON POST when a mailbox needs re-consent, or null",
        check=lambda url: None if re.match(r"^https?://\S+$", url) else f"{url!r} is not a URL",
    )
    session_minutes: int = field_info(
        60,
        fix="minutes of inactivity before the admin must sign in again (5-1440)",
        check=in_range(5, 1440),
    )


PlaintextAuth = Literal["never", "loopback", "always"]


@dataclass(frozen=True)
class SmtpSettings:
    """The SMTP front's policy."""

    plaintext_auth: PlaintextAuth = field_info(
        "loopback",
        fix="never (AUTH only after STARTTLS or on SMTPS), loopback (also in clear text from "
        "this machine), or always (also in clear text from the network: not recommended)",
    )
    max_message_mb: int = field_info(
        35,
        fix="the largest message in MB (1-150; Microsoft 365 and Gmail default to 35)",
        check=in_range(1, 150),
    )
    max_recipients: int = field_info(
        100,
        fix="recipients per message (1-1000)",
        check=in_range(1, 1000),
    )
    max_connections: int = field_info(
        100,
        fix="simultaneous logged-in SMTP sessions (1-10000)",
        check=in_range(1, 10000),
    )
    deliver_inline: bool = field_info(
        False,
        fix="true to try delivery before answering DATA, so a permanent refusal reaches the "
        "program as 5xx (slower answers); false to queue and answer at once",
    )


@dataclass(frozen=True)
class ReadingSettings:
    """The IMAP and POP3 fronts' policy."""

    plaintext_auth: PlaintextAuth = field_info(
        "loopback",
        fix="never (LOGIN/USER only after STARTTLS/STLS or on IMAPS/POP3S), loopback (also in "
        "clear text from this machine), or always (also in clear text from the network: not "
        "recommended)",
    )
    poll_seconds: int = field_info(
        30,
        fix="seconds between two checks of the provider while IMAP clients are connected, so "
        "IDLE reports new mail within this time (1-3600)",
        check=in_range(1, 3600),
    )
    cache_mb: int = field_info(
        64,
        fix="MB of message bodies kept in memory per mailbox, so a client reading a message "
        "twice downloads it once (1-4096)",
        check=in_range(1, 4096),
    )


@dataclass(frozen=True)
class SpoolSettings:
    """Retries of the outbound queue."""

    retry_hours: int = field_info(
        72,
        fix="hours to keep retrying a temporary failure before it becomes a dead letter",
        check=in_range(1, 720),
    )
    first_backoff_seconds: int = field_info(
        30,
        fix="the wait before the first retry, in seconds (1-3600); it doubles each time",
        check=in_range(1, 3600),
    )
    max_backoff_minutes: int = field_info(
        60,
        fix="the longest wait between two attempts, in minutes (1-1440)",
        check=in_range(1, 1440),
    )
    hold_for_intake_ms: int = field_info(
        1000,
        fix="how long, in milliseconds (0-10000), the worker starts no new delivery while "
        "messages are arriving, so that their 250s are not slowed by sends; 0: sends start at "
        "once, for the highest delivered rate in a long burst",
        check=in_range(0, 10000),
    )
    lease_seconds: int = field_info(
        60,
        fix="how long an instance's claim on a message lasts unless renewed, in seconds "
        "(5-3600); only with store.url, where another instance takes it over after that",
        check=in_range(5, 3600),
    )


def check_store_url(url: Secret) -> str | None:
    """Only PostgreSQL URLs; an unresolved ``{env:}`` is reported by the loader itself."""
    try:
        value = url.value
    except SecretUnavailable:
        return None
    if value.startswith(("postgresql://", "postgres://")):
        return None
    return f"it is not a postgresql:// URL (from {url.source})"


@dataclass(frozen=True)
class StoreSettings:
    """Where the state lives. Without ``url``: SQLite in ``state_dir``, one instance. With a
    PostgreSQL URL: the state (tokens, spool, INBOX views, sign-ins, login throttle) is shared
    by every instance that names the same database (README "Several instances")."""

    url: Secret | None = field_info(
        None,
        fix="postgresql://USER:PASSWORD@HOST:5432/DATABASE, the whole URL best given as "
        "{env: GATEWAY_STORE_URL}; leave the store section out to keep SQLite",
        check=check_store_url,
    )
    pool_size: int = field_info(
        8, fix="database connections each instance keeps open (2-100)", check=in_range(2, 100)
    )


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["debug", "info", "warning", "error"] = field_info(
        "info", fix="debug, info, warning or error"
    )
    format: Literal["text", "json"] = field_info("text", fix="text (key=value) or json")


@dataclass(frozen=True)
class Settings:
    """Everything ``gateway run`` needs, validated. ``source`` is the file it came from."""

    state_dir: Path = field_info(
        fix="a directory the gateway may write to, e.g. /var/lib/gateway (relative paths are "
        "relative to the config file) that the gateway's user can write",
        check=check_state_dir,
    )
    hostname: str = field_info(
        "localhost",
        fix="the name clients use to reach the gateway (greetings and the generated certificate)",
        check=check_host,
    )
    listeners: ListenerSettings = field_info(ListenerSettings())
    tls: TlsSettings = field_info(TlsSettings())
    microsoft: MicrosoftSettings = field_info(MicrosoftSettings())
    google: GoogleSettings = field_info(GoogleSettings())
    ca_bundle: Path | None = field_info(
        None, fix="the path of a PEM file of extra CA certificates for outbound HTTPS"
    )
    smtp: SmtpSettings = field_info(SmtpSettings())
    reading: ReadingSettings = field_info(ReadingSettings())
    spool: SpoolSettings = field_info(SpoolSettings())
    store: StoreSettings = field_info(StoreSettings())
    admin: AdminSettings = field_info(AdminSettings())
    logging: LoggingSettings = field_info(LoggingSettings())
    accounts: tuple[AccountSettings, ...] = field_info(())
    source: Path | None = field(default=None, metadata={"internal": True})
