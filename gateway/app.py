"""Build the whole gateway from settings and run it on the one shared loop.

This is the only module that knows every layer; frontends, core and providers never import it.
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
from .config import AccountSettings, ConfigError, Settings, load_settings
from .imap_out import server as imap_server
from .login_gate import LoginGate, Refused
from .logs import get_logger
from .mailbox import BodyCache, MailboxView, ReadingPolicy
from .notify import WebhookNotifier
from .oauth import OAuthError, TokenBroker
from .pop3_out import server as pop3_server
from .runtime import RunningListener, limits_from
from .smtp_in import server as smtp_server
from .spool import FileSpool
from .store import SecretBox, Stores, load_or_create_key, open_sqlite

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
        self._trust: Path | None = None  # the outbound CA bundle, written at start
        self.spool: FileSpool | None = None
        self.smtp_front: smtp_server.SmtpFront | None = None
        self.senders: dict[str, providers.Sender] = {}
        self._learning: asyncio.Task[None] | None = None
        self.views: dict[str, MailboxView] = {}
        self.listeners: dict[str, RunningListener] = {}
        self._pid_file: Path | None = None  # written once serving, removed at stop
        self._reloading = asyncio.Lock()  # one reload at a time

    @property
    def ports(self) -> dict[str, int]:
        """Bound port per listener name (differs from the config when it asked for port 0)."""
        return {name: listener.port for name, listener in self.listeners.items()}

    async def start(self) -> None:
        settings = self.settings
        state_dir = settings.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = await asyncio.to_thread(load_or_create_key, state_dir)
        self.stores = await open_sqlite(state_dir, SecretBox(key))
        try:
            await self._start_core()
            await self._start_listeners()
        except BaseException:
            await self.stop()
            raise
        if "admin" in self.ports and not settings.admin.public_url:
            self.broker.public_url = f"http://localhost:{self.ports['admin']}"
        if settings.admin.notify_webhook:
            self.broker.notifier = WebhookNotifier(
                settings.admin.notify_webhook, self._trust, self.broker.admin_url()
            )
        assert self.spool is not None
        metrics.watch_queue(self.spool.messages)
        self._pid_file = reload.pid_file(state_dir)
        await asyncio.to_thread(_write_pid_file, self._pid_file)
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
        self.broker = TokenBroker(settings, self.stores.auth, self.stores.events)
        self._trust = outbound.trust_file(settings.state_dir, settings.ca_bundle)
        self.http = outbound.async_client(self._trust)
        self.senders = providers.senders(settings, self.http, self.broker, self._trust)
        self.spool = FileSpool.from_settings(settings, self.senders)
        await self.spool.start()
        self.broker.on_connected = self._on_connected
        # In the background: a slow provider must not hold up the listeners.
        self._learning = asyncio.create_task(self._learn_all_send_as())
        self.smtp_front = smtp_server.SmtpFront(
            settings,
            self.accounts,
            self.spool,
            account_state=self.broker.reconnect_needed,
            gate=self.login_gate,
        )

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
        for view in self.views.values():
            await view.close()  # sizes learnt are saved, queued provider changes finish
        self.views.clear()
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

        def smtp(implicit: bool) -> Any:
            return lambda name, host, port: smtp_server.serve(
                name, host, port, hostname, contexts.stdlib, implicit, self.smtp_front, limits
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
                self.spool,
                lambda: self.ports,
                gate=self.login_gate,
                limits=limits,
            ),
        }

    async def _on_connected(self, username: str) -> None:
        """A mailbox was (re)connected: send its held mail, learn its send-as aliases."""
        assert self.spool is not None
        await self.spool.release(username)
        await self._learn_send_as(username)

    async def _learn_all_send_as(self) -> None:
        for account in self.settings.accounts:
            await self._learn_send_as(account.username)

    async def _learn_send_as(self, username: str) -> None:
        """Let the SMTP front accept the provider's verified send-as aliases as From (Gmail).

        Microsoft has no API that lists Send As rights; there, ``sending.allowed_from`` names
        them and Graph refuses the rest (ErrorSendAsDenied).
        """
        sender = self.senders.get("google")
        account = self.accounts.get(username)
        if not isinstance(sender, providers.GmailSender) or account is None:
            return
        if account.provider != "google":
            return
        try:
            aliases = await sender.send_as_addresses(account)
        except (OAuthError, providers.Temporary, providers.Permanent) as error:
            log.info("smtp.send_as_unknown", account=username, reason=str(error))
            return
        self.accounts.set_send_as_aliases(username, aliases)
        log.info("smtp.send_as_learned", account=username, aliases=len(aliases))

    async def login(
        self, username: str, password: str, client: str, protocol: str
    ) -> str | Refused:
        """The account name for a right password, else why not (IMAP and POP3 logins)."""
        outcome = await self.accounts.login(self.login_gate, client, username, password, protocol)
        return outcome if isinstance(outcome, Refused) else outcome.username

    async def _mailbox_for(self, username: str) -> MailboxView | str:
        """The account's INBOX view (one per account, shared by every session), or the sentence
        saying why it cannot be served."""
        reconnect = await self._broker().reconnect_needed(username)
        if reconnect:
            return reconnect
        view = self.views.get(username)
        if view is None:
            account = self.accounts.get(username)
            source = self._mailbox_source(account)
            if account is None or source is None:
                return "This account has no INBOX to read (its upstream has no imap or pop3 server)"
            assert self.stores is not None
            reading = self.settings.reading
            view = await MailboxView.open(
                self.stores.mailboxes,
                username,
                source,
                BodyCache(reading.cache_mb * 1024 * 1024),
                ReadingPolicy(account.reading.mirror_flags, account.reading.on_delete),
                reading.poll_seconds,
            )
            self.views[username] = view
        return view

    def _mailbox_source(self, account: AccountSettings | None) -> providers.MailboxSource | None:
        settings, http, broker = self.settings, self.http, self._broker()
        if account is None or http is None:
            return None
        if account.provider == "microsoft":
            graph = settings.microsoft.graph_url
            return providers.GraphSource(http, broker, graph, account.username, account.address)
        if account.provider == "google":
            return providers.GmailSource(http, broker, settings.google.gmail_url, account.username)
        upstream, trust = account.upstream, self._trust
        if upstream is None or trust is None:
            return None
        if upstream.imap is not None:
            return providers.UpstreamImapSource(upstream.imap, trust)
        if upstream.pop3 is not None:
            return providers.UpstreamPop3Source(upstream.pop3, trust)
        return None

    def _broker(self) -> TokenBroker:
        assert self.broker is not None, "start() opens the store and builds the broker first"
        return self.broker

    # -- reload (SIGHUP) -----------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file; apply it if it validates, else keep the running one.

        Every problem is logged as check-config reports it (file, line, key, fix). What can
        change while running and what needs a restart: :mod:`gateway.reload`.
        """
        source = self.settings.source
        if source is None or self._pid_file is None:
            log.warning("gateway.reload_ignored", reason="not serving (starting or stopping)")
            return False
        async with self._reloading:
            return await self._reload_from(source)

    async def _reload_from(self, source: Path) -> bool:
        try:
            new = await asyncio.to_thread(load_settings, source)
        except ConfigError as error:
            for problem in error.problems:
                log.error(
                    "gateway.reload_problem",
                    file=str(error.file),
                    line=problem.line,
                    key=problem.key,
                    problem=problem.message,
                    fix=problem.fix,
                )
            log.error(
                "gateway.reload_refused",
                config=str(source),
                problems=len(error.problems),
                detail="the running config stays in force; fix the file and reload again",
            )
            metrics.reloaded("refused")
            return False
        await self.apply(new)
        metrics.reloaded("applied")
        return True

    async def apply(self, new: Settings) -> None:
        """Switch to ``new`` (validated) without closing a listener or a connection."""
        old = self.settings
        for key in reload.needing_restart(old, new):
            log.warning("gateway.reload_needs_restart", key=key, detail="restart to apply it")
        released = reload.changed_accounts(old, new)
        kept = reload.keep_restart_only(old, new)
        self.settings = kept
        self.accounts.replace(kept.accounts)
        broker, spool = self._broker(), self.spool
        broker.reconfigure(kept)
        assert spool is not None and self.smtp_front is not None and self.http is not None
        self.smtp_front.smtp = kept.smtp
        spool.accounts = {a.username: a for a in kept.accounts}
        spool.deliver_inline = kept.smtp.deliver_inline
        spool.retry_window = kept.spool.retry_hours * 3600.0
        spool.max_backoff = kept.spool.max_backoff_minutes * 60.0
        spool.first_backoff = float(kept.spool.first_backoff_seconds)
        fresh = providers.senders(kept, self.http, broker, self._trust or Path())
        self.senders.update(microsoft=fresh["microsoft"], google=fresh["google"])
        await self._reopen_mailboxes(old, kept)
        for username in sorted(released):
            count = await spool.release(username)
            if count:
                log.info("gateway.reload_released", account=username, messages=count)
        log.info(
            "gateway.reloaded",
            config=str(kept.source),
            accounts=len(kept.accounts),
            changed_accounts=",".join(sorted(released)) or "-",
        )

    async def _reopen_mailboxes(self, old: Settings, new: Settings) -> None:
        """Close the INBOX view of an account whose mailbox settings changed (or which is
        gone): the next login opens one with the new settings. Its sessions open at the
        reload were reading the old mailbox and must log in again."""
        before = {a.username: a for a in old.accounts}
        after = {a.username: a for a in new.accounts}
        for username in list(self.views):
            if reload.mailbox_changed(before.get(username), after.get(username)):
                view = self.views.pop(username)
                await view.close()
                log.info("gateway.reload_mailbox_reopened", account=username)

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


def _write_pid_file(path: Path) -> None:
    """For ``gateway reload``: which process reads this state directory."""
    path.write_text(f"{os.getpid()}\n", encoding="ascii")


def _listen_failure(name: str, host: str, port: int, error: Exception) -> str:
    reason = getattr(error, "strerror", None) or str(error)
    return (
        f"cannot listen on {host}:{port} for listeners.{name}_port: {reason}. "
        f"Stop whatever uses that port, or choose another port in the config."
    )
