"""Microsoft Graph sender: MIME sendMail, or draft + attachment upload sessions + send.

Graph caps every request body at 4 MB, and MIME goes base64-encoded, so sendMail takes messages
up to about 3 MB. A larger message becomes a MIME draft of itself *without* its big attachments
(so every original header survives), the attachments follow through upload sessions in ≤ 3 MiB
pieces (or, under 3 MiB, as JSON file attachments), and the draft is sent. The original bytes
are not copied: the spool file stays mapped, the draft is joined from slices of it, and each
upload piece is decoded from the few MiB of it that it needs (see ``_parts``).

Save-to-Sent: MIME sendMail always files the message in Sent Items ("This method saves the
message in the Sent Items folder"; only JSON sendMail has ``saveToSentItems``, and converting
MIME to Graph's JSON would lose headers and structure: user-sendMail, Graph v1.0 reference). So
with ``sending.save_to_sent: false`` every message goes the draft way, and the draft is given
PidTagDeleteAfterSubmit (MAPI property 0x0E01, PtypBoolean: "Indicates that the original message
is to be deleted after it is sent", MS-OXPROPS 2.669 / MS-OXOMSG 2.2.3.8) before it is sent,
through Graph's extended properties in proptag format ("{type} {proptag}": "Outlook extended
properties overview"; set on an existing message with PATCH ``singleValueExtendedProperties``:
"Create single-value extended property"). A MIME draft cannot carry the property in the request
that creates it (the body is the message), hence the PATCH. Mail.ReadWrite, which every
Microsoft account has, covers drafts and the PATCH. Without a Sent copy there is nothing to
look up after an interrupted attempt, so :meth:`GraphSender.already_sent` says "cannot tell".
"""

from __future__ import annotations

import asyncio
import base64
import math
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import quote

import httpx

from ..config import AccountSettings
from ..delivery import DeliveryResult, Envelope, Permanent, ReauthRequired, Temporary
from ..logs import get_logger
from ._base import TokenSource
from ._http import Api, classify, error_code, send
from ._mime import Message, Prepared, drop_pages, prepare
from ._parts import Attachment, attachments

log = get_logger(__name__)

REQUEST_CAP = 4 * 1024 * 1024 - 16 * 1024  # "The maximum request length supported is 4MB."
UPLOAD_MIN = 3 * 1024 * 1024  # smaller attachments may not use an upload session
UPLOAD_PIECE = 3 * 1024 * 1024  # "< 4 MB" per PUT; in order
DELETE_AFTER_SUBMIT = "Boolean 0x0E01"  # PidTagDeleteAfterSubmit, Graph's proptag id format
_HEADERS = BytesParser(policy=policy.default)


def _b64_size(size: int) -> int:
    return 4 * math.ceil(size / 3)


class GraphSender:
    reads_mapped_files = True  # the spool may pass its file mapped (see ``_mime.Message``)

    def concurrency(self, account: AccountSettings) -> int:
        """4 concurrent requests per app per mailbox ("Microsoft Graph service-specific
        throttling limits", https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits);
        more are answered 429."""
        return 4

    def __init__(self, client: httpx.AsyncClient, tokens: TokenSource, graph_url: str) -> None:
        self.client = client
        self.tokens = tokens
        self.graph_url = graph_url.rstrip("/")

    async def send(
        self, account: AccountSettings, envelope: Envelope, message: Message
    ) -> DeliveryResult:
        prepared = prepare(message, envelope)
        if prepared.dropped:
            log.info(
                "graph.recipients_dropped", account=account.username, count=len(prepared.dropped)
            )
        api = Api(self.client, self.tokens, account.username)
        keep_copy = account.sending.save_to_sent
        if keep_copy and _b64_size(prepared.size) <= REQUEST_CAP:
            body = prepared.body(as_base64=True)  # base64 encoded piece by piece as it is sent
            await api.call(
                "POST",
                f"{self._mailbox(account)}/sendMail",
                "Graph sendMail",
                content=body,
                headers={"Content-Type": "text/plain", "Content-Length": str(len(body))},
            )
            return DeliveryResult(f"graph sendMail accepted ({prepared.size} bytes)")
        return await self._send_draft(api, prepared, self._mailbox(account), keep_copy)

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        if not account.sending.save_to_sent:
            return None  # no Sent copy is filed, so not finding one proves nothing
        api = Api(self.client, self.tokens, account.username)
        literal = message_id.replace("'", "''")
        try:
            response = await api.call(
                "GET",
                f"{self._mailbox(account)}/mailFolders/sentitems/messages",
                "Graph Sent Items lookup",
                params={"$filter": f"internetMessageId eq '{literal}'", "$select": "id"},
            )
        except (Permanent, ReauthRequired):
            return None  # no Mail.Read (send-only consent), or a refused filter: cannot tell
        return bool(response.json().get("value"))

    def _mailbox(self, account: AccountSettings) -> str:
        """``/users/{address}``, not ``/me``: the same path serves a delegated token (the
        owner's own mailbox) and an app-only token (any mailbox of the tenant), where ``/me``
        is refused ("only valid with delegated authentication flow")."""
        return f"{self.graph_url}/users/{quote(account.address, safe='@')}"

    async def _send_draft(
        self, api: Api, prepared: Prepared, mailbox: str, keep_copy: bool
    ) -> DeliveryResult:
        """Draft, attachments that did not fit, send; without ``keep_copy`` the draft is marked
        to be deleted after submission instead of being moved to Sent Items."""
        raw = prepared.raw
        # Scanning a 30 MB MIME tree and encoding the draft take ~100 ms: off the shared loop.
        lifted, draft = await asyncio.to_thread(_split_draft, prepared)
        base = f"{mailbox}/messages"
        created = await api.call(
            "POST",
            base,
            "Graph create draft",
            content=draft,
            headers={"Content-Type": "text/plain"},
        )
        del draft
        message_url = f"{base}/{quote(str(created.json()['id']), safe='')}"
        try:
            if not keep_copy:
                await api.call(
                    "PATCH",
                    message_url,
                    "Graph mark draft delete-after-send",
                    json={
                        "singleValueExtendedProperties": [
                            {"id": DELETE_AFTER_SUBMIT, "value": "true"}
                        ]
                    },
                )
            await self._attach(api, message_url, raw, lifted)
        except BaseException:
            await _discard_draft(api, message_url)
            raise
        # Not after a failed /send: Graph may have sent it, and the draft is then the Sent copy
        # (or, marked delete-after-send, already gone).
        await api.call("POST", f"{message_url}/send", "Graph send draft")
        copy = "filed in Sent Items" if keep_copy else "no Sent Items copy"
        return DeliveryResult(
            f"graph draft sent with {len(lifted)} uploaded attachment(s), {copy} "
            f"({prepared.size} bytes)"
        )

    async def _attach(
        self, api: Api, message_url: str, raw: Message, lifted: list[Attachment]
    ) -> None:
        for attachment in lifted:
            if attachment.size >= UPLOAD_MIN:
                await self._upload(api, message_url, raw, attachment)
            else:
                await api.call(
                    "POST",
                    f"{message_url}/attachments",
                    "Graph add attachment",
                    json={
                        "@odata.type": "#microsoft.graph.fileAttachment",
                        **_describe(attachment),
                        "contentBytes": base64.b64encode(
                            b"".join(attachment.decoded(raw, UPLOAD_PIECE))
                        ).decode("ascii"),
                    },
                )

    async def _upload(self, api: Api, message_url: str, raw: Message, item: Attachment) -> None:
        session = await api.call(
            "POST",
            f"{message_url}/attachments/createUploadSession",
            "Graph create upload session",
            json={"AttachmentItem": {"attachmentType": "file", **_describe(item)}},
        )
        upload_url = str(session.json()["uploadUrl"])
        offset = 0
        pieces = item.decoded(raw, UPLOAD_PIECE)
        # Each piece is decoded in a worker thread (base64 of 3 MiB: ~40 ms) as it is needed,
        # from the encoded text it needs, so one piece at a time is in memory.
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            end = offset + len(piece) - 1
            # The URL is pre-authenticated: a bearer token here is refused (wrong audience).
            response = await send(
                self.client,
                "PUT",
                upload_url,
                "Graph attachment upload",
                content=piece,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {offset}-{end}/{item.size}",
                },
            )
            if response.status_code >= 300:
                error = classify(response, "Graph attachment upload")
                if isinstance(error, Permanent) and response.status_code != 413:
                    # An expired or lost session: the next attempt starts over with a new draft.
                    code, message = error_code(response)
                    raise Temporary(
                        f"Graph attachment upload: HTTP {response.status_code} {code}: {message}"
                    )
                raise error
            offset = end + 1


async def _discard_draft(api: Api, message_url: str) -> None:
    """A draft whose attachments could not all be added is deleted (the retry makes a new
    one), so failed attempts leave no half-built drafts in the mailbox; best effort."""
    try:
        await api.call("DELETE", message_url, "Graph delete unsent draft")
    except Exception as error:
        log.warning("graph.draft_left", reason=str(error))


def _split_draft(prepared: Prepared) -> tuple[list[Attachment], bytes]:
    """The attachments to upload separately, and the base64 draft of everything else, read
    from ``prepared.raw`` in place (a mapped file's pages are dropped once read)."""
    raw, lifted = prepared.raw, []
    if _b64_size(prepared.size) <= REQUEST_CAP:
        draft = prepared.joined()  # fits one request: nothing to lift
    else:
        head = _HEADERS.parsebytes(prepared.head, headersonly=True)
        lifted = _choose(attachments(raw, prepared.body_offset, head), prepared.size)
        draft = prepared.head + _without(raw, prepared.body_offset, lifted)
    drop_pages(raw, 0, len(raw))
    return lifted, base64.b64encode(draft)


def _describe(item: Attachment) -> dict[str, Any]:
    return {
        "name": item.name,
        "size": item.size,
        "contentType": item.content_type,
        "isInline": item.inline,
        "contentId": item.content_id,
    }


def _choose(found: list[Attachment], size: int) -> list[Attachment]:
    """The attachments to lift, largest first, until the rest fits one sendable request."""
    lifted: list[Attachment] = []
    for item in sorted(found, key=lambda a: a.size, reverse=True):
        if _b64_size(size) <= REQUEST_CAP:
            break
        if item.size < UPLOAD_MIN and _b64_size(item.size) + 4096 > REQUEST_CAP:
            raise Permanent(
                f"attachment {item.name!r} ({item.size} bytes) is too big for a Graph request "
                "and too small for an upload session",
                552,
                "5.3.4",
            )
        lifted.append(item)
        size -= item.cut_end - item.cut_start
    if _b64_size(size) > REQUEST_CAP:
        raise Permanent(
            "message too large for Graph: without its attachments it still exceeds the 4 MB "
            "request limit",
            552,
            "5.3.4",
        )
    return sorted(lifted, key=lambda a: a.cut_start)


def _without(raw: Message, start: int, lifted: list[Attachment]) -> bytes:
    """The body with the lifted parts cut out; a multipart left empty gets an empty text part."""
    newline = b"\r\n" if b"\r\n" in raw[:1000] else b"\n"
    emptied = {
        a.parent for a in lifted if sum(1 for b in lifted if b.parent == a.parent) == a.siblings
    }
    pieces, position, filled = [], start, set()
    for item in lifted:
        pieces.append(raw[position : item.cut_start])
        if item.parent in emptied and item.parent not in filled:
            filled.add(item.parent)
            pieces.append(
                newline + b"--" + item.boundary + newline
                + b"Content-Type: text/plain; charset=utf-8" + newline + newline
            )  # fmt: skip
        position = item.cut_end
    pieces.append(raw[position:])
    return b"".join(pieces)
