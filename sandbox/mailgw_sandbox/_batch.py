"""Running the inner requests of a batch (Graph ``$batch``, Gmail ``/batch/gmail/v1``).

Both services execute every inner request as if it had been sent alone: its own
authorization, its own status code, and its own charge against the throttling limits
(Graph: "Combine multiple HTTP requests using JSON batching", https://learn.microsoft.com/graph/json-batching;
Gmail: "Batching requests", https://developers.google.com/gmail/api/guides/batch: "A set of n
requests batched together counts toward your usage limit as n requests, not as one request").
So an inner request is dispatched through the whole sandbox application, middlewares
included (the per-mailbox throttle counts it and may answer it 429); only the network
latency of the fault plan is not added again, since an inner request crosses no network.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.streams import StreamReader

INNER = web.RequestKey("sandbox_batch_inner", bool)  # set on inner requests

MAX_INNER_BODY = 4 * 1024 * 1024


async def dispatch(
    outer: web.Request, method: str, path_qs: str, headers: dict[str, str], body: bytes
) -> web.Response:
    """The answer ``outer``'s application gives to one inner request."""
    inner = outer.clone(method=method, rel_url=path_qs, headers=headers)
    reader = StreamReader(outer.protocol, 2**16, loop=asyncio.get_running_loop())
    if body:
        reader.feed_data(body)
    reader.feed_eof()
    inner._payload = reader  # clone() shared the outer body, already read
    inner[INNER] = True
    response = await outer.app._handle(inner)  # routing plus middlewares
    if not isinstance(response, web.Response):
        raise web.HTTPInternalServerError(text="a batched request answered with a stream")
    return response


def body_bytes(response: web.Response) -> bytes:
    body = response.body
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    raise TypeError(f"unexpected payload {type(body).__name__}")
