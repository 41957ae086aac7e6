"""Attachment upload sessions: how attachments of 3 MB to 150 MB reach a draft.

``createUploadSession`` (a Graph call, Mail.ReadWrite) answers an absolute, pre-authenticated
``uploadUrl`` on Outlook's own API (``/api/v2.0/...?authtoken=``), outside ``/v1.0`` and so
outside Graph's throttling. The client PUTs the bytes there in order, without an Authorization
header (a Graph token is for another audience), each chunk at most 4 MB, with Content-Range.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import quote

from aiohttp import web

from .graph import Call, GraphError, bad_request, read_limited
from .identity import origin
from .mailstore import Mailbox, new_attachment_id
from .mime import FileAttachment
from .views import timestamp

MIN_UPLOAD_BYTES = 3 * 1024 * 1024
SESSION_LIFETIME = timedelta(hours=2)
_PATH = "/api/v2.0/Users('{user}')/Messages('{message}')/AttachmentSessions('{session}')"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass
class UploadSession:
    token: str
    mailbox: Mailbox
    message_id: str  # immutable id
    name: str
    content_type: str
    size: int
    is_inline: bool
    content_id: str | None
    expires: datetime
    received: bytearray = field(default_factory=bytearray)


class Uploads:
    def __init__(self, tenant_id: str, max_message_bytes: Callable[[], int]) -> None:
        self.tenant_id = tenant_id
        self._max_message_bytes = max_message_bytes
        self.sessions: dict[str, UploadSession] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_put(_PATH, self.put)
        app.router.add_delete(_PATH, self.cancel)

    def create(self, call: Call) -> web.Response:
        """``POST /messages/{id}/attachments/createUploadSession``."""
        message = call.message()
        item = call.json().get("AttachmentItem")
        if not isinstance(item, dict) or str(item.get("attachmentType", "")).lower() != "file":
            raise bad_request("AttachmentItem with attachmentType 'file' is required.")
        size = item.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or not item.get("name"):
            raise bad_request("AttachmentItem needs a name and an integer size.")
        if size < MIN_UPLOAD_BYTES:
            raise bad_request(
                "Attachment size must be greater than the minimum size.",
                "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
            )
        if size > self._max_message_bytes():
            raise bad_request(
                "The message exceeds the maximum supported size.", "ErrorMessageSizeExceeded"
            )
        session_id = secrets.token_urlsafe(24)
        session = UploadSession(
            token=secrets.token_urlsafe(48),
            mailbox=call.mailbox,
            message_id=message.immutable_id,
            name=str(item["name"]),
            content_type=str(item.get("contentType") or "application/octet-stream"),
            size=size,
            is_inline=bool(item.get("isInline", False)),
            content_id=item.get("contentId"),
            expires=call.mailbox.now() + SESSION_LIFETIME,
        )
        self.sessions[session_id] = session
        url = f"{call.origin}{self._path(session, session_id)}?authtoken={session.token}"
        return call.respond(
            {
                "@odata.context": f"{call.origin}/v1.0/$metadata#microsoft.graph.uploadSession",
                "uploadUrl": url,
                "expirationDateTime": timestamp(session.expires),
                "nextExpectedRanges": ["0-"],
            },
            status=201,
        )

    def _path(self, session: UploadSession, session_id: str) -> str:
        user = f"{session.mailbox.user.id}@{self.tenant_id}"
        return _PATH.format(
            user=user, message=quote(session.message_id, safe=""), session=session_id
        )

    def _session(self, request: web.Request) -> tuple[str, UploadSession]:
        session_id = request.match_info["session"]
        session = self.sessions.get(session_id)
        if session is None or session.expires <= session.mailbox.now():
            raise GraphError(
                404, "ErrorItemNotFound", "The upload session was not found or has expired."
            )
        if not hmac.compare_digest(request.query.get("authtoken", ""), session.token):
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure.")
        if "Authorization" in request.headers:
            raise GraphError(
                401,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience. The upload URL is "
                "pre-authenticated; send it no Authorization header.",
            )
        return session_id, session

    async def put(self, request: web.Request) -> web.StreamResponse:
        try:
            session_id, session = self._session(request)
            body = await read_limited(request)
            start = self._check_range(request, session, len(body))
            session.received += body
            if len(session.received) < session.size:
                return web.json_response(
                    {
                        "@odata.context": f"{origin(request)}/api/v2.0/$metadata#Users('')"
                        "/Messages('')/AttachmentSessions/$entity",
                        "ExpirationDateTime": timestamp(session.expires),
                        "nextExpectedRanges": [str(start + len(body))],
                    }
                )
            return self._complete(request, session_id, session)
        except GraphError as error:
            return error.response()

    def _check_range(self, request: web.Request, session: UploadSession, length: int) -> int:
        match = _CONTENT_RANGE.fullmatch(request.headers.get("Content-Range", "").strip())
        if match is None:
            raise bad_request("The Content-Range header is missing or malformed.", "invalidRange")
        start, end, total = (int(group) for group in match.groups())
        if total != session.size or end < start or end - start + 1 != length or end >= total:
            raise bad_request(
                f"The Content-Range 'bytes {start}-{end}/{total}' does not match the body or "
                f"the session size {session.size}.",
                "invalidRange",
            )
        expected = len(session.received)
        if start < expected:
            raise GraphError(
                416,
                "fragmentOverlap",
                "The uploaded fragment overlaps with data that has already been received.",
            )
        if start > expected:
            raise GraphError(
                416,
                "fragmentOutOfOrder",
                f"The uploaded fragment is out of order; expected bytes from {expected}.",
            )
        return start

    def _complete(
        self, request: web.Request, session_id: str, session: UploadSession
    ) -> web.Response:
        del self.sessions[session_id]
        message = session.mailbox.find(session.message_id)
        if message is None:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        attachment = FileAttachment(
            id=new_attachment_id(),
            name=session.name,
            content_type=session.content_type,
            content=bytes(session.received),
            is_inline=session.is_inline,
            content_id=session.content_id,
        )
        message.attachments.append(attachment)
        session.mailbox.touch(message)
        path = self._path(session, session_id).rsplit("/", 1)[0]
        location = f"{origin(request)}{path}/Attachments('{quote(attachment.id, safe='')}')"
        return web.Response(status=201, headers={"Location": location})

    async def cancel(self, request: web.Request) -> web.Response:
        try:
            session_id, _ = self._session(request)
        except GraphError as error:
            return error.response()
        del self.sessions[session_id]
        return web.Response(status=204)
