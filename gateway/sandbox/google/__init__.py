"""Google OAuth 2.0 + the Gmail API, emulated. (Skeleton: being filled in.)"""

from __future__ import annotations

from aiohttp import web

from .._provider import Context


class GoogleSandbox:
    provider = "google"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.ops = None

    def add_routes(self, app: web.Application) -> None:
        return None
