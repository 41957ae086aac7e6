"""The INBOX of a Gmail mailbox, through ``messages.list`` and ``history.list``.

Gmail ids are immutable; history older than Gmail keeps answers 404, which is
:class:`CursorExpired` (the view then lists the INBOX again and matches by id). Failures are
classified by ``_http`` like every provider call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from ..delivery import Permanent
from ._base import TokenSource
from ._http import Api, check_write
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

# "Batching requests": at most 100 calls, but "sending batches larger than 50 requests is not
# recommended" (larger ones are likely to be rate limited).
BATCH_CALLS = 50
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


class GmailSource:
    """Gmail: ``messages.list(labelIds=INBOX)`` plus ``history.list`` from the stored historyId.

    INBOX membership is a label, so an INBOX label added or removed is an arrival or a removal,
    and TRASH/SPAM end it. History records only name messages; a message arriving needs one
    ``messages.get(format=minimal)`` for its internalDate and labels (run ``concurrency`` at a
    time; Gmail limits concurrent requests per user).
    """

    ids_stable = True
    # messages.get costs 5 of the 15,000 quota units per user per minute ("Usage limits"); a
    # warm-up takes half (1,500 gets a minute), batched calls counting one by one.
    warm_up = WarmUpQuota(requests=1_500, seconds=60.0, batch=BATCH_CALLS)
    HISTORY_TYPES = ("messageAdded", "labelAdded", "labelRemoved", "messageDeleted")

    def __init__(
        self,
        client: httpx.AsyncClient,
        tokens: TokenSource,
        gmail_url: str,
        username: str,
        concurrency: int = 4,
    ) -> None:
        self.api = Api(client, tokens, username)
        self.base = f"{gmail_url.rstrip('/')}/gmail/v1/users/me"
        self.batch_url = f"{gmail_url.rstrip('/')}/batch/gmail/v1"
        self.base_path = urlsplit(self.base).path
        self._limit = asyncio.Semaphore(concurrency)

    async def list_inbox(self) -> Snapshot:
        # The historyId is taken first: a change during the listing is then replayed later.
        profile = await self.api.call("GET", f"{self.base}/profile", "Gmail profile")
        cursor = str(profile.json()["historyId"])
        ids: list[str] = []
        params: dict[str, Any] = {"labelIds": "INBOX", "maxResults": 500}
        while True:
            response = await self.api.call(
                "GET", f"{self.base}/messages", "Gmail list INBOX", params=params
            )
            body = response.json()
            ids.extend(str(m["id"]) for m in body.get("messages", []))
            if not body.get("nextPageToken"):
                break
            params = {**params, "pageToken": body["nextPageToken"]}
        found = await self._details(dict.fromkeys(ids))
        return Snapshot([m for m in found if m is not None], cursor)

    async def changes_since(self, cursor: str) -> Changes:
        params: dict[str, Any] = {
            "startHistoryId": cursor,
            "historyTypes": list(self.HISTORY_TYPES),
            "maxResults": 500,
        }
        labels: dict[str, set[str]] = {}  # id → labels after the last change seen
        entered: set[str] = set()  # ids that arrived or got INBOX back
        while True:
            response = await self.api.call(
                "GET",
                f"{self.base}/history",
                "Gmail history",
                params=params,
                ok=lambda status: status < 300 or status == 404,
            )
            if response.status_code == 404:
                raise CursorExpired(f"Gmail history from {cursor} is gone (404)")
            body = response.json()
            for record in body.get("history", []):
                _gmail_record(record, labels, entered)
            if not body.get("nextPageToken"):
                new_cursor = str(body["historyId"])
                break
            params = {**params, "pageToken": body["nextPageToken"]}
        changes = Changes(cursor=new_cursor)
        arriving = [i for i in labels if i in entered and _in_inbox(labels[i])]
        for message_id, current in labels.items():
            if not _in_inbox(current):
                changes.removed.append(message_id)
            elif message_id not in entered:
                changes.flags[message_id] = _gmail_flags(current)
        for message_id, message in zip(arriving, await self._details(arriving), strict=True):
            if message is None:  # gone again before we asked
                changes.removed.append(message_id)
            else:
                changes.added.append(message)
        return changes

    async def fetch_raw(self, provider_id: str) -> bytes:
        response = await self.api.call(
            "GET",
            f"{self.base}/messages/{quote(provider_id, safe='')}",
            "Gmail get raw",
            params={"format": "raw"},
        )
        return _raw(response.json())

    async def fetch_batch(self, provider_ids: list[str]) -> Batch:
        """Up to 50 ``messages.get(format=raw)`` in one ``multipart/mixed`` batch round trip;
        each call is answered (and charged against the quota) on its own."""
        ids = provider_ids[:BATCH_CALLS]
        boundary = "gateway_" + secrets.token_hex(12)
        parts = [
            f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <{n}>\r\n\r\n"
            f"GET {self.base_path}/messages/{quote(pid, safe='')}?format=raw HTTP/1.1\r\n\r\n"
            for n, pid in enumerate(ids)
        ]
        response = await self.api.call(
            "POST",
            self.batch_url,
            "Gmail batch get raw",
            content=("".join(parts) + f"--{boundary}--\r\n").encode(),
            headers={"Content-Type": f"multipart/mixed; boundary={boundary}"},
        )
        found = _BOUNDARY.search(response.headers.get("Content-Type", ""))
        if found is None:
            raise Permanent("Gmail batch: the answer is not multipart/mixed")
        answers = (
            (content_id.removeprefix("response-"), status, body, headers)
            for content_id, status, headers, body in _batch_parts(response.content, found.group(1))
        )
        # Quota errors are 429 or 403 (rateLimitExceeded).
        return sort_batch(ids, answers, lambda body: _raw(json.loads(body)), (403, 429, 503))

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        add: list[str] = []
        remove: list[str] = []
        if seen is not None:
            (remove if seen else add).append("UNREAD")
        if flagged is not None:
            (add if flagged else remove).append("STARRED")
        if add or remove:  # Gmail refuses a modify that changes nothing (400)
            body = {"addLabelIds": add, "removeLabelIds": remove}
            await self._write(provider_id, "modify", "Gmail mark read/flagged", body)

    async def remove(self, provider_id: str, how: Removal) -> None:
        # Archive = out of INBOX, kept in All Mail; trash = TRASH label (purged after 30 days).
        if how == "archive":
            body = {"removeLabelIds": ["INBOX"]}
            await self._write(provider_id, "modify", "Gmail archive", body)
        else:
            await self._write(provider_id, "trash", "Gmail trash", None)

    async def _write(
        self, provider_id: str, action: str, what: str, body: dict[str, Any] | None
    ) -> None:
        """A mirroring write; a message already gone (404) is done."""
        response = await self.api.call(
            "POST",
            f"{self.base}/messages/{quote(provider_id, safe='')}/{action}",
            what,
            json=body,
            ok=lambda status: status < 300 or status in (403, 404),
        )
        if response.status_code != 404:
            check_write(response, what, "gmail.modify")

    async def _details(self, ids: Iterable[str]) -> list[RemoteMessage | None]:
        """internalDate and flags per id, in order; None for one no longer in the INBOX."""
        return list(await asyncio.gather(*(self._minimal(i) for i in ids)))

    async def _minimal(self, message_id: str) -> RemoteMessage | None:
        async with self._limit:
            response = await self.api.call(
                "GET",
                f"{self.base}/messages/{quote(message_id, safe='')}",
                "Gmail get minimal",
                params={"format": "minimal"},
                ok=lambda status: status < 300 or status == 404,
            )
        if response.status_code == 404:
            return None
        body = response.json()
        current = set(body.get("labelIds", []))
        if not _in_inbox(current):
            return None
        moment = datetime.fromtimestamp(int(body["internalDate"]) / 1000, UTC)
        return RemoteMessage(message_id, moment, _gmail_flags(current))


def _raw(message: dict[str, Any]) -> bytes:
    """The bytes of a ``format=raw`` message: base64url, its padding possibly left off."""
    raw = str(message["raw"])
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))


def _gmail_flags(labels: set[str]) -> frozenset[str]:
    """IMAP flags from Gmail labels, as Gmail's own IMAP server maps them: no UNREAD is
    \\Seen, STARRED is \\Flagged. Gmail has no answered or keyword state (user labels are
    folders in Gmail's IMAP, not keywords)."""
    flags = set() if "UNREAD" in labels else {SEEN}
    if "STARRED" in labels:
        flags.add(FLAGGED)
    return frozenset(flags)


def _batch_parts(raw: bytes, boundary: str) -> list[tuple[str, int, httpx.Headers, bytes]]:
    """(Content-ID, status, headers, body) of each ``application/http`` part of a batch answer."""
    found = []
    delimiter = f"--{boundary}".encode()
    for section in raw.split(delimiter)[1:]:
        if section.startswith(b"--"):
            break
        part_head, _, response = section.lstrip(b"\r\n").partition(b"\r\n\r\n")
        part_headers = _header_block(part_head)
        head, _, body = response.partition(b"\r\n\r\n")
        status_line, _, rest = head.partition(b"\r\n")
        fields = status_line.split()
        if len(fields) < 2 or not fields[1].isdigit():
            continue
        content_id = part_headers.get("content-id", "").strip().strip("<>")
        found.append((content_id, int(fields[1]), _header_block(rest), body.rstrip(b"\r\n")))
    return found


def _header_block(block: bytes) -> httpx.Headers:
    """Header lines as httpx's case-insensitive headers: ``Retry-After`` is found however the
    part spells it (a lower-cased dict made every in-batch Retry-After invisible)."""
    headers = httpx.Headers()
    for line in block.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip()] = value.strip()
    return headers


def _in_inbox(labels: set[str]) -> bool:
    return "INBOX" in labels and not labels & {"TRASH", "SPAM", "__deleted__"}


def _gmail_record(record: dict[str, Any], labels: dict[str, set[str]], entered: set[str]) -> None:
    """Fold one history record into the latest labels per id (records come in id order)."""
    for key in ("messagesAdded", "labelsAdded", "labelsRemoved", "messagesDeleted"):
        for change in record.get(key, []):
            message = change.get("message", {})
            message_id = str(message["id"])
            current = set(message.get("labelIds", []))
            if key == "messagesDeleted":
                current = {"__deleted__"}
            elif key == "labelsRemoved" and "INBOX" in change.get("labelIds", []):
                current.discard("INBOX")
            if key == "messagesAdded" or (
                key == "labelsAdded" and "INBOX" in change.get("labelIds", [])
            ):
                entered.add(message_id)
            labels[message_id] = current
