"""messages.send through Google's upload protocols: media, multipart/related and resumable.

The resumable session URL is absolute and minted on the sandbox's own origin, since clients must
follow it verbatim (provider-apis.md 0.4). Chunks answer 308 with ``Range`` until the declared
length is in; the last one answers with the sent Message.

Every PUT of a session must carry a valid bearer token of the user who opened it (401 without
one, or with a revoked or expired one, exactly as the API's other calls answer). Google's
"Uploading Attachments" guide for Gmail (developers.google.com/gmail/api/guides/uploads,
"Resumable upload") shows the PUTs as authorized requests and never documents the session URI
alone as a credential, and Google's client libraries send ``Authorization`` on every request
of an upload session (googleapiclient ``HttpRequest.next_chunk`` PUTs through the authorized
transport). A sandbox that took a bare session URI would hide a client that leaves it out.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from email.message import Message

from aiohttp import web

from .api import (
    STANDARD_PARAMS,
    Caller,
    Gate,
    GmailError,
    check_params,
    invalid,
    json_object,
    read_capped,
)
from .gmail import (
    MAX_JSON_REQUEST_BYTES,
    MAX_MESSAGE_BYTES,
    MESSAGE_FIELDS,
    json_too_large,
    send_message,
    upload_too_large,
)
from .mailstore import GmailStore
from .oauth import origin

PATHS = (
    "/upload/gmail/v1/users/{userId}/messages/send",
    "/resumable/upload/gmail/v1/users/{userId}/messages/send",
)
MULTIPART_OVERHEAD = 64 * 1024  # room for the JSON part and the boundaries around the message
SESSION_LIFETIME = 7 * 24 * 3600
_CONTENT_RANGE = re.compile(r"^bytes (?:(?P<first>\d+)-(?P<last>\d+)|\*)/(?P<total>\d+|\*)$")
_PART_BREAK = re.compile(rb"\r?\n\r?\n")


@dataclass
class UploadSession:
    caller: Caller
    thread_id: object
    total: int | None
    expires_at: float
    data: bytearray = field(default_factory=bytearray)

    def range_header(self) -> dict[str, str]:
        """``Range: bytes=0-N`` of what is stored; absent while nothing is."""
        return {"Range": f"bytes=0-{len(self.data) - 1}"} if self.data else {}


def _unsupported_media(media_type: str) -> GmailError:
    return GmailError(
        400,
        "badContent",
        f"Media type '{media_type}' is not supported. Valid media types: [message/*]",
    )


def _check_media_type(media_type: str) -> None:
    if not media_type.lower().startswith("message/"):
        raise _unsupported_media(media_type)


class Uploads:
    def __init__(self, gate: Gate, store: GmailStore) -> None:
        self.gate = gate
        self.store = store
        self._sessions: dict[str, UploadSession] = {}

    def add_routes(self, app: web.Application) -> None:
        for path in PATHS:
            app.router.add_post(path, self.gate.endpoint("messages.send", self.start))
            app.router.add_put(path, self.chunk)

    async def start(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        upload_type = request.query.get("uploadType", "")
        if upload_type == "media":
            _check_media_type(request.content_type)
            raw = await read_capped(request, MAX_MESSAGE_BYTES, upload_too_large)
            return send_message(self.store, caller, raw)
        if upload_type == "multipart":
            data = await read_capped(
                request, MAX_MESSAGE_BYTES + MULTIPART_OVERHEAD, upload_too_large
            )
            metadata, raw = _split_related(request.headers.get("Content-Type", ""), data)
            return send_message(self.store, caller, raw, metadata.get("threadId"))
        if upload_type == "resumable":
            return await self._open_session(request, caller)
        raise invalid(f"Invalid uploadType: {upload_type}")

    async def _open_session(self, request: web.Request, caller: Caller) -> web.Response:
        _check_media_type(request.headers.get("X-Upload-Content-Type", "message/rfc822"))
        declared = request.headers.get("X-Upload-Content-Length")
        total = int(declared) if declared and declared.isdigit() else None
        if total is not None and total > MAX_MESSAGE_BYTES:
            raise upload_too_large()
        metadata = json_object(
            await read_capped(request, MAX_JSON_REQUEST_BYTES, json_too_large), MESSAGE_FIELDS
        )
        upload_id = "AHVrFx" + secrets.token_urlsafe(60)
        self._sessions[upload_id] = UploadSession(
            caller=caller,
            thread_id=metadata.get("threadId"),
            total=total,
            expires_at=self.store.directory.clock() + SESSION_LIFETIME,
        )
        location = f"{origin(request)}{request.path}?uploadType=resumable&upload_id={upload_id}"
        return web.Response(
            status=200, headers={"Location": location, "X-GUploader-UploadID": upload_id}
        )

    async def chunk(self, request: web.Request) -> web.StreamResponse:
        """One PUT of a resumable upload: the bearer token, then the session."""
        try:
            check_params(request, STANDARD_PARAMS | {"upload_id"})
            caller = self.gate.authenticate(request, "messages.send")
            return await self._chunk(request, caller)
        except GmailError as error:
            return error.response()

    async def _chunk(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        upload_id = request.query.get("upload_id", "")
        session = self._sessions.get(upload_id)
        if session is None or session.expires_at <= self.store.directory.clock():
            self._sessions.pop(upload_id, None)
            raise GmailError(404, "notFound", "Upload session not found or expired.")
        if caller.user is not session.caller.user:
            raise GmailError(403, "forbidden", "The upload session belongs to another user.")
        data = await read_capped(request, MAX_MESSAGE_BYTES, upload_too_large)
        first, total = _content_range(request.headers.get("Content-Range"), len(data))
        if total is not None:
            if session.total is not None and total != session.total:
                raise invalid("The total length differs from the one declared for this upload.")
            session.total = total
        if session.total is not None and session.total > MAX_MESSAGE_BYTES:
            del self._sessions[upload_id]
            raise upload_too_large()
        if first is not None and first <= len(session.data):
            session.data += data[len(session.data) - first :]  # resent bytes are ignored
        if session.total is not None and len(session.data) >= session.total:
            del self._sessions[upload_id]
            if len(session.data) > session.total:
                raise invalid("More bytes were sent than the upload declared.")
            return send_message(self.store, session.caller, bytes(session.data), session.thread_id)
        return web.Response(status=308, headers=session.range_header())


def _content_range(header: str | None, length: int) -> tuple[int | None, int | None]:
    """(first byte, total) of a chunk; (None, total) for a status query ``bytes */N``.

    Without the header the body is the whole upload, as in a single-request resumable upload.
    """
    if header is None:
        return 0, length
    match = _CONTENT_RANGE.match(header.strip())
    if match is None:
        raise invalid("Failed to parse Content-Range header.")
    total = None if match["total"] == "*" else int(match["total"])
    if match["first"] is None:
        return None, total
    first, last = int(match["first"]), int(match["last"])
    if last - first + 1 != length or (total is not None and last >= total):
        raise invalid("Failed to parse Content-Range header.")
    return first, total


def _split_related(content_type: str, data: bytes) -> tuple[dict[str, object], bytes]:
    """The JSON metadata and the message of a ``multipart/related`` upload (two parts)."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/related" or not isinstance(boundary, str):
        raise _unsupported_media(header.get_content_type())
    parts = _parts(data, boundary.encode())
    if len(parts) != 2:
        raise invalid(f"Invalid multipart request with {len(parts)} mime parts.")
    (meta_type, meta), (media_type, media) = parts
    if meta_type != "application/json":
        raise _unsupported_media(meta_type)
    _check_media_type(media_type)
    return json_object(meta, MESSAGE_FIELDS), media


def _parts(data: bytes, boundary: bytes) -> list[tuple[str, bytes]]:
    """(content type, body) of each part; the line break before a delimiter belongs to it."""
    parts = []
    for segment in data.split(b"--" + boundary)[1:]:
        if segment.startswith(b"--"):
            break
        segment = segment.removeprefix(b"\r\n").removeprefix(b"\n")
        segment = segment.removesuffix(b"\n").removesuffix(b"\r")
        if segment.startswith((b"\r\n", b"\n")):
            head, body = b"", segment.split(b"\n", 1)[1]
        else:
            found = _PART_BREAK.search(segment)
            head, body = (segment[: found.start()], segment[found.end() :]) if found else (b"", b"")
        headers = Message()
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        parts.append((headers.get_content_type(), body))
    return parts
