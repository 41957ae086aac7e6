"""How Graph shows mail: message and folder JSON, ``$select``, ``$expand`` and body types.

Bodies are HTML unless the client sends ``Prefer: outlook.body-content-type="text"``. There is
no size property; the only size Graph offers is PR_MESSAGE_SIZE through ``$expand``, a store
size that is not the MIME length — so it is deliberately not the MIME length here either.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from typing import Any
from urllib.parse import quote

from .graph import Call, bad_request
from .mailstore import Folder, Mailbox, Message
from .mime import Address, Summary

MESSAGE_PROPERTIES = (
    "id",
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "receivedDateTime",
    "sentDateTime",
    "hasAttachments",
    "internetMessageId",
    "subject",
    "bodyPreview",
    "importance",
    "parentFolderId",
    "conversationId",
    "isDeliveryReceiptRequested",
    "isReadReceiptRequested",
    "isRead",
    "isDraft",
    "webLink",
    "inferenceClassification",
    "body",
    "sender",
    "from",
    "toRecipients",
    "ccRecipients",
    "bccRecipients",
    "replyTo",
    "flag",
)
_CANONICAL = {name.casefold(): name for name in MESSAGE_PROPERTIES}
_SIZE_EXPANSION = re.compile(
    r"singleValueExtendedProperties\(\$filter=id eq '(Integer|Long) 0x0E08'\)", re.IGNORECASE
)


def parse_select(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        canonical = _CANONICAL.get(name.casefold())
        if canonical is None:
            raise bad_request(
                f"Could not find a property named '{name}' on type 'microsoft.graph.message'.",
                "RequestBroker--ParseUri",
            )
        names.append(canonical)
    return tuple(names)


def parse_expand(text: str | None) -> bool:
    """Whether PR_MESSAGE_SIZE (0x0E08) was asked for: the one expansion the sandbox knows."""
    if text is None:
        return False
    if not _SIZE_EXPANSION.fullmatch(text.strip()):
        raise bad_request(
            "Parsing OData Select and Expand failed: the sandbox expands only "
            "singleValueExtendedProperties($filter=id eq 'Integer 0x0E08')."
        )
    return True


def timestamp(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def recipient(address: Address) -> dict[str, Any]:
    return {"emailAddress": {"name": address.name or address.address, "address": address.address}}


def message_json(
    call: Call,
    message: Message,
    select: tuple[str, ...] | None = None,
    with_size: bool = False,
) -> dict[str, Any]:
    summary = message.summary
    sender = recipient(summary.sender) if summary.sender else None
    properties: dict[str, Any] = {
        "id": call.message_id(message),
        "createdDateTime": timestamp(message.created),
        "lastModifiedDateTime": timestamp(message.modified),
        "changeKey": message.change_key,
        "categories": [],
        "receivedDateTime": timestamp(message.received),
        "sentDateTime": timestamp(None if message.is_draft else message.sent or summary.date),
        "hasAttachments": message.has_attachments,
        "internetMessageId": summary.message_id,
        "subject": summary.subject,
        "bodyPreview": _preview(summary),
        "importance": "normal",
        "parentFolderId": message.folder_id,
        "conversationId": message.conversation_id,
        "isDeliveryReceiptRequested": False,
        "isReadReceiptRequested": False,
        "isRead": message.is_read,
        "isDraft": message.is_draft,
        "webLink": "https://outlook.office365.com/owa/?ItemID="
        f"{quote(message.rest_id, safe='')}&exvsurl=1&viewmodel=ReadMessageItem",
        "inferenceClassification": "focused",
        "body": _body(summary, call.prefer.text_body),
        "sender": sender,
        "from": sender,
        "toRecipients": [recipient(a) for a in summary.to],
        "ccRecipients": [recipient(a) for a in summary.cc],
        "bccRecipients": [recipient(a) for a in summary.bcc],
        "replyTo": [recipient(a) for a in summary.reply_to],
        "flag": {"flagStatus": message.flag},
    }
    names = MESSAGE_PROPERTIES if select is None else ("id", *select)
    shown: dict[str, Any] = {"@odata.etag": f'W/"{message.change_key}"'}
    shown.update({name: properties[name] for name in names})
    if with_size:
        store_size = len(message.mime()) + 2048 + len(summary.subject) * 2
        shown["singleValueExtendedProperties"] = [{"id": "Integer 0xe08", "value": str(store_size)}]
    return shown


def _preview(summary: Summary) -> str:
    text = summary.text if summary.text is not None else _strip_html(summary.html or "")
    return " ".join(text.split())[:255]


def _body(summary: Summary, text_wanted: bool) -> dict[str, str]:
    if text_wanted:
        text = summary.text if summary.text is not None else _strip_html(summary.html or "")
        return {"contentType": "text", "content": text}
    if summary.html is not None:
        return {"contentType": "html", "content": summary.html}
    escaped = html.escape(summary.text or "").replace("\n", "<br>\r\n")
    return {
        "contentType": "html",
        "content": '<html><head>\r\n<meta http-equiv="Content-Type" content="text/html; '
        f'charset=utf-8"></head><body><div>{escaped}</div></body></html>',
    }


def _strip_html(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def folder_json(box: Mailbox, folder: Folder) -> dict[str, Any]:
    messages = box.in_folder(folder)
    return {
        "id": folder.id,
        "displayName": folder.display_name,
        "parentFolderId": None,
        "childFolderCount": 0,
        "unreadItemCount": sum(not m.is_read for m in messages),
        "totalItemCount": len(messages),
        "isHidden": False,
    }
