"""The backends. Each implements :class:`Sender` and/or :class:`MailboxSource`; failures are
classified here, once, as :mod:`gateway.delivery`'s Temporary, Permanent or ReauthRequired.

The two factories: :func:`senders` builds one sender per provider kind for the spool, and
:func:`mailbox_source` the INBOX source of one account for its mailbox view. The httpx client
comes from :func:`gateway.outbound.async_client` and is owned (and closed) by the caller.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from ..config import AccountSettings, Settings
from ._base import Sender, TokenSource
from ._inbox import (
    FLAGGED,
    SEEN,
    Batch,
    Changes,
    CursorExpired,
    MailboxSource,
    NotSupported,
    RemoteMessage,
    Removal,
    Snapshot,
    WarmUpQuota,
)
from .gmail import GmailSender
from .gmail_inbox import GmailSource
from .graph import GraphSender
from .graph_inbox import GraphSource
from .imap_inbox import UpstreamImapSource
from .pop3_inbox import UpstreamPop3Source
from .smtp import UpstreamSender


def senders(
    settings: Settings, client: httpx.AsyncClient, tokens: TokenSource, system_ca_file: Path
) -> dict[str, Sender]:
    """Senders by ``accounts[].provider`` value."""
    return {
        "microsoft": GraphSender(client, tokens, settings.microsoft.graph_url),
        "google": GmailSender(client, tokens, settings.google.gmail_url),
        "upstream": UpstreamSender(system_ca_file),
    }


def mailbox_source(
    settings: Settings,
    account: AccountSettings,
    client: httpx.AsyncClient,
    tokens: TokenSource,
    system_ca_file: Path,
) -> MailboxSource | None:
    """Where ``account``'s INBOX is read: its API mailbox, or its upstream IMAP server (else
    POP3 server); None for an upstream account with neither."""
    if account.provider == "microsoft":
        graph = settings.microsoft.graph_url
        return GraphSource(client, tokens, graph, account.username, account.address)
    if account.provider == "google":
        return GmailSource(client, tokens, settings.google.gmail_url, account.username)
    upstream = account.upstream
    if upstream is None:
        return None
    if upstream.imap is not None:
        return UpstreamImapSource(upstream.imap, system_ca_file)
    if upstream.pop3 is not None:
        return UpstreamPop3Source(upstream.pop3, system_ca_file)
    return None


__all__ = [
    "FLAGGED",
    "SEEN",
    "Batch",
    "Changes",
    "CursorExpired",
    "GmailSender",
    "GmailSource",
    "GraphSender",
    "GraphSource",
    "MailboxSource",
    "NotSupported",
    "RemoteMessage",
    "Removal",
    "Sender",
    "Snapshot",
    "TokenSource",
    "UpstreamImapSource",
    "UpstreamPop3Source",
    "UpstreamSender",
    "WarmUpQuota",
    "mailbox_source",
    "senders",
]
