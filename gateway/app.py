"""Build the whole gateway from settings and run it on the one shared loop.

The composition root: the only module that knows every layer, and does nothing else. It
builds the parts, wires them together, starts and stops them in order; what each part does
lives in that part (the view registry in ``mailbox``, both provider factories in
``providers``, send-as learning in ``send_as``, applying a reloaded config in ``reload``).
Frontends, core and providers never import it; the layers are listed in docs/DESIGN.md and
pinned by tests/unit/test_layers.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from . import __version__, metrics, outbound, providers, reload, tls
from .accounts import Accounts
from .admin import server as admin_server
from .config import Settings
from .imap_out import server as imap_server
from .login_gate import LoginGate, Refused, SqlFailureLog
from .logs import get_logger
from .mailbox import MailboxView, MailboxViews
from .notify import WebhookNotifier
from .oauth import TokenBroker
from .pop3_out import server as pop3_server
from .runtime import RunningListener, limits_from
from .send_as import SendAsLearner
from .smtp_in import server as smtp_server
from .spool import DatabaseSpool, FileSpool, SpoolWorker
from .store import (
    SecretBox,
    StoreError,
    Stores,
    load_or_create_key,
    open_postgresql,
    open_sqlite,
)

log = get_logger(__name__)


class StartError(Exception):
    """The gateway cannot start; the message says why and what to do, for the admin."""


class Gateway:
    """One running gateway: its store, TLS material and listeners."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stores: Stores | None = None
        self.broker: TokenBroker | None = None
        self.accounts = Accounts(settings.accounts)
        # One gate for every protocol and the admin page: guesses count together, and at most
        # a few scrypt checks run at once, whichever listener they came through.
        self.login_gate = LoginGate()
        self.http: httpx.AsyncClient | None = None
        self.trust: Path | None = None  # the outbound CA bundle, written at start
        self.spool: SpoolWorker | None = None
        self.smtp_front: smtp_server.SmtpFront | None = None
        self.senders: dict[str, providers.Sender] = {}
        self.send_as = SendAsLearner(self.accounts, self.senders)
        self._learning: asyncio.Task[None] | None = None
        self.views: MailboxViews | None = None  # the INBOX views, opened at first login
        self.listeners: dict[str, RunningListener] = {}
        self._pid_file: Path | None = None  # written once serving, removed at stop
        self._reloading = asyncio.Lock()  # one reload at a time

    @property
    def serving(self) -> bool:
        """Started and not stopping (the pid file exists): a reload may apply."""
        return self._pid_file is not None

    @property
    def ports(self) -> dict[str, int]:
        """Bound port per listener name (differs from the config when it asked for port 0)."""
        return {name: listener.port for name, listener in self.listeners.items()}

    async def start(self) -> None:
        settings = self.settings
        state_dir = settings.state_dir  # made by open_stores
        try:
            self.stores = await open_stores(settings)
        except StoreError as error:  # unreachable, unmigrated, another key: said, no traceback
            raise StartError(str(error)) from None
        try:
            await self._start_core()
            await self._start_listeners()
        except BaseException:
            await self.stop()
            raise
        broker = self._broker()
        if "admin" in self.ports and not settings.admin.public_url:
            broker.public_url = f"http://localhost:{self.ports['admin']}"
        if settings.admin.notify_webhook:
            assert self.trust is not None, "_start_core writes the CA bundle"
            broker.notifier = WebhookNotifier(
                settings.admin.notify_webhook, self.trust, broker.admin_url()
            )
        assert self.spool is not None
        metrics.watch_queue(self.spool.messages)
        self._pid_file = await asyncio.to_thread(reload.write_pid_file, state_dir)
        await self.stores.events.record_event("gateway.started", detail=f"version {__version__}")
        log.info(
            "gateway.started",
            version=__version__,
            pid=os.getpid(),
            state_dir=str(state_dir),
            config=str(settings.source),
            **self.ports,
        )

    async def _start_core(self) -> None:
        """Broker, provider senders and the spool: everything the listeners hand work to."""
        settings = self.settings
        assert self.stores is not None
        self.broker = TokenBroker(
            settings, self.stores.auth, self.stores.events, self.stores.coordination
        )
        self.trust = trust = outbound.trust_file(settings.state_dir, settings.ca_bundle)
        self.http = http = outbound.async_client(trust)
        self.senders.update(providers.senders(settings, http, self.broker, trust))
        if self.stores.backend == "postgresql":  # any instance may deliver any message
            self.spool = DatabaseSpool.from_settings(settings, self.senders, self.stores)
        else:
            self.spool = FileSpool.from_settings(settings, self.senders)
        await self.spool.start()
        self.broker.on_connected = self._on_connected
        # In the background: a slow provider must not hold up the listeners.
        usernames = [account.username for account in settings.accounts]
        self._learning = asyncio.create_task(self.send_as.learn_all(usernames))
        broker = self.broker
        self.views = MailboxViews(
            self.stores.mailboxes,
            self.accounts.get,
            lambda account: providers.mailbox_source(self.settings, account, http, broker, trust),
            broker.reconnect_needed,
            lambda: self.settings.reading,
            self.stores.coordination,  # one poller per account across instances
        )
        self.smtp_front = smtp_server.SmtpFront(
            settings,
            self.accounts,
            self.spool,
            account_state=self.broker.reconnect_needed,
            gate=self.login_gate,
        )
        if self.stores.backend == "postgresql":  # instances count failed logins together
            self.login_gate.failures = SqlFailureLog(self.stores.db)

    async def stop(self) -> None:
        """Stop taking work, finish or park what is in flight, then close; idempotent.

        Listeners close first (newest first), so nothing new arrives; the spool then lets
        in-flight sends finish (what remains stays on disk for the next start); last the store.
        """
        for name in reversed(list(self.listeners)):
            await self.listeners.pop(name).close()
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)
            self._pid_file = None
        if self._learning is not None:
            self._learning.cancel()
            self._learning = None
        if self.broker is not None:
            await self.broker.close()  # no more following other instances' connections
        if self.views is not None:
            await self.views.close()  # sizes learnt are saved, queued provider changes finish
            self.views = None
        if self.spool is not None:
            metrics.watch_queue(None)
            await self.spool.stop()
            self.spool = None
        upstream = self.senders.get("upstream")
        if isinstance(upstream, providers.UpstreamSender):
            await upstream.close()  # QUIT the pooled upstream SMTP sessions
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        if self.stores is not None:
            await self.stores.events.record_event("gateway.stopped")
            await self.stores.close()
            self.stores = None
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
        contexts = tls.server_tls(pair)
        hostname = settings.hostname
        # One set of caps for every listener: file descriptors are the process's.
        limits = limits_from(settings.listeners)
        front, spool, stores = self.smtp_front, self.spool, self.stores
        assert front is not None and spool is not None and stores is not None, "_start_core first"

        def smtp(implicit: bool) -> Any:
            return lambda name, host, port: smtp_server.serve(
                name, host, port, hostname, contexts.stdlib, implicit, front, limits
            )

        cleartext = settings.reading.plaintext_auth

        def reading(front: Any, implicit: bool) -> Any:
            """An IMAP or POP3 listener: both serve the same views with the same login."""
            return lambda name, host, port: front.serve(
                name,
                host,
                port,
                contexts.twisted,
                implicit,
                partial(self.login, protocol=name.rstrip("s")),
                self._mailbox_for,
                cleartext,
                limits=limits,
            )

        return {
            "smtp": smtp(False),
            "smtps": smtp(True),
            "imap": reading(imap_server, False),
            "imaps": reading(imap_server, True),
            "pop3": reading(pop3_server, False),
            "pop3s": reading(pop3_server, True),
            "admin": lambda name, host, port: admin_server.serve(
                name,
                host,
                port,
                settings,
                self._broker(),
                spool,
                lambda: self.ports,
                stores.db,
                gate=self.login_gate,
                limits=limits,
            ),
        }

    async def _on_connected(self, username: str) -> None:
        """A mailbox was (re)connected: send its held mail, learn its send-as aliases."""
        assert self.spool is not None
        await self.spool.release(username)
        await self.send_as.learn(username)

    async def login(
        self, username: str, password: str, client: str, protocol: str
    ) -> str | Refused:
        """The account name for a right password, else why not (IMAP and POP3 logins)."""
        outcome = await self.accounts.login(self.login_gate, client, username, password, protocol)
        return outcome if isinstance(outcome, Refused) else outcome.username

    async def _mailbox_for(self, username: str) -> MailboxView | str:
        assert self.views is not None, "start() opens the views before the listeners"
        return await self.views.view_for(username)

    def _broker(self) -> TokenBroker:
        assert self.broker is not None, "start() opens the store and builds the broker first"
        return self.broker

    async def reload(self) -> bool:
        """SIGHUP: re-read the config file and apply it if it validates (one reload at a
        time); what may change while running: :mod:`gateway.reload`."""
        async with self._reloading:
            return await reload.reload_config(self)

    async def run_until(
        self, stop: asyncio.Event, started: Callable[[], None] | None = None
    ) -> None:
        """Serve until ``stop`` is set; ``started`` is called once the gateway serves."""
        await self.start()
        if started is not None:
            started()
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


async def open_stores(settings: Settings) -> Stores:
    """The configured backend: PostgreSQL when ``store.url`` is set, else SQLite in state_dir.

    The secret key comes from the same place either way (``GATEWAY_SECRET_KEY`` or the key file
    in state_dir); on PostgreSQL every instance must have the same one (checked on open).
    """
    state_dir = settings.state_dir
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    box = SecretBox(await asyncio.to_thread(load_or_create_key, state_dir))
    if settings.store.url is None:
        return await open_sqlite(state_dir, box)
    return await open_postgresql(settings.store.url.value, box, settings.store.pool_size)
