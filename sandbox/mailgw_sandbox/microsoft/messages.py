"""Graph mail endpoints: profile, sendMail (JSON and MIME), drafts, attachments, send, list, get,
``$value``, PATCH, move and folders.

Sending follows Exchange: recipients come from the To/Cc/Bcc headers only, the From must be the
mailbox or an address it may send as (``ErrorSendAsDenied``), and the message lands in Sent
Items unless JSON sendMail said ``saveToSentItems: false`` or the sent draft carries
PidTagDeleteAfterSubmit (then it is deleted after submission; see ``extended``). MIME sendMail
always files a copy: its body is the message, so it has no ``saveToSentItems`` ("This method
saves the message in the Sent Items folder", user-sendMail, Graph v1.0 reference).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .._provider import SentMessage
from .extended import deletes_after_submit, parse_properties
from .graph import Call, GraphError, Route, bad_request
from .mailstore import Mailbox, Message, new_attachment_id, new_item_id
from .mime import (
    Address,
    Draft,
    FileAttachment,
    compose,
    ensure_headers,
    envelope,
    new_message_id,
)
from .odata import check_efficiency, parse_count, parse_filter, parse_orderby
from .scopes import READ_MAIL, READ_PROFILE, SEND_MAIL, WRITE_MAIL
from .views import folder_json, message_json, parse_expand, parse_select, timestamp

DEFAULT_MAX_MESSAGE_BYTES = 35 * 1024 * 1024  # the tenant default; admins may raise it to 150 MB
_LIST_OPTIONS = {"$select", "$top", "$skip", "$filter", "$orderby", "$count", "$expand"}
_FLAG_STATUSES = ("notFlagged", "flagged", "complete")


def _is_mime(call: Call) -> bool:
    return call.request.content_type == "text/plain"


def _decode_mime(call: Call) -> bytes:
    """A base64 MIME body, line breaks allowed, as Graph's MIME endpoints take it."""
    try:
        raw = base64.b64decode(b"".join(call.body.split()), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise bad_request(
            "Invalid base64 string for MIME content.", "ErrorMimeContentInvalidBase64String"
        )
    return raw


class MailApi:
    """The handlers, with the tenant's maximum message size."""

    def __init__(self) -> None:
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES

    def routes(self) -> list[Route]:
        """Literal segments before placeholders, so ``delta`` is never taken for an id."""
        folder_messages = ("mailfolders", "{folder}", "messages")
        return [
            Route("GET", (), READ_PROFILE, self.profile, mailbox=False),
            Route("POST", ("sendmail",), SEND_MAIL, self.send_mail),
            Route("GET", ("messages",), READ_MAIL, self.list_messages),
            Route("POST", ("messages",), WRITE_MAIL, self.create_draft),
            Route("GET", ("messages", "{id}"), READ_MAIL, self.get_message),
            Route("PATCH", ("messages", "{id}"), WRITE_MAIL, self.update_message),
            Route("DELETE", ("messages", "{id}"), WRITE_MAIL, self.delete_message),
            Route("GET", ("messages", "{id}", "$value"), READ_MAIL, self.get_mime),
            Route("POST", ("messages", "{id}", "send"), SEND_MAIL, self.send_draft),
            Route("POST", ("messages", "{id}", "move"), WRITE_MAIL, self.move_message),
            Route("POST", ("messages", "{id}", "attachments"), WRITE_MAIL, self.add_attachment),
            Route("GET", ("mailfolders",), READ_MAIL, self.list_folders),
            Route("GET", ("mailfolders", "{folder}"), READ_MAIL, self.get_folder),
            Route("GET", folder_messages, READ_MAIL, self.list_messages),
            Route("GET", (*folder_messages, "{id}"), READ_MAIL, self.get_message),
            Route("GET", (*folder_messages, "{id}", "$value"), READ_MAIL, self.get_mime),
        ]

    # -- profile and folders ------------------------------------------------------------------

    def profile(self, call: Call) -> web.Response:
        user = call.user
        given, _, surname = user.display_name.partition(" ")
        return call.respond(
            {
                "@odata.context": f"{call.origin}/v1.0/$metadata#users/$entity",
                "businessPhones": [],
                "displayName": user.display_name,
                "givenName": given,
                "jobTitle": None,
                "mail": user.address,
                "mobilePhone": None,
                "officeLocation": None,
                "preferredLanguage": "en-US",
                "surname": surname or None,
                "userPrincipalName": user.address,
                "id": user.id,
            }
        )

    def list_folders(self, call: Call) -> web.Response:
        box = call.mailbox
        return call.respond({"value": [folder_json(box, f) for f in box.folders.values()]})

    def get_folder(self, call: Call) -> web.Response:
        return call.respond(folder_json(call.mailbox, call.folder()))

    # -- sending ------------------------------------------------------------------------------

    def send_mail(self, call: Call) -> web.Response:
        if _is_mime(call):
            self.submit(call, _decode_mime(call), saved=True)
            return web.Response(status=202)
        data = call.json()
        message = data.get("message")
        if not isinstance(message, dict):
            raise bad_request("Required property 'message' is missing or not an object.")
        saved = data.get("saveToSentItems", True)
        if not isinstance(saved, bool):
            raise bad_request("Property 'saveToSentItems' must be true or false.")
        raw = compose(_draft(call, message), new_message_id(_domain(call)), call.mailbox.now())
        self.submit(call, raw, saved=saved)
        return web.Response(status=202)

    def send_draft(self, call: Call) -> web.Response:
        message = call.message()
        if not message.is_draft:
            raise bad_request("Only draft messages can be sent.", "ErrorInvalidOperation")
        self.submit(call, message.mime(), saved=True, draft=message)
        return web.Response(status=202)

    def submit(self, call: Call, raw: bytes, saved: bool, draft: Message | None = None) -> None:
        """Hand a message to transport: send-as, recipients and size checks, Sent Items."""
        box, user = call.mailbox, call.user
        from_header, recipients = envelope(raw)
        sender = from_header.address if from_header else user.address
        if not user.may_send_as(sender):
            raise GraphError(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right "
                "to send mail on behalf of the specified sending account., Cannot submit message.",
            )
        if not recipients:
            raise bad_request(
                "At least one recipient is not valid., A message can't be sent because it "
                "contains no recipients.",
                "ErrorInvalidRecipients",
            )
        if len(raw) > self.max_message_bytes:
            raise bad_request(
                "The message exceeds the maximum supported size.", "ErrorMessageSizeExceeded"
            )
        now = box.now()
        raw = ensure_headers(raw, new_message_id(_domain(call)), now)
        copy = _file_in_sent_items(box, raw, now, saved, draft)
        box.sent.append(
            SentMessage(
                id=copy.immutable_id if copy else new_item_id(),
                mailbox=user.address,
                from_address=sender,
                recipients=recipients,
                raw=raw,
                saved_to_sent=copy is not None,
            )
        )

    # -- drafts and attachments ---------------------------------------------------------------

    def create_draft(self, call: Call) -> web.Response:
        box = call.mailbox
        extended: dict[str, str] = {}
        if _is_mime(call):  # the body is the message: no room for extended properties
            raw = _decode_mime(call)
        else:
            data = call.json()
            if "singleValueExtendedProperties" in data:
                extended = parse_properties(data["singleValueExtendedProperties"])
            raw = compose(_draft(call, data), new_message_id(_domain(call)), box.now())
        message = box.add(raw, box.folders["drafts"], is_read=True, is_draft=True)
        message.extended.update(extended)
        return call.respond(message_json(call, message), status=201)

    def add_attachment(self, call: Call) -> web.Response:
        message = call.message()
        attachment = _file_attachment(call.json())
        message.attachments.append(attachment)
        call.mailbox.touch(message)
        return call.respond(
            {
                "@odata.context": f"{call.base}/messages('{quote(call.message_id(message))}')"
                "/attachments/$entity",
                **_attachment_json(attachment, call.mailbox.now()),
                "contentBytes": base64.b64encode(attachment.content).decode("ascii"),
            },
            status=201,
        )

    # -- reading ------------------------------------------------------------------------------

    def list_messages(self, call: Call) -> web.Response:
        query = call.request.query
        unknown = [name for name in query if name.startswith("$") and name not in _LIST_OPTIONS]
        if unknown:
            raise bad_request(f"The query parameter '{unknown[0]}' is not supported.")
        conditions = parse_filter(query.get("$filter"))
        order = parse_orderby(query.get("$orderby"))
        check_efficiency(conditions, order)
        select = parse_select(query.get("$select"))
        with_size = parse_expand(query.get("$expand"))
        top = parse_count(query.get("$top"), "$top", 10, 1, 1000)
        skip = parse_count(query.get("$skip"), "$skip", 0, 0, 10**9)
        box = call.mailbox
        candidates = (
            box.in_folder(call.folder()) if "folder" in call.params else box.messages.values()
        )
        matched = [m for m in candidates if all(c.holds(m) for c in conditions)]
        descending = order[0][1] if order else True
        matched.sort(key=lambda m: (m.received, m.arrival), reverse=descending)
        body: dict[str, Any] = {
            "@odata.context": f"{call.origin}/v1.0/$metadata#Collection(message)",
            "value": [message_json(call, m, select, with_size) for m in matched[skip : skip + top]],
        }
        if query.get("$count", "").lower() == "true":
            body["@odata.count"] = len(matched)
        if skip + top < len(matched):
            body["@odata.nextLink"] = str(call.request.url.update_query({"$skip": str(skip + top)}))
        return call.respond(body)

    def get_message(self, call: Call) -> web.Response:
        query = call.request.query
        select, with_size = parse_select(query.get("$select")), parse_expand(query.get("$expand"))
        return call.respond(message_json(call, call.message(), select, with_size))

    def get_mime(self, call: Call) -> web.Response:
        return web.Response(body=call.message().mime(), content_type="text/plain")

    # -- changing -----------------------------------------------------------------------------

    def update_message(self, call: Call) -> web.Response:
        message = call.message()
        changes = call.json()
        unsupported = set(changes) - {"isRead", "flag", "singleValueExtendedProperties"}
        if unsupported:
            raise bad_request(
                "The sandbox updates isRead, flag and singleValueExtendedProperties only, not "
                f"{', '.join(sorted(unsupported))}.",
                "ErrorInvalidPropertyRequest",
            )
        if "singleValueExtendedProperties" in changes:
            message.extended.update(parse_properties(changes["singleValueExtendedProperties"]))
        if "isRead" in changes:
            if not isinstance(changes["isRead"], bool):
                raise bad_request("Property 'isRead' must be true or false.")
            message.is_read = changes["isRead"]
        if "flag" in changes:
            status = (
                (changes["flag"] or {}).get("flagStatus")
                if isinstance(changes["flag"], dict)
                else None
            )
            if status not in _FLAG_STATUSES:
                raise bad_request(f"flagStatus must be one of {', '.join(_FLAG_STATUSES)}.")
            message.flag = status
        call.mailbox.touch(message)
        return call.respond(message_json(call, message))

    def delete_message(self, call: Call) -> web.Response:
        """Graph's DELETE is a soft delete: the item moves to Deleted Items (204)."""
        message = call.message()
        trash = call.folder("deleteditems")
        if message.folder_id != trash.id:
            call.mailbox.move(message, trash)
        return web.Response(status=204)

    def move_message(self, call: Call) -> web.Response:
        message = call.message()
        destination = call.json().get("destinationId")
        if not isinstance(destination, str):
            raise bad_request("Required property 'destinationId' is missing.")
        moved = call.mailbox.move(message, call.folder(destination))
        return call.respond(message_json(call, moved), status=201)


def _file_in_sent_items(
    box: Mailbox, raw: bytes, now: datetime, saved: bool, draft: Message | None
) -> Message | None:
    """A sent draft moves to Sent Items (keeping its immutable id), or is deleted when it
    carries PidTagDeleteAfterSubmit; sendMail files a copy unless told not to."""
    if draft is not None and deletes_after_submit(draft.extended):
        box.delete(draft)
        return None
    if draft is not None:
        draft.replace_content(raw)
        draft.is_draft, draft.is_read, draft.sent = False, True, now
        return box.move(draft, box.folders["sentitems"])
    if not saved:
        return None
    copy = box.add(raw, box.folders["sentitems"], is_read=True)
    copy.sent = now
    return copy


def _attachment_json(attachment: FileAttachment, modified: datetime) -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "id": attachment.id,
        "lastModifiedDateTime": timestamp(modified),
        "name": attachment.name,
        "contentType": attachment.content_type,
        "size": len(attachment.content),
        "isInline": attachment.is_inline,
        "contentId": attachment.content_id,
        "contentLocation": None,
    }


def _domain(call: Call) -> str:
    return call.user.address.rsplit("@", 1)[-1]


def _draft(call: Call, data: dict[str, Any]) -> Draft:
    """Graph's message JSON, validated, as the sandbox's :class:`Draft`."""
    body = data.get("body") or {}
    if not isinstance(body, dict):
        raise bad_request("Property 'body' must be an object.")
    body_type = str(body.get("contentType", "text")).lower()
    if body_type not in ("text", "html"):
        raise bad_request("body.contentType must be text or html.")
    sender = _addresses([data["from"]], "from")[0] if data.get("from") else None
    return Draft(
        subject=str(data.get("subject") or ""),
        body_type=body_type,
        body=str(body.get("content") or ""),
        sender=sender or Address(call.user.display_name, call.user.address),
        to=_addresses(data.get("toRecipients"), "toRecipients"),
        cc=_addresses(data.get("ccRecipients"), "ccRecipients"),
        bcc=_addresses(data.get("bccRecipients"), "bccRecipients"),
        reply_to=_addresses(data.get("replyTo"), "replyTo"),
        headers=_headers(data.get("internetMessageHeaders")),
        attachments=tuple(_file_attachment(a) for a in data.get("attachments") or ()),
    )


def _addresses(value: Any, name: str) -> tuple[Address, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_request(f"Property '{name}' must be an array of recipients.")
    found = []
    for item in value:
        email = item.get("emailAddress") if isinstance(item, dict) else None
        if not isinstance(email, dict):
            email = {}
        address = email.get("address")
        if not isinstance(address, str) or "@" not in address:
            raise bad_request(
                f"At least one recipient is not valid., Recipient '{address or ''}' is not "
                "resolved. All recipients must be resolved before a message can be submitted.",
                "ErrorInvalidRecipients",
            )
        found.append(Address(str(email.get("name") or ""), address))
    return tuple(found)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    headers = []
    for item in value or ():
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.lower().startswith("x-"):
            raise bad_request(
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
                "InvalidInternetMessageHeader",
            )
        headers.append((name, str(item.get("value", ""))))
    return tuple(headers)


def _file_attachment(data: Any) -> FileAttachment:
    if not isinstance(data, dict) or str(data.get("@odata.type", "")).lower() != (
        "#microsoft.graph.fileattachment"
    ):
        raise bad_request("The sandbox accepts #microsoft.graph.fileAttachment attachments only.")
    try:
        content = base64.b64decode(str(data.get("contentBytes", "")), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("Invalid base64 string for attachment content.") from None
    return FileAttachment(
        id=new_attachment_id(),
        name=str(data.get("name") or "attachment"),
        content_type=str(data.get("contentType") or "application/octet-stream"),
        content=content,
        is_inline=bool(data.get("isInline", False)),
        content_id=data.get("contentId"),
    )
