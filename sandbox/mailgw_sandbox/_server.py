"""The sandbox server: one HTTPS origin on loopback serving both fake clouds and the control API.

Paths do not collide: Microsoft sign-in lives under ``/{tenant}/...`` (MSAL insists the tenant
is the first path segment of the authority), Graph under ``/v1.0/``, Google sign-in under
``/o/oauth2/`` and ``/token``, Gmail under ``/gmail/``, ``/upload/`` and ``/resumable/``, and the
control API under ``/_sandbox/``. The server certificate comes from a CA the sandbox makes, so
the real msal, google-auth and httpx clients verify it like any cloud endpoint.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from aiohttp import web

from gateway import tls
from gateway.logs import get_logger

from ._control import ControlApi
from ._directory import App, Directory, Provider, User
from ._faults import FaultPlan, middleware
from ._provider import Context, MailboxOps, ProviderSandbox
from ._throttle import Throttle
from .google import GoogleSandbox
from .microsoft import MicrosoftSandbox

log = get_logger(__name__)

MAX_REQUEST_BYTES = 160 * 1024 * 1024  # above both clouds' upload caps, so *they* answer 413


class Sandbox:
    """A local Microsoft 365 + Google Workspace. ``await start()``, use :attr:`url`, ``stop()``."""

    def __init__(
        self,
        state_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port
        self.context = Context(Directory(clock), FaultPlan())
        self.microsoft = MicrosoftSandbox(self.context)
        self.google = GoogleSandbox(self.context)
        self.throttle = Throttle(self.context.directory)  # per-mailbox limits (see _throttle)
        self._providers: dict[Provider, ProviderSandbox] = {
            "microsoft": self.microsoft,
            "google": self.google,
        }
        self._runner: web.AppRunner | None = None
        self._pair: tls.CertificatePair | None = None

    @property
    def directory(self) -> Directory:
        return self.context.directory

    @property
    def faults(self) -> FaultPlan:
        return self.context.faults

    @property
    def url(self) -> str:
        """The origin clients use; ``localhost`` because that is the name the certificate holds."""
        return f"https://localhost:{self.port}"

    @property
    def ca_file(self) -> Path:
        assert self._pair is not None and self._pair.ca is not None, "start() the sandbox first"
        return self._pair.ca

    def application(self) -> web.Application:
        app = web.Application(
            # Outermost, the throttle sees (and counts) the faults' answers too.
            middlewares=[self.throttle.middleware(), middleware(self.faults)],
            client_max_size=MAX_REQUEST_BYTES,
        )
        for provider in self._providers.values():
            provider.add_routes(app)
        ControlApi(self).add_routes(app)
        return app

    async def start(self) -> None:
        pair = self._pair or tls.create_ca_signed_pair(
            self.state_dir / "tls", "sandbox", "localhost"
        )
        self._pair = pair
        runner = web.AppRunner(self.application(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=tls.server_context(pair))
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("sandbox.started", url=self.url, ca_file=str(pair.ca))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ops(self, user: User) -> MailboxOps:
        return self._providers[user.provider].ops

    def add_app(
        self,
        provider: Provider,
        client_id: str | None = None,
        *,
        redirect_uris: Iterable[str] = (),
        public_client_redirect_uris: Iterable[str] = (),
        allow_public_client_flows: bool = False,
        secret: bool = True,
        desktop: bool = False,
        app_permissions: Iterable[str] = (),
        name: str = "app",
    ) -> App:
        """Register an OAuth client; ids and secrets look like the real ones.

        Microsoft: ``redirect_uris`` go under the Web platform, ``public_client_redirect_uris``
        under Mobile and desktop applications; ``secret`` adds a client secret (a public client
        has none). Google: ``desktop`` makes a "Desktop app" client instead of a "Web
        application"; Google gives every client a secret.
        """
        if provider == "microsoft":
            client_id = client_id or str(uuid.uuid4())
            client_secret = secrets.token_urlsafe(30) if secret else None
        else:
            client_id = client_id or (
                f"{secrets.randbelow(10**12):012d}-{secrets.token_hex(16)}.apps.googleusercontent.com"
            )
            client_secret = "GOCSPX-" + secrets.token_urlsafe(21)
        app = App(
            provider=provider,
            client_id=client_id,
            client_secret=client_secret,
            redirect_uris=tuple(redirect_uris),
            public_client_redirect_uris=tuple(public_client_redirect_uris),
            allow_public_client_flows=allow_public_client_flows,
            desktop=desktop,
            app_permissions=frozenset(app_permissions),
            name=name,
        )
        return self.directory.add_app(app)

    def add_user(
        self,
        provider: Provider,
        address: str,
        display_name: str | None = None,
        send_as: Iterable[str] = (),
    ) -> User:
        """Create a person with a mailbox at ``provider``."""
        user = User(
            provider=provider,
            address=address,
            display_name=display_name or address.split("@")[0].replace(".", " ").title(),
            send_as=tuple(send_as),
        )
        if provider == "microsoft":
            user.tenant_id = self.microsoft.tenant_id
        else:
            user.id = str(10**20 + secrets.randbelow(9 * 10**20))
        return self.directory.add_user(user)
