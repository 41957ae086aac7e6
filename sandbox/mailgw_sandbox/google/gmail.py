"""The Gmail API v1 resources the gateway uses, under ``/gmail/v1/users/{userId}/``.

Shapes follow ``gmail.v1.json``: ``historyId`` and ``internalDate`` are strings, empty lists are
left out, ``raw`` is base64url. See provider-apis.md D for each method's rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

from aiohttp import web

from . import mime, search
from .api import (
    NOT_FOUND,
    Caller,
    Gate,
    GmailError,
    bool_param,
    invalid,
    json_object,
    read_capped,
    string_list,
    uint_param,
)
from .mailstore import (
    CHANGE_TYPES,
    NOT_APPLICABLE,
    SYSTEM_LABELS,
    GmailStore,
    HistoryGone,
    NoRecipients,
    StoredMessage,
)

BASE = "/gmail/v1/users/{userId}"
MAX_MESSAGE_BYTES = 36_700_160  # mediaUpload.maxSize of messages.send: 35 MiB
# The plain JSON endpoint takes far less than the upload one (reports range from 1 MB to ~8 MB of
# JSON); 5 MiB keeps the sandbox on the strict side, so a gateway that passes here passes there.
MAX_JSON_REQUEST_BYTES = 5 * 1024 * 1024
MESSAGE_FIELDS = frozenset(
    {
        "id",
        "threadId",
        "labelIds",
        "snippet",
        "historyId",
        "internalDate",
        "payload",
        "sizeEstimate",
        "raw",
        "classificationLabelValues",
    }
)
FORMATS = ("minimal", "full", "raw", "metadata")
_MESSAGE_ID = re.compile(r"^[0-9a-fA-F]{1,20}$")
SPAM_TRASH = frozenset({"SPAM", "TRASH"})


def json_too_large() -> GmailError:
    return GmailError(
        413,
        "badRequest",
        f"Request payload size exceeds the limit: {MAX_JSON_REQUEST_BYTES} bytes.",
    )


def upload_too_large() -> GmailError:
    return GmailError(413, "uploadTooLarge", "Request Entity Too Large")


T = TypeVar("T")


def send_message(
    store: GmailStore, caller: Caller, raw: bytes, thread_id: object = None
) -> web.Response:
    """Every send variant ends here: size cap, header-only recipients, From rewrite, SENT copy."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise upload_too_large()
    try:
        stored = store.send(caller.user, raw, thread_id if isinstance(thread_id, str) else None)
    except NoRecipients:
        raise invalid("Recipient address required") from None
    return web.json_response(stored.summary())


def paginate(request: web.Request, items: Sequence[T], maximum: int) -> tuple[Sequence[T], str]:
    """One page and the token of the next ("" when this is the last)."""
    size = uint_param(request, "maxResults", 100, maximum) or 100
    token = request.query.get("pageToken", "0")
    if not token.isdigit():
        raise invalid("Invalid pageToken")
    start = int(token)
    end = start + size
    return items[start:end], str(end) if end < len(items) else ""


class GmailApi:
    def __init__(self, gate: Gate, store: GmailStore) -> None:
        self.gate = gate
        self.store = store

    def add_routes(self, app: web.Application) -> None:
        endpoint = self.gate.endpoint
        message = f"{BASE}/messages/{{id}}"
        routes = [
            ("GET", f"{BASE}/profile", endpoint("getProfile", self.profile)),
            (
                "GET",
                f"{BASE}/messages",
                endpoint(
                    "messages.list",
                    self.list_messages,
                    ("labelIds", "q", "pageToken", "maxResults", "includeSpamTrash"),
                ),
            ),
            ("POST", f"{BASE}/messages/send", endpoint("messages.send", self.send)),
            (
                "GET",
                message,
                endpoint("messages.get", self.get_message, ("format", "metadataHeaders")),
            ),
            ("DELETE", message, endpoint("messages.delete", self.delete)),
            ("POST", f"{message}/modify", endpoint("messages.modify", self.modify)),
            ("POST", f"{message}/trash", endpoint("messages.trash", self.trash)),
            ("POST", f"{message}/untrash", endpoint("messages.untrash", self.untrash)),
            (
                "GET",
                f"{BASE}/history",
                endpoint(
                    "history.list",
                    self.history,
                    ("startHistoryId", "historyTypes", "labelId", "maxResults", "pageToken"),
                ),
            ),
            ("GET", f"{BASE}/settings/sendAs", endpoint("settings.sendAs.list", self.send_as)),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)

    async def profile(self, request: web.Request, caller: Caller) -> web.Response:
        mailbox = caller.mailbox
        return web.json_response(
            {
                "emailAddress": caller.user.address,
                "messagesTotal": len(mailbox.messages),
                "threadsTotal": len(mailbox.threads()),
                "historyId": str(mailbox.history_id),
            }
        )

    async def send(self, request: web.Request, caller: Caller) -> web.Response:
        body = json_object(
            await read_capped(request, MAX_JSON_REQUEST_BYTES, json_too_large), MESSAGE_FIELDS
        )
        encoded = body.get("raw")
        if not encoded:
            raise invalid(
                "'raw' RFC822 payload message string or uploading message via /upload/* URL "
                "required"
            )
        try:
            raw = mime.decode_raw(str(encoded))
        except ValueError:
            raise invalid(
                "Invalid value at 'message.raw' (TYPE_BYTES), Base64 decoding failed"
            ) from None
        return send_message(self.store, caller, raw, body.get("threadId"))

    async def list_messages(self, request: web.Request, caller: Caller) -> web.Response:
        q = request.query.get("q", "")
        if q and caller.metadata_only:
            raise GmailError(403, "forbidden", "Metadata scope does not support 'q' parameter")
        labels = set(request.query.getall("labelIds", []))
        query = search.parse(q) if q else None
        spam_trash = (
            bool_param(request, "includeSpamTrash")
            or bool(labels & SPAM_TRASH)
            or (query is not None and query.reaches_spam_trash)
        )
        newest_first = sorted(
            caller.mailbox.messages.values(),
            key=lambda m: (m.internal_date, m.id),
            reverse=True,
        )
        matched = [
            m
            for m in newest_first
            if labels <= m.labels
            and (spam_trash or not m.labels & SPAM_TRASH)
            and (query is None or query.matches(m))
        ]
        page, next_token = paginate(request, matched, 500)
        body: dict[str, Any] = {}
        if page:
            body["messages"] = [m.ref() for m in page]
        if next_token:
            body["nextPageToken"] = next_token
        body["resultSizeEstimate"] = len(matched)
        return web.json_response(body)

    async def get_message(self, request: web.Request, caller: Caller) -> web.Response:
        fmt = request.query.get("format", "full").lower()
        if fmt not in FORMATS:
            raise invalid(f"Invalid value at 'format' (type.googleapis.com/Format), \"{fmt}\"")
        if caller.metadata_only and fmt in ("full", "raw"):
            raise GmailError(403, "forbidden", f"Metadata scope doesn't allow format {fmt.upper()}")
        message = _message(request, caller)
        body: dict[str, Any] = message.summary()
        body["snippet"] = message.snippet
        if fmt == "metadata":
            wanted = {name.lower() for name in request.query.getall("metadataHeaders", [])}
            body["payload"] = mime.metadata_payload(message.raw, wanted or None)
        elif fmt == "full":
            body["payload"] = mime.payload(message.raw)
        body["sizeEstimate"] = len(message.raw)
        if fmt == "raw":
            body["raw"] = mime.encode_raw(message.raw)
        body["historyId"] = str(message.history_id)
        body["internalDate"] = str(message.internal_date)
        return web.json_response(body)

    async def modify(self, request: web.Request, caller: Caller) -> web.Response:
        body = json_object(
            await read_capped(request, MAX_JSON_REQUEST_BYTES, json_too_large),
            ("addLabelIds", "removeLabelIds"),
        )
        add, remove = string_list(body, "addLabelIds"), string_list(body, "removeLabelIds")
        if not add and not remove:
            raise invalid("No label add or removes specified")
        for label in (*add, *remove):
            if label not in SYSTEM_LABELS or label in NOT_APPLICABLE:
                raise invalid(f"Invalid label: {label}")
        message = _message(request, caller)
        caller.mailbox.change_labels(message, add, remove)
        return web.json_response(message.summary())

    async def trash(self, request: web.Request, caller: Caller) -> web.Response:
        message = _message(request, caller)
        caller.mailbox.trash(message)
        return web.json_response(message.summary())

    async def untrash(self, request: web.Request, caller: Caller) -> web.Response:
        message = _message(request, caller)
        caller.mailbox.untrash(message)
        return web.json_response(message.summary())

    async def delete(self, request: web.Request, caller: Caller) -> web.Response:
        caller.mailbox.delete(_message(request, caller).id)
        return web.Response(status=204)

    async def history(self, request: web.Request, caller: Caller) -> web.Response:
        start_text = request.query.get("startHistoryId")
        if start_text is None:
            raise invalid("Missing required parameter: startHistoryId")
        if not start_text.isdigit():
            raise invalid(f"Invalid value at 'start_history_id' (TYPE_UINT64), \"{start_text}\"")
        types = set(request.query.getall("historyTypes", CHANGE_TYPES))
        unknown = sorted(types - set(CHANGE_TYPES))
        if unknown:
            raise invalid(f"Invalid value at 'history_types' (TYPE_ENUM), \"{unknown[0]}\"")
        try:
            records = caller.mailbox.history_since(int(start_text))
        except HistoryGone:
            raise GmailError(404, "notFound", NOT_FOUND) from None
        label = request.query.get("labelId")
        kept = [f for r in records if (f := r.filtered(types, label)) is not None]
        page, next_token = paginate(request, kept, 500)
        body: dict[str, Any] = {}
        if page:
            body["history"] = [record.json() for record in page]
        if next_token:
            body["nextPageToken"] = next_token
        body["historyId"] = str(caller.mailbox.history_id)
        return web.json_response(body)

    async def send_as(self, request: web.Request, caller: Caller) -> web.Response:
        user = caller.user
        primary = {
            "sendAsEmail": user.address,
            "displayName": user.display_name,
            "replyToAddress": "",
            "signature": "",
            "isPrimary": True,
            "isDefault": True,
        }
        aliases = [
            {
                "sendAsEmail": alias,
                "displayName": user.display_name,
                "replyToAddress": "",
                "signature": "",
                "isDefault": False,
                "treatAsAlias": True,
                "verificationStatus": "accepted",
            }
            for alias in user.send_as
        ]
        return web.json_response({"sendAs": [primary, *aliases]})


def _message(request: web.Request, caller: Caller) -> StoredMessage:
    message_id = request.match_info["id"]
    if not _MESSAGE_ID.match(message_id):
        raise invalid("Invalid id value")
    try:
        return caller.mailbox.get(message_id)
    except KeyError:
        raise GmailError(404, "notFound", NOT_FOUND) from None
