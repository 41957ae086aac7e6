"""The backends. Each implements :class:`Sender` and/or :class:`MailboxSource`; failures are
classified here, once.

``senders(...)`` builds one sender per provider kind for the spool; the httpx client comes from
:func:`gateway.outbound.async_client` and is owned (and closed) by the caller.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from ..config import Settings
from ._base import DeliveryResult, Sender, TokenSource
from ._errors import DeliveryError, Permanent, ReauthRequired, Temporary
from ._inbox import (
    SEEN,
    Changes,
    CursorExpired,
    MailboxSource,
    NotSupported,
    RemoteMessage,
    Removal,
    Snapshot,
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


__all__ = [
    "SEEN",
    "Changes",
    "CursorExpired",
    "DeliveryError",
    "DeliveryResult",
    "GmailSender",
    "GmailSource",
    "GraphSender",
    "GraphSource",
    "MailboxSource",
    "NotSupported",
    "Permanent",
    "ReauthRequired",
    "RemoteMessage",
    "Removal",
    "Sender",
    "Snapshot",
    "Temporary",
    "TokenSource",
    "UpstreamImapSource",
    "UpstreamPop3Source",
    "UpstreamSender",
    "senders",
]
