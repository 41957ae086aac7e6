"""Where an INBOX view reads from: the :class:`MailboxSource` interface and its API backends.

Like gluon's ``Connector``, a source hides the provider entirely: the view sees provider ids,
arrival dates, \\Seen and a cursor, never HTTP. Both APIs' ids are immutable (Graph only with
``Prefer: IdType="ImmutableId"`` on every request), which is what lets the view keep UIDs across
a full resync. Failures are classified by ``gateway.providers._http`` like every provider call;
only the two statuses that mean "your cursor is too old" (Graph 410, Gmail history 404) are
taken here and turned into :class:`CursorExpired`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx

from ..providers._base import TokenSource
from ..providers._errors import Permanent, ReauthRequired
from ..providers._http import Api, classify, error_code

SEEN = "\\Seen"


@dataclass(frozen=True, slots=True)
class RemoteMessage:
    """A message in the provider's INBOX: its id, arrival time (UTC) and whether it is read.

    ``size`` is the exact length of the CRLF form of the bytes :meth:`MailboxSource.fetch_raw`
    returns, when the source knows it without downloading (upstream IMAP RFC822.SIZE, POP3
    LIST); the APIs only give estimates, so there it is None and the view learns it on the
    first download.
    """

    id: str
    internal_date: datetime
    seen: bool
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A full listing of the INBOX and the cursor to ask for changes after it."""

    messages: list[RemoteMessage]
    cursor: str


@dataclass(frozen=True, slots=True)
class Changes:
    """What happened since a cursor. ``added`` may repeat known ids (apply idempotently)."""

    added: list[RemoteMessage] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seen: dict[str, bool] = field(default_factory=dict)  # id → \\Seen, for read-state changes
    cursor: str = ""
    # For sources without removal events (upstream IMAP/POP3): every id now in the INBOX; a
    # known id missing from it is removed. None: ``removed`` is complete.
    present: frozenset[str] | None = None


class CursorExpired(Exception):
    """The provider no longer knows the cursor: only a full listing can continue."""


class MailboxSource(Protocol):
    """One account's INBOX at its provider. ``ids_stable``: the same message keeps its id
    across a full resync, so the view can keep its UIDs (else it must change UIDVALIDITY)."""

    ids_stable: bool

    async def list_inbox(self) -> Snapshot: ...

    async def changes_since(self, cursor: str) -> Changes:
        """Changes after ``cursor``; raise :class:`CursorExpired` when it is too old."""

    async def fetch_raw(self, provider_id: str) -> bytes: ...

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        """Mirror read/flagged state to the provider (opt-in; None leaves that flag alone).
        Raise :class:`NotSupported` where the provider cannot keep it (POP3)."""

    async def remove(self, provider_id: str, how: Removal) -> None:
        """Take the message out of the INBOX at the provider: ``archive`` or ``trash``, never
        a permanent deletion. Raise :class:`NotSupported` where neither exists (POP3)."""


Removal = Literal["archive", "trash"]


class NotSupported(Exception):
    """The provider cannot do this mirroring operation; str() says why, for the admin."""


def _parse_graph_date(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class GraphSource:
    """Graph delta on ``mailFolders/inbox/messages``: the first round is the full listing,
    its ``@odata.deltaLink`` the cursor; links are followed verbatim (they carry the state)."""

    ids_stable = True

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
        self.mailbox = f"{graph_url.rstrip('/')}/users/{quote(address, safe='@')}"
        self.headers = {"Prefer": f'IdType="ImmutableId", odata.maxpagesize={page_size}'}

    async def list_inbox(self) -> Snapshot:
        url = f"{self.mailbox}/mailFolders/inbox/messages/delta"
        params = {"$select": "receivedDateTime,isRead"}
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
        _check_write(response, what, "Mail.ReadWrite")


def _check_write(response: httpx.Response, what: str, scope: str) -> None:
    """Raise for a failed mirroring write as ``Api.call`` would, but say which scope a 403
    for a missing permission lacks: mirroring is opt-in and asks for more than reading."""
    if response.status_code < 300:
        return
    error = classify(response, what)
    if isinstance(error, ReauthRequired):
        code, message = error_code(response)
        raise ReauthRequired(
            f"{what}: HTTP 403 {code}: {message} — mirroring changes to the provider needs the "
            f"{scope} scope, which this account's consent lacks: enable the option's scope and "
            "reconnect the account"
        )
    raise error


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
        message_id, _parse_graph_date(item["receivedDateTime"]), bool(item.get("isRead"))
    )


class GmailSource:
    """Gmail: ``messages.list(labelIds=INBOX)`` plus ``history.list`` from the stored historyId.

    INBOX membership is a label, so an INBOX label added or removed is an arrival or a removal,
    and TRASH/SPAM end it. History records only name messages; a message arriving needs one
    ``messages.get(format=minimal)`` for its internalDate and labels (run ``concurrency`` at a
    time; Gmail limits concurrent requests per user).
    """

    ids_stable = True
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
                changes.seen[message_id] = "UNREAD" not in current
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
        raw = str(response.json()["raw"])
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))

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
            _check_write(response, what, "gmail.modify")

    async def _details(self, ids: Iterable[str]) -> list[RemoteMessage | None]:
        """internalDate and \\Seen per id, in order; None for one no longer in the INBOX."""
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
        return RemoteMessage(message_id, moment, "UNREAD" not in current)


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
