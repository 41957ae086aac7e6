"""Graph JSON batching: ``POST /v1.0/$batch`` with up to 20 requests.

From "Combine multiple HTTP requests using JSON batching" (https://learn.microsoft.com/graph/json-batching):
the body is ``{"requests": [{"id", "method", "url", "headers"?, "body"?, "dependsOn"?}]}``
with URLs relative to the version (``/users/{id}/messages/{id}/$value``); at most 20
requests; the batch answers 200 whenever it could be parsed, and each inner request carries
its own ``status``, ``headers`` and ``body`` in ``{"responses": [...]}``, in any order. A
malformed batch (not JSON, no ``requests``, more than 20, a request without id/method/url,
two with the same id, a ``dependsOn`` naming no request of the batch) is 400 as a whole. A
response body that is not JSON is base64-encoded (as for a request body that is not JSON;
Microsoft Q&A "Using Batching With the Graph API Returns the Body Response As Base64",
https://learn.microsoft.com/en-us/answers/questions/1352007, confirms it by design).

Throttling: every inner request is evaluated against the limits on its own (see
``.._batch``): the 10,000 requests per 10 minutes per app and mailbox count each inner
request, and an inner request over a limit is answered 429 inside a 200 batch. For Outlook
resources Graph executes at most 4 inner requests in parallel, or one after another when
they use ``dependsOn`` ("Microsoft Graph service-specific throttling limits", section
"Outlook service batching", https://learn.microsoft.com/graph/throttling-limits); they hold
slots of the mailbox's concurrency limit of 4 like any request, so a client that has other
requests in flight for the same mailbox can see inner 429 ``ApplicationThrottled``.
The wording of the 400 messages below is the sandbox's: Microsoft does not document it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from aiohttp import web

from .. import _batch
from .graph import GraphError, bad_request, read_limited

MAX_REQUESTS = 20
OUTLOOK_PARALLEL = 4


class JsonBatch:
    """The ``$batch`` endpoint; inner requests go through the whole Graph front door."""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1.0/$batch", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            requests = _parse(await read_limited(request))
        except GraphError as error:
            return error.response()
        authorization = request.headers.get("Authorization", "")
        sequential = any(item.get("dependsOn") for item in requests)
        slots = asyncio.Semaphore(1 if sequential else OUTLOOK_PARALLEL)

        async def run(item: dict[str, Any]) -> dict[str, Any]:
            async with slots:
                return await _one(request, item, authorization)

        responses = await asyncio.gather(*(run(item) for item in requests))
        return web.json_response({"responses": list(responses)})


def _parse(raw: bytes) -> list[dict[str, Any]]:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    requests = data.get("requests") if isinstance(data, dict) else None
    if not isinstance(requests, list) or not requests:
        raise bad_request("Invalid batch payload format.")
    if len(requests) > MAX_REQUESTS:
        raise bad_request(f"Number of requests in the batch exceeds the limit of {MAX_REQUESTS}.")
    ids: set[str] = set()
    for item in requests:
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) and item[k] for k in ("id", "method", "url")
        ):
            raise bad_request("Every request of a batch needs an id, a method and a url.")
        if item["id"] in ids:
            raise bad_request(f"Batch request contains duplicate id '{item['id']}'.")
        if item["url"].lower().startswith(("http:", "https:")):
            raise bad_request("The url of a request in a batch must be relative.")
        ids.add(item["id"])
    for item in requests:
        depends = item.get("dependsOn", [])
        if not isinstance(depends, list) or not set(depends) <= ids:
            raise bad_request("dependsOn must name requests of the same batch.")
    return requests


async def _one(outer: web.Request, item: dict[str, Any], authorization: str) -> dict[str, Any]:
    headers = {str(k): str(v) for k, v in (item.get("headers") or {}).items()}
    if authorization:
        headers.setdefault("Authorization", authorization)
    body = item.get("body")
    if body is None:
        raw = b""
    elif isinstance(body, dict | list):
        raw = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    else:
        raw = base64.b64decode(str(body))
    url = item["url"] if item["url"].startswith("/") else "/" + item["url"]
    response = await _batch.dispatch(outer, item["method"].upper(), "/v1.0" + url, headers, raw)
    content = _batch.body_bytes(response)
    answer: dict[str, Any] = {"id": item["id"], "status": response.status}
    kept = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    if kept:
        answer["headers"] = kept
    if content:
        if (response.content_type or "").endswith("json"):
            answer["body"] = json.loads(content)
        else:
            answer["body"] = base64.b64encode(content).decode("ascii")
    return answer
