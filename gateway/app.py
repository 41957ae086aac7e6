"""Build the whole gateway from settings and run it on the one shared loop.

This is the only module that knows every layer; frontends, core and providers never import it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from . import __version__, outbound, tls
from .admin import server as admin_server
from .config import Settings
from .imap_out import server as imap_server
from .logs import get_logger
from .notify import WebhookNotifier
from .oauth import TokenBroker
from .pop3_out import server as pop3_server
from .runtime import RunningListener
from .smtp_in import server as smtp_server
from .store import SecretBox, Store, load_or_create_key

log = get_logger(__name__)


class StartError(Exception):
    """The gateway cannot start; the message says why and what to do, for the admin."""


class Gateway:
    """One running gateway: its store, TLS material and listeners."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self.broker: TokenBroker | None = None
        self.listeners: dict[str, RunningListener] = {}

    @property
    def ports(self) -> dict[str, int]:
        """Bound port per listener name (differs from the config when it asked for port 0)."""
        return {name: listener.port for name, listener in self.listeners.items()}

    async def start(self) -> None:
        settings = self.settings
        state_dir = settings.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = await asyncio.to_thread(load_or_create_key, state_dir)
        self.store = await Store.open(state_dir, SecretBox(key))
        self.broker = TokenBroker(settings, self.store)
        try:
            await self._start_listeners()
        except BaseException:
            await self.stop()
            raise
        if "admin" in self.ports and not settings.admin.public_url:
            self.broker.public_url = f"http://localhost:{self.ports['admin']}"
        if settings.admin.notify_webhook:
            trust = outbound.trust_file(state_dir, settings.ca_bundle)
            self.broker.notifier = WebhookNotifier(
                settings.admin.notify_webhook, trust, self.broker.admin_url()
            )
        await self.store.record_event("gateway.started", detail=f"version {__version__}")
        log.info(
            "gateway.started",
            version=__version__,
            pid=os.getpid(),
            state_dir=str(state_dir),
            config=str(settings.source),
            **self.ports,
        )

    async def stop(self) -> None:
        """Close listeners (newest first) and then the store; safe to call more than once."""
        for name in reversed(list(self.listeners)):
            await self.listeners.pop(name).close()
        if self.store is not None:
            await self.store.record_event("gateway.stopped")
            await self.store.close()
            self.store = None
            log.info("gateway.stopped")

    async def _start_listeners(self) -> None:
        starters = self._starters()
        host = self.settings.listeners.host
        for name, port in self.settings.listeners.ports().items():
            try:
                self.listeners[name] = await starters[name](name, host, port)
            except Exception as error:
                raise StartError(_listen_failure(name, host, port, error)) from error

    def _starters(self) -> dict[str, Callable[[str, str, int], Awaitable[RunningListener]]]:
        settings = self.settings
        if settings.tls.cert and settings.tls.key:
            pair = tls.CertificatePair(settings.tls.cert, settings.tls.key)
        else:
            pair = tls.ensure_certificate(settings.state_dir, settings.hostname)
        ssl_context = tls.server_context(pair)
        twisted_tls = tls.twisted_context_factory(pair)
        hostname = settings.hostname

        def smtp(implicit: bool) -> Any:
            return lambda name, host, port: smtp_server.serve(
                name, host, port, hostname, ssl_context, implicit
            )

        def twisted(module: Any, implicit: bool) -> Any:
            return lambda name, host, port: module.serve(name, host, port, twisted_tls, implicit)

        return {
            "smtp": smtp(False),
            "smtps": smtp(True),
            "imap": twisted(imap_server, False),
            "imaps": twisted(imap_server, True),
            "pop3": twisted(pop3_server, False),
            "pop3s": twisted(pop3_server, True),
            "admin": lambda name, host, port: admin_server.serve(
                name, host, port, settings, self._broker(), lambda: self.ports
            ),
        }

    def _broker(self) -> TokenBroker:
        assert self.broker is not None, "start() opens the store and builds the broker first"
        return self.broker

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


def _listen_failure(name: str, host: str, port: int, error: Exception) -> str:
    reason = getattr(error, "strerror", None) or str(error)
    return (
        f"cannot listen on {host}:{port} for listeners.{name}_port: {reason}. "
        f"Stop whatever uses that port, or choose another port in the config."
    )
