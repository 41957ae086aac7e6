"""Gmail batch requests: ``POST /batch/gmail/v1`` with up to 100 calls in ``multipart/mixed``.

From "Batching requests" (https://developers.google.com/gmail/api/guides/batch): each part
is ``Content-Type: application/http`` (with an optional ``Content-ID``) whose body is a whole
HTTP request with only the path of the URL (full URLs are not allowed); at most 100 calls
per batch; the outer request's headers, except ``Content-*`` ones, apply to every call
unless the call sets the same header, and its query parameters apply to every call; the
calls run in an unspecified order; the answer is ``multipart/mixed``, one
``application/http`` part per call holding that call's whole HTTP response, with
``Content-ID: response-<id>`` for a call that had one. "A set of n requests batched
together counts toward your usage limit as n requests, not as one request": every call is
dispatched through the sandbox application (see ``.._batch``), so the per-user quota units
are charged per call and a call over the quota is answered 429 inside a 200 batch. The
guide warns that batches larger than 50 calls are likely to trigger rate limiting; the
sandbox does not model that heuristic (the per-user quota it does model applies either way).
A malformed batch is 400 as a whole; its wording is the sandbox's.
"""

from __future__ import annotations

import re
import secrets
from http import HTTPStatus

from aiohttp import web

from .. import _batch, _errors

MAX_CALLS = 100
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


class GmailBatch:
    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/batch/gmail/v1", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        found = _BOUNDARY.search(request.headers.get("Content-Type", ""))
        if request.content_type != "multipart/mixed" or found is None:
            return _bad("A batch request must be multipart/mixed with a boundary.")
        try:
            calls = _split(await request.content.read(), found.group(1).encode())
        except ValueError as error:
            return _bad(str(error))
        shared = {
            k: v
            for k, v in request.headers.items()
            if not k.lower().startswith("content-")
            and k.lower() not in ("host", "transfer-encoding")
        }
        boundary = "batch_" + secrets.token_urlsafe(12)
        parts = []
        for content_id, method, target, headers, body in calls:
            if request.query_string:
                target += ("&" if "?" in target else "?") + request.query_string
            response = await _batch.dispatch(request, method, target, {**shared, **headers}, body)
            parts.append(_part(boundary, content_id, response))
        payload = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return web.Response(
            body=payload, headers={"Content-Type": f"multipart/mixed; boundary={boundary}"}
        )


def _bad(message: str) -> web.Response:
    return _errors.google_api_error(400, "badRequest", message)


Call = tuple[str | None, str, str, dict[str, str], bytes]


def _split(raw: bytes, boundary: bytes) -> list[Call]:
    """The calls of a batch body, in order; ValueError for anything malformed."""
    delimiter = b"--" + boundary
    if delimiter + b"--" not in raw:
        raise ValueError("The batch body does not end with its closing boundary.")
    sections = raw.split(b"--" + boundary + b"--", 1)[0].split(delimiter)[1:]
    if not sections:
        raise ValueError("The batch holds no calls.")
    if len(sections) > MAX_CALLS:
        raise ValueError(f"A batch may hold at most {MAX_CALLS} calls.")
    return [_call(section) for section in sections]


def _call(section: bytes) -> Call:
    part_head, _, request = section.lstrip(b"\r\n").partition(b"\r\n\r\n")
    part_headers = _headers(part_head)
    if part_headers.get("content-type", "").split(";")[0].strip() != "application/http":
        raise ValueError("Every part of a batch must be Content-Type: application/http.")
    head, _, body = request.partition(b"\r\n\r\n")
    line, _, rest = head.partition(b"\r\n")
    fields = line.decode("latin-1").split()
    if len(fields) not in (2, 3) or not fields[1].startswith("/"):
        raise ValueError("Each call must be a request line with only the path of the URL.")
    content_id = part_headers.get("content-id")
    if content_id is not None:
        content_id = content_id.strip().strip("<>")
    headers = {k: v for k, v in _raw_headers(rest)}
    return content_id, fields[0].upper(), fields[1], headers, body.removesuffix(b"\r\n")


def _raw_headers(block: bytes) -> list[tuple[str, str]]:
    pairs = []
    for line in block.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            pairs.append((name.strip(), value.strip()))
    return pairs


def _headers(block: bytes) -> dict[str, str]:
    return {name.lower(): value for name, value in _raw_headers(block)}


def _part(boundary: str, content_id: str | None, response: web.Response) -> bytes:
    head = f"--{boundary}\r\nContent-Type: application/http\r\n"
    if content_id is not None:
        head += f"Content-ID: <response-{content_id}>\r\n"
    reason = HTTPStatus(response.status).phrase
    inner = f"HTTP/1.1 {response.status} {reason}\r\n"
    for name, value in response.headers.items():
        if name.lower() != "content-length":
            inner += f"{name}: {value}\r\n"
    body = _batch.body_bytes(response)
    inner += f"Content-Length: {len(body)}\r\n\r\n"
    return (head + "\r\n" + inner).encode("latin-1") + body + b"\r\n"
