"""Which OAuth scopes each account needs, and why: least privilege that follows the features.

The admin page shows this table, so every scope we ask for comes with the sentence that
justifies it. Every account sends and reads its INBOX; Microsoft messages over 3 MB must go
through a draft and upload sessions, which needs Mail.ReadWrite (Mail.Send alone cannot create
drafts). Google accounts get gmail.readonly, or gmail.modify when the account's reading policy
writes to the mailbox (mirrored flags, archive or trash).
"""

from __future__ import annotations

from dataclasses import dataclass

GRAPH = "https://graph.microsoft.com/"
GMAIL = "https://www.googleapis.com/auth/"


@dataclass(frozen=True)
class ScopeNeed:
    scope: str  # as the provider spells it on the wire
    reason: str  # for the admin page


def microsoft_delegated() -> tuple[ScopeNeed, ...]:
    """Mail.ReadWrite, not Mail.Read: messages over 3 MB, and every message of an account with
    ``save_to_sent: false``, go through drafts (Mail.Send alone cannot create drafts), so every
    account needs it; it also covers the opt-in reading policies (mirrored flags, archive/trash).
    """
    return (
        ScopeNeed(f"{GRAPH}Mail.Send", "send the mail your programs submit by SMTP"),
        ScopeNeed(
            f"{GRAPH}Mail.ReadWrite",
            "read the INBOX for IMAP/POP3, send through drafts (messages over 3 MB, or without a "
            "Sent Items copy), and copy flags or archive/trash if this account's reading policy "
            "says so",
        ),
    )


MICROSOFT_APP_ONLY = (
    ScopeNeed(f"{GRAPH}.default", "the application permissions an administrator granted"),
)

GOOGLE_IDENTITY = (
    ScopeNeed("openid", "confirm which Google account consented"),
    ScopeNeed("email", "confirm which Google account consented"),
)


def google_user(writes: bool = False) -> tuple[ScopeNeed, ...]:
    """``writes``: the account's reading policy changes the mailbox (mirrored flags, archive or
    trash), which needs gmail.modify instead of gmail.readonly."""
    read = (
        ScopeNeed(
            f"{GMAIL}gmail.modify",
            "read the INBOX for IMAP/POP3, check From addresses against your send-as list, and "
            "copy flags or archive/trash as this account's reading policy says",
        )
        if writes
        else ScopeNeed(
            f"{GMAIL}gmail.readonly",
            "read the INBOX for IMAP/POP3, and check From addresses against your send-as list",
        )
    )
    return (
        *GOOGLE_IDENTITY,
        ScopeNeed(f"{GMAIL}gmail.send", "send the mail your programs submit by SMTP"),
        read,
    )


def google_service_account(writes: bool = False) -> tuple[ScopeNeed, ...]:
    """Domain-wide delegation: no identity scopes (the subject is named by the admin)."""
    return google_user(writes)[len(GOOGLE_IDENTITY) :]


def short(scope: str) -> str:
    """``https://graph.microsoft.com/Mail.Send`` → ``Mail.Send`` (for display and comparison)."""
    for prefix in (GRAPH, GMAIL):
        if scope.startswith(prefix):
            return scope[len(prefix) :]
    return scope


# Google answers a consent for the identity scopes ``email`` / ``profile`` with their URL
# forms (the token response's ``scope``), so both spellings name one scope (provider-apis.md,
# "Google scope aliases").
_ALIASES = {"userinfo.email": "email", "userinfo.profile": "profile"}
# A wider scope covers narrower ones: Mail.ReadWrite covers Mail.Read, gmail.modify covers
# gmail.readonly and gmail.send, full Gmail access covers them all.
_IMPLIED = {
    "mail.readwrite": {"mail.read"},
    "gmail.modify": {"gmail.readonly", "gmail.send"},
    "https://mail.google.com/": {"gmail.readonly", "gmail.send", "gmail.modify"},
}


def _canonical(scope: str) -> str:
    name = short(scope)
    return _ALIASES.get(name, name).lower()


def missing(needed: tuple[ScopeNeed, ...], granted: tuple[str, ...]) -> list[ScopeNeed]:
    """Needs not covered by the granted scopes, whatever spelling the provider answered."""
    have = {_canonical(s) for s in granted}
    for scope in list(have):
        have |= _IMPLIED.get(scope, set())
    return [need for need in needed if _canonical(need.scope) not in have]
