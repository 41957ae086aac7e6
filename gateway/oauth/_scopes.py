"""Which OAuth scopes each account needs, and why: least privilege that follows the features.

The admin page shows this table, so every scope we ask for comes with the sentence that
justifies it. Today every account sends and reads its INBOX; Microsoft messages over 3 MB must
go through a draft and upload sessions, which needs Mail.ReadWrite (Mail.Send alone cannot
create drafts), so that scope is requested unless large messages are turned off.
"""

from __future__ import annotations

from dataclasses import dataclass

GRAPH = "https://graph.microsoft.com/"
GMAIL = "https://www.googleapis.com/auth/"


@dataclass(frozen=True)
class ScopeNeed:
    scope: str  # as the provider spells it on the wire
    reason: str  # for the admin page


def microsoft_delegated(large_messages: bool = True) -> tuple[ScopeNeed, ...]:
    needs = [ScopeNeed(f"{GRAPH}Mail.Send", "send the mail your programs submit by SMTP")]
    if large_messages:
        needs.append(
            ScopeNeed(
                f"{GRAPH}Mail.ReadWrite",
                "read the INBOX for IMAP/POP3, and send messages over 3 MB (drafts + upload)",
            )
        )
    else:
        needs.append(ScopeNeed(f"{GRAPH}Mail.Read", "read the INBOX for IMAP/POP3"))
    return tuple(needs)


MICROSOFT_APP_ONLY = (
    ScopeNeed(f"{GRAPH}.default", "the application permissions an administrator granted"),
)

GOOGLE_IDENTITY = (
    ScopeNeed("openid", "confirm which Google account consented"),
    ScopeNeed("email", "confirm which Google account consented"),
)


def google_user() -> tuple[ScopeNeed, ...]:
    return (
        *GOOGLE_IDENTITY,
        ScopeNeed(f"{GMAIL}gmail.send", "send the mail your programs submit by SMTP"),
        ScopeNeed(
            f"{GMAIL}gmail.readonly",
            "read the INBOX for IMAP/POP3, and check From addresses against your send-as list",
        ),
    )


def google_service_account() -> tuple[ScopeNeed, ...]:
    """Domain-wide delegation: no identity scopes (the subject is named by the admin)."""
    return google_user()[len(GOOGLE_IDENTITY) :]


def short(scope: str) -> str:
    """``https://graph.microsoft.com/Mail.Send`` → ``Mail.Send`` (for display and comparison)."""
    for prefix in (GRAPH, GMAIL):
        if scope.startswith(prefix):
            return scope[len(prefix) :]
    return scope


def missing(needed: tuple[ScopeNeed, ...], granted: tuple[str, ...]) -> list[ScopeNeed]:
    """Needs not covered by the granted scopes (Mail.ReadWrite covers Mail.Read, etc.)."""
    have = {short(s).lower() for s in granted}
    implied = {
        "mail.readwrite": {"mail.read"},
        "gmail.modify": {"gmail.readonly", "gmail.send"},
        "https://mail.google.com/": {"gmail.readonly", "gmail.send", "gmail.modify"},
    }
    for scope in list(have):
        have |= implied.get(scope, set())
    return [need for need in needed if short(need.scope).lower() not in have]
