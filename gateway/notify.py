"""Telling a person that the gateway needs them: today a webhook, posted once per incident.

A mailbox whose grant was revoked silently stops working for the legacy program; the admin page
shows it, but nobody looks at a page that works. The webhook (chat, ticketing, monitoring)
reaches a human. The broker calls this once per incident (it records that it did).
"""

from __future__ import annotations

from pathlib import Path

import httpx

from . import outbound
from .logs import get_logger

log = get_logger(__name__)


class WebhookNotifier:
    def __init__(self, url: str, trust_file: Path, admin_url: str) -> None:
        self.url = url
        self.trust_file = trust_file
        self.admin_url = admin_url

    async def __call__(self, account: str, message: str) -> None:
        """Post the event; a failure is logged, never raised (the gateway keeps working)."""
        body = {
            "event": "needs_reconsent",
            "account": account,
            "message": message,
            "admin_url": self.admin_url,
        }
        try:
            async with outbound.async_client(self.trust_file, timeout=15) as client:
                response = await client.post(self.url, json=body)
            response.raise_for_status()
        except httpx.HTTPError as error:
            log.warning("notify.webhook_failed", url=self.url, error=str(error))
            return
        log.info("notify.webhook_sent", account=account)
