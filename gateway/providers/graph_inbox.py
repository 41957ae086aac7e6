"""The INBOX of a Microsoft 365 mailbox, through Graph delta queries.

Ids are immutable only with ``Prefer: IdType="ImmutableId"`` on every request, which is what
lets the view keep UIDs across a full resync; a delta link Graph no longer knows (410) is
:class:`CursorExpired`. Failures are classified by ``_http`` like every provider call.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from ..delivery import Permanent
from ._base import TokenSource
from ._http import Api, check_write, error_code
from ._inbox import (
    FLAGGED,
    SEEN,
    Batch,
    Changes,
    CursorExpired,
    RemoteMessage,
    Removal,
    Snapshot,
    WarmUpQuota,
    sort_batch,
)

BATCH_LIMIT = 20  # "Microsoft Graph supports batching up to 20 requests" (JSON batching)


def _parse_graph_date(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class GraphSource:
    """Graph delta on ``mailFolders/inbox/messages``: the first round is the full listing,
    its ``@odata.deltaLink`` the cursor; links are followed verbatim (they carry the state)."""

    ids_stable = True
    # Half of Outlook's 10,000 requests per 10 minutes per app and mailbox (each inner request
    # of a $batch counts), so clients and the poller keep the other half.
    warm_up = WarmUpQuota(requests=5_000, seconds=600.0, batch=BATCH_LIMIT)

    def __init__(
        self,
        client: httpx.AsyncClient,
        tokens: TokenSource,
        graph_url: str,
        username: str,
        address: str,
        page_size: int = 200,
    ) -> None:
        self.api = Api(client, tokens, username)
        # /users/{address} serves delegated and app-only tokens alike (see providers.graph).
        self.batch_url = f"{graph_url.rstrip('/')}/$batch"
        self.user_path = f"/users/{quote(address, safe='@')}"
        self.mailbox = f"{graph_url.rstrip('/')}{self.user_path}"
        self.headers = {"Prefer": f'IdType="ImmutableId", odata.maxpagesize={page_size}'}

    async def list_inbox(self) -> Snapshot:
        url = f"{self.mailbox}/mailFolders/inbox/messages/delta"
        params = {"$select": "receivedDateTime,isRead,flag"}
        changes = await self._rounds(url, params)
        return Snapshot(changes.added, changes.cursor)

    async def changes_since(self, cursor: str) -> Changes:
        return await self._rounds(cursor, None)

    async def _rounds(self, url: str, params: dict[str, str] | None) -> Changes:
        added: dict[str, RemoteMessage] = {}
        removed: dict[str, None] = {}
        while True:
            response = await self.api.call(
                "GET",
                url,
                "Graph inbox delta",
                params=params,
                headers=self.headers,
                ok=lambda status: status < 300 or status == 410,
            )
            if response.status_code == 410:
                raise CursorExpired("Graph delta token expired (410 SyncStateNotFound)")
            body = response.json()
            for item in body.get("value", []):
                _graph_item(item, added, removed)
            params = None  # links carry every option
            if "@odata.nextLink" in body:
                url = body["@odata.nextLink"]
            elif "@odata.deltaLink" in body:
                return Changes(list(added.values()), list(removed), {}, body["@odata.deltaLink"])
            else:
                raise Permanent("Graph inbox delta: a page had neither nextLink nor deltaLink")

    async def fetch_raw(self, provider_id: str) -> bytes:
        response = await self.api.call(
            "GET",
            f"{self.mailbox}/messages/{quote(provider_id, safe='')}/$value",
            "Graph message MIME",
            headers=self.headers,
        )
        return response.content

    async def fetch_batch(self, provider_ids: list[str]) -> Batch:
        """Up to 20 MIME downloads in one ``$batch`` round trip. Graph base64-encodes an inner
        body that is not JSON (the ``$value`` MIME); each inner answer has its own status."""
        requests = [
            {
                "id": str(n),
                "method": "GET",
                "url": f"{self.user_path}/messages/{quote(pid, safe='')}/$value",
                "headers": self.headers,
            }
            for n, pid in enumerate(provider_ids[:BATCH_LIMIT])
        ]
        response = await self.api.call(
            "POST", self.batch_url, "Graph $batch MIME", json={"requests": requests}
        )
        answers = (
            (str(a.get("id", "")), a.get("status"), a.get("body"), a.get("headers") or {})
            for a in response.json().get("responses", [])
        )
        return sort_batch(
            provider_ids[:BATCH_LIMIT],
            answers,
            lambda body: base64.b64decode(body) if isinstance(body, str) else None,
            (429, 503),
        )

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        changes: dict[str, Any] = {}
        if seen is not None:
            changes["isRead"] = seen
        if flagged is not None:
            changes["flag"] = {"flagStatus": "flagged" if flagged else "notFlagged"}
        if changes:
            await self._write("PATCH", provider_id, "", "Graph mark read/flagged", changes)

    async def remove(self, provider_id: str, how: Removal) -> None:
        # Well-known folder names; with ImmutableId the moved message keeps its id (201 + it).
        folder = "archive" if how == "archive" else "deleteditems"
        what = f"Graph move to {folder}"
        await self._write("POST", provider_id, "/move", what, {"destinationId": folder})

    async def _write(
        self, method: str, provider_id: str, suffix: str, what: str, body: dict[str, Any]
    ) -> None:
        """A mirroring write; a message already gone (404 ErrorItemNotFound) is done."""
        response = await self.api.call(
            method,
            f"{self.mailbox}/messages/{quote(provider_id, safe='')}{suffix}",
            what,
            json=body,
            headers=self.headers,
            ok=lambda status: status < 300 or status in (403, 404),
        )
        if response.status_code == 404 and error_code(response)[0] == "ErrorItemNotFound":
            return
        check_write(response, what, "Mail.ReadWrite")


def _graph_item(
    item: dict[str, Any], added: dict[str, RemoteMessage], removed: dict[str, None]
) -> None:
    """Fold one delta item in; a later item about the same id wins (delta may repeat ids)."""
    message_id = str(item["id"])
    if "@removed" in item:
        added.pop(message_id, None)
        removed[message_id] = None
        return
    removed.pop(message_id, None)
    added[message_id] = RemoteMessage(
        message_id, _parse_graph_date(item["receivedDateTime"]), _graph_flags(item)
    )


def _graph_flags(item: dict[str, Any]) -> frozenset[str]:
    """The IMAP flags a Graph message carries: isRead is \\Seen, a follow-up flag whose
    flagStatus is "flagged" is \\Flagged (as Exchange's own IMAP server maps it; "complete"
    is not). Graph keeps no answered, draft-in-INBOX or keyword state an IMAP client could
    read (categories are Outlook's, not IMAP keywords)."""
    flags = {SEEN} if item.get("isRead") else set()
    flag = item.get("flag")
    if isinstance(flag, dict) and flag.get("flagStatus") == "flagged":
        flags.add(FLAGGED)
    return frozenset(flags)
