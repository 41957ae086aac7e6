"""Checks that look across keys or at the file system, after the per-field checks passed.

Each check reads the built settings and reports through the validator, so a port collision, an
unreadable certificate and a malformed password hash all show up in the same list.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from .. import tls
from ._schema import Validator
from ._settings import AccountSettings, Settings


def check_listeners(settings: Settings, v: Validator) -> None:
    seen: dict[int, str] = {}
    if settings.listeners is None:
        return
    for name, port in settings.listeners.ports().items():
        if port == 0:  # "any free port": used by tests, never collides
            continue
        if port in seen:
            v.report(
                ("listeners", f"{name}_port"),
                f"port {port} is already used by listeners.{seen[port]}_port",
                "give every listener its own port, or null to turn one off",
            )
        seen.setdefault(port, name)


def check_tls(settings: Settings, v: Validator) -> None:
    if settings.tls is None:
        return
    cert, key = settings.tls.cert, settings.tls.key
    if (cert is None) != (key is None):
        missing = "key" if key is None else "cert"
        fix = "give both cert and key, or neither"
        v.report(("tls", missing), f"tls.{missing} is missing", fix)
        return
    if cert is not None and key is not None:
        problem = tls.check_pair(cert, key)
        if problem:
            v.report(("tls",), problem, "point cert and key at a readable PEM pair that matches")


def check_ca_bundle(settings: Settings, v: Validator) -> None:
    if settings.ca_bundle is None:
        return
    try:
        ssl.create_default_context().load_verify_locations(cafile=settings.ca_bundle)
    except (OSError, ssl.SSLError) as error:
        v.report(
            ("ca_bundle",),
            f"cannot load CA certificates from {settings.ca_bundle}: {error}",
            "point ca_bundle at a readable PEM file of CA certificates",
        )


def check_accounts(settings: Settings, v: Validator) -> None:
    seen: set[str] = set()
    for index, account in enumerate(settings.accounts or ()):
        path = ("accounts", index)
        if account is None:
            continue
        folded = (account.username or "").casefold()
        if folded and folded in seen:
            v.report(
                (*path, "username"),
                f"username {account.username!r} is used by another account",
                "give each account its own username",
            )
        seen.add(folded)
        _check_provider(settings, account, path, v)


def _check_provider(
    settings: Settings, account: AccountSettings, path: tuple, v: Validator
) -> None:
    microsoft = settings.microsoft
    if account.provider == "microsoft" and microsoft is not None and microsoft.client_id is None:
        v.report(
            ("microsoft", "client_id"),
            f"account {account.username!r} uses Microsoft, but microsoft.client_id is not set",
            "register an app in Microsoft Entra and copy its Application (client) ID here",
        )
    if account.provider is None:
        return
    if account.provider == "google" and not account.sending.save_to_sent:
        v.report(
            (*path, "sending", "save_to_sent"),
            "Gmail files every message sent through its API in Sent Mail, and removing that "
            "copy needs a scope the gateway does not ask for (deleting: https://mail.google.com/, "
            "full access to the mailbox; trashing: gmail.modify, and the copy stays in Trash "
            "for 30 days), so save_to_sent: false cannot be honoured for Google accounts",
            "remove save_to_sent from this account (Google accounts always keep a Sent copy)",
        )
    if account.provider != "upstream":
        if account.upstream is not None:
            v.report(
                (*path, "upstream"),
                f"upstream servers are only used with provider upstream, not {account.provider}",
                "remove the upstream section, or set provider: upstream",
            )
        return
    upstream = account.upstream
    if upstream is None or not (upstream.smtp or upstream.imap or upstream.pop3):
        v.report(
            (*path, "upstream"),
            "provider upstream needs at least one upstream server",
            "add upstream.smtp and upstream.imap (or upstream.pop3)",
        )
    elif upstream.imap and upstream.pop3:
        v.report(
            (*path, "upstream"),
            "both upstream.imap and upstream.pop3 are set; the INBOX must come from one of them",
            "keep imap (preferred) or pop3",
        )
    elif upstream.pop3 and account.reading is not None and account.reading.writes:
        v.report(
            (*path, "reading"),
            "a POP3 upstream has no flags or folders, so nothing can be mirrored or archived "
            "there (and the gateway never deletes mail for good)",
            "set mirror_flags: false and on_delete: keep, or read the INBOX over upstream.imap",
        )


def check_app_only(settings: Settings, v: Validator) -> None:
    microsoft = settings.microsoft
    if microsoft is None or not microsoft.app_only:
        return
    if microsoft.client_secret is None and microsoft.client_certificate is None:
        v.report(
            ("microsoft", "app_only"),
            "app-only access needs microsoft.client_secret or microsoft.client_certificate",
            "add the app's client secret or certificate, or set app_only: false to let each "
            "mailbox consent",
        )


# Hashes published in config.example.yaml (every one is of the password "change-me-now"). A copy
# of the example that keeps one would let anyone who read the example log in.
PUBLISHED_PASSWORD_HASHES = frozenset(
    {"$scrypt$ln=15,r=8,p=1$FD41NgOlrtNuR4Kfzqy5Tg$0Carnr2QEYijPMFQmqRcT0V1tLTpuUM1tFMhcayBYTQ"}
)
_PUBLISHED_FIX = (
    "run `gateway hash-password`, type a password of your own, and paste its output here"
)


def check_published_hashes(settings: Settings, v: Validator) -> None:
    """Refuse the example's hashes when serving; the operations commands may read such a file."""
    if not v.serving:
        return
    hashed: list[tuple[tuple, str | None]] = [
        (("admin", "password_hash"), settings.admin.password_hash if settings.admin else None)
    ]
    for index, account in enumerate(settings.accounts or ()):
        if account is not None:
            hashed.append((("accounts", index, "password_hash"), account.password_hash))
    for path, value in hashed:
        if value in PUBLISHED_PASSWORD_HASHES:
            v.report(
                path,
                'this is the example\'s published hash of the password "change-me-now" '
                "(config.example.yaml): anyone who has read the example could log in",
                _PUBLISHED_FIX,
            )


def notes(settings: Settings) -> list[str]:
    """Settings that are valid but change what the gateway does in a way the admin should know
    (``check-config`` prints them after OK)."""
    found = []
    for account in settings.accounts:
        if not account.can_send:
            found.append(
                f"account {account.username!r} can only read mail: it has no upstream.smtp "
                "server, so the gateway refuses its SMTP submissions at MAIL FROM (550 5.7.1); "
                "add upstream.smtp if its programs also send"
            )
    return found


CHECKS: tuple[Callable[[Settings, Validator], None], ...] = (
    check_listeners,
    check_tls,
    check_ca_bundle,
    check_accounts,
    check_app_only,
    check_published_hashes,
)
