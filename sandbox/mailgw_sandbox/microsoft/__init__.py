"""Microsoft identity platform (v2.0) + Microsoft Graph mail, emulated for one tenant.

Sign-in lives under ``/{tenant}/...`` (discovery, authorize, token, devicecode) plus the
``/devicelogin`` page; Graph under ``/v1.0/``; attachment uploads under Outlook's
``/api/v2.0/``. See ``docs/provider-apis.md`` sections A, B and F for the behaviour.
"""

from __future__ import annotations

import asyncio
import uuid

from aiohttp import web

from .._directory import Provider
from .._provider import Context
from .authorize import Authorize
from .batch import JsonBatch
from .delta import delta
from .device import DeviceFlow
from .graph import Graph, Route
from .identity import Identity
from .mailstore import MailStore
from .messages import MailApi
from .ops import OutlookOps
from .scopes import READ_MAIL, WRITE_MAIL
from .signing import Certificate
from .token import TokenEndpoint
from .uploads import Uploads

__all__ = ["MicrosoftSandbox"]


class MicrosoftSandbox:
    provider: Provider = "microsoft"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.tenant_id = str(uuid.uuid4())
        self.identity = Identity(context, self.tenant_id)
        self.authorize = Authorize(self.identity)
        self.device = DeviceFlow(self.identity)
        self.token = TokenEndpoint(self.identity, self.authorize, self.device)
        self.store = MailStore(lambda: context.directory.clock())  # tests may swap the clock
        self.ops = OutlookOps(self.store)
        self.mail = MailApi()
        self.uploads = Uploads(self.tenant_id, lambda: self.mail.max_message_bytes)
        self.graph = Graph(context.directory, self.store, self._routes())

    def _routes(self) -> list[Route]:
        folder_delta = ("mailfolders", "{folder}", "messages", "delta")
        upload = ("messages", "{id}", "attachments", "createuploadsession")
        extra = [
            Route("GET", folder_delta, READ_MAIL, delta),
            Route("POST", upload, WRITE_MAIL, self.uploads.create),
        ]
        return extra + self.mail.routes()

    def add_routes(self, app: web.Application) -> None:
        JsonBatch().add_routes(app)  # before Graph's catch-all /v1.0/{tail}
        for part in (self.identity, self.authorize, self.device, self.token, self.graph):
            part.add_routes(app)
        self.uploads.add_routes(app)

    # -- helpers for tests and the demo -----------------------------------------------------

    @property
    def max_message_bytes(self) -> int:
        """The tenant's maximum message size (35 MB by default; admins may raise it)."""
        return self.mail.max_message_bytes

    @max_message_bytes.setter
    def max_message_bytes(self, value: int) -> None:
        self.mail.max_message_bytes = value

    def approve_device_code(self, user_code: str, address: str) -> None:
        """Sign ``address`` in on the device showing ``user_code``, as if on /devicelogin."""
        self.device.approve(user_code, address)

    def deny_device_code(self, user_code: str) -> None:
        self.device.deny(user_code)

    def set_device_poll_interval(self, seconds: int) -> None:
        """How often devices are told to poll (Entra says 5; tests use 1 to stay fast)."""
        self.device.interval = seconds

    def register_certificate(self, client_id: str, pem: bytes) -> None:
        """Register a certificate (public part) the app may sign client assertions with."""
        self.identity.certificates.setdefault(client_id, []).append(Certificate.from_pem(pem))

    def hold_graph_requests(self) -> asyncio.Event:
        """Until the returned event is set, Graph mailbox requests wait holding their slot.

        Makes the four-concurrent-requests limit testable without timing races.
        """
        return self.graph.hold()
