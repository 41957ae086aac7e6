"""Outbound backends. Each implements :class:`Sender`; failures are classified here, once.

``senders(...)`` builds one sender per provider kind for the spool; the httpx client comes from
:func:`gateway.outbound.async_client` and is owned (and closed) by the caller.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from ..config import Settings
from ._base import DeliveryResult, Sender, TokenSource
from ._errors import DeliveryError, Permanent, ReauthRequired, Temporary
from .gmail import GmailSender
from .graph import GraphSender
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
    "DeliveryError",
    "DeliveryResult",
    "GmailSender",
    "GraphSender",
    "Permanent",
    "ReauthRequired",
    "Sender",
    "Temporary",
    "TokenSource",
    "UpstreamSender",
    "senders",
]
