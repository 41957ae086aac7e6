"""The admin web listener (aiohttp on the shared loop).

For now it serves a status page and ``/healthz`` (used by the Docker healthcheck). Account
connection and sign-in come with the OAuth work; until then the page says so.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping

from aiohttp import web

from .. import __version__
from ..runtime import RunningListener

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

ListenerView = Callable[[], Mapping[str, int]]


def _status_page(listeners: Mapping[str, int]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{port}</td></tr>" for name, port in listeners.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Mail gateway</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 1em auto; padding: 0 1em">
<h1>Mail gateway {html.escape(__version__)}</h1>
<p>The gateway is running. Connecting mailboxes from this page is not available in this version
yet.</p>
<h2>Listeners</h2>
<table><tr><th>listener</th><th>port</th></tr>{rows}</table>
</body></html>
"""


def build_app(listeners: ListenerView) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=_status_page(listeners()), content_type="text/html")

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    @web.middleware
    async def security_headers(request: web.Request, handler):  # type: ignore[no-untyped-def]
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app = web.Application(middlewares=[security_headers])
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(name: str, host: str, port: int, listeners: ListenerView) -> RunningListener:
    runner = web.AppRunner(build_app(listeners), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return RunningListener(name, runner.addresses[0], runner.cleanup)
