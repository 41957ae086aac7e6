"""Microsoft identity platform + Graph mail, emulated. (Skeleton: being filled in.)"""

from __future__ import annotations

import uuid

from aiohttp import web

from .._provider import Context


class MicrosoftSandbox:
    provider = "microsoft"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.tenant_id = str(uuid.uuid4())
        self.ops = None

    def add_routes(self, app: web.Application) -> None:
        return None
