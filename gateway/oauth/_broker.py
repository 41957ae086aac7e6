"""The token broker: every part of the gateway asks it for an access token, by account.

It keeps access tokens in memory and each grant's material (refresh token and newest access
token) encrypted in the store; refreshes ahead of expiry, one refresh at a time per account
however many SMTP/IMAP sessions ask at once; and when a grant is gone it marks the account
"needs re-consent", records it, tells the admin once, and makes every caller fail with a
sentence that names the admin page.

Several instances may share one store (PostgreSQL). A user's grant is then refreshed by one of
them at a time: every refresh holds the cluster-wide lock ``refresh:<account>`` and, inside
it, first re-reads the stored grant, whose access token another instance may have renewed a
moment ago; only when that one is stale (or is the one the provider just refused) does it ask
the provider. Without it, instances whose tokens expire together would each redeem the same
refresh token and each store its own answer, the last write winning: Entra keeps a used
refresh token valid ("Refresh tokens in the Microsoft identity platform"), but a provider that
treats a reused refresh token as stolen (RFC 9700 §4.14.2) would revoke the grant. Every
change of an account's connection (connected, disconnected, needs re-consent) is announced on
the ``auth`` channel, so the other instances drop the access token they hold and run what
follows a connection there too (held mail, send-as aliases). A sign-in started on one
instance (Connect, a consent link) is kept in the store until the provider sends the browser
back, so it completes on whichever instance the callback reaches (``_pending``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from .. import metrics, outbound
from ..config import AccountSettings, Settings
from ..logs import get_logger, register_secret
from ..store import AccountAuth, AuthStore, Coordination, EventLog, StoreError
from . import _scopes
from ._errors import AuthUnavailable, ConsentError, ReauthRequired
from ._google import GoogleAuth, GoogleClient
from ._microsoft import MicrosoftAuth
from ._pending import PendingSignIn, state_hash
from ._tokens import REFRESH_MARGIN, AccessToken, Connected

log = get_logger(__name__)

AUTH_CHANNEL = "auth"  # notices: {"account": name, "from": instance} after a connection change
PENDING_LIFETIME = timedelta(minutes=15)  # a sign-in must come back within 15 minutes
NOT_STARTED_HERE = "this sign-in response was not started here or has expired; start again"
CONSENT_LINK_LIFETIME = timedelta(days=3)
GOOGLE_CLIENT_ID_SETTING = "google.client_id"
GOOGLE_CLIENT_CREDENTIAL = "google.client_secret"  # the name of the encrypted entry

Notifier = Callable[[str, str], Awaitable[None]]  # (account, message)


@dataclass(frozen=True)
class AccountStatus:
    """What the admin page and ``gateway accounts`` show for one account."""

    account: AccountSettings
    state: str  # not_connected | connected | needs_reconsent | app_only | upstream
    principal: str | None = None
    scopes: tuple[str, ...] = ()
    needed: tuple[_scopes.ScopeNeed, ...] = ()
    missing: tuple[_scopes.ScopeNeed, ...] = ()
    since: datetime | None = None
    last_error: str | None = None
    token_expires: datetime | None = None  # of the access token in memory, if any


class TokenBroker:
    def __init__(
        self,
        settings: Settings,
        auth: AuthStore,
        events: EventLog,
        coordination: Coordination,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.events = events
        self.coordination = coordination
        self.notifier = notifier
        trust = outbound.trust_file(settings.state_dir, settings.ca_bundle)
        session = lambda: outbound.requests_session(trust)  # noqa: E731 - a factory per call
        self.microsoft = MicrosoftAuth(settings.microsoft, session)
        self.google = GoogleAuth(settings.google, session)
        self._accounts = {a.username: a for a in settings.accounts}
        self._tokens: dict[str, AccessToken] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.clock: Callable[[], float] = time.time  # wall clock of sign-in expiry (tests set it)
        self.refresh_count: dict[str, int] = {}  # per account; observable by tests and status
        # Called with the username after a mailbox is connected (the spool releases held mail).
        self.on_connected: Callable[[str], Awaitable[None]] | None = None
        # Where browsers reach the admin page; the app sets the bound port once it listens.
        self.public_url = settings.admin.public_url or (
            f"http://localhost:{settings.listeners.admin_port}"
        )
        self._instance = secrets.token_hex(8)  # tells this broker's notices from the others'
        self._followers: set[asyncio.Task[None]] = set()
        self._listened = False  # the channel's first "may have missed" (None) came
        self._unsubscribe = coordination.subscribe(AUTH_CHANNEL, self._on_auth_notice)

    async def close(self) -> None:
        """Stop following other instances' connection changes."""
        self._unsubscribe()
        for task in list(self._followers):
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)

    def reconfigure(self, settings: Settings) -> None:
        """Take a reloaded config: accounts and provider settings. Access tokens of accounts
        whose settings changed, or of every account when the provider's settings changed, are
        forgotten, so the next request gets one under the new settings."""
        old = self.settings
        for account in settings.accounts:
            provider_changed = getattr(old, account.provider, None) != getattr(
                settings, account.provider, None
            )
            if provider_changed or self._accounts.get(account.username) != account:
                self.invalidate(account.username)
        self.settings = settings
        self.microsoft.settings = settings.microsoft
        self.google.settings = settings.google
        self._accounts = {a.username: a for a in settings.accounts}

    # -- access tokens -------------------------------------------------------------------------

    async def access_token(self, username: str) -> str:
        """A valid access token for this account's mailbox; refreshes when needed.

        Raises ReauthRequired (a person must connect the mailbox) or AuthUnavailable (retry).
        """
        cached = self._tokens.get(username)
        if cached and cached.fresh(time.time(), REFRESH_MARGIN):
            return cached.value
        async with self._lock(username):  # single flight: the first refreshes, the rest reuse
            cached = self._tokens.get(username)
            if cached and cached.fresh(time.time(), REFRESH_MARGIN):
                return cached.value
            return await self._renew(username, rejected=None, claims=None)

    async def refreshed_token(self, username: str, rejected: str, claims: str | None = None) -> str:
        """A newly issued access token to replace ``rejected``, which the provider refused
        (HTTP 401: revoked by continuous access evaluation, a password reset, an admin).

        Callers that saw the same token refused queue on the account's lock; the first renews
        it and the others find it already replaced and take the new one: one refresh however
        many were refused. The renewal takes the stored grant's access token if another
        instance has already replaced the refused one; otherwise it forces a refresh (asking
        MSAL again without forcing would return the refused token from its cache), with the
        401's ``claims`` challenge if it carried one. A grant that is gone raises
        ReauthRequired after marking the account "needs re-consent" (and telling the admin
        once).
        """
        async with self._lock(username):
            cached = self._tokens.get(username)
            if cached and cached.value != rejected and cached.fresh(time.time(), REFRESH_MARGIN):
                return cached.value
            self.invalidate(username)
            return await self._renew(username, rejected, claims)

    def invalidate(self, username: str) -> None:
        """Forget the access token held in memory (disconnected, reconnected, or revoked)."""
        self._tokens.pop(username, None)

    def _lock(self, username: str) -> asyncio.Lock:
        return self._locks.setdefault(username, asyncio.Lock())

    async def _renew(self, username: str, rejected: str | None, claims: str | None) -> str:
        account = self.account(username)
        token = await metrics.token_refresh(
            account.provider, self._obtain(account, rejected, claims)
        )
        self._tokens[username] = token
        register_secret(token.value)
        return token.value

    async def _obtain(
        self, account: AccountSettings, rejected: str | None, claims: str | None
    ) -> AccessToken:
        """A token for the account, not ``rejected``. App-only and service-account tokens are
        always newly requested (nothing is stored between calls, and no refresh token can be
        spent twice); a user's comes from the stored grant, under the cluster-wide lock."""
        if account.provider == "microsoft" and self.settings.microsoft.app_only:
            self._count_refresh(account.username)
            return await asyncio.to_thread(self.microsoft.app_only, claims)
        if account.provider == "google" and self.settings.google.service_account_file:
            self._count_refresh(account.username)
            info = json.loads(self.settings.google.service_account_file.read_text())
            scopes = [need.scope for need in self.needed(account)]
            return await asyncio.to_thread(
                self.google.service_account, info, account.address, scopes
            )
        try:
            async with self._grant_lock(account.username):
                return await self._from_grant(account, rejected, claims)
        except StoreError as error:
            message = (
                f"cannot read or write the mailbox's sign-in in the gateway's state store: {error}"
            )
            raise AuthUnavailable(message) from error

    def _count_refresh(self, username: str) -> None:
        """One more token request to the provider (observable by tests and status)."""
        self.refresh_count[username] = self.refresh_count.get(username, 0) + 1

    @contextlib.asynccontextmanager
    async def _grant_lock(self, username: str) -> AsyncIterator[None]:
        """Hold ``refresh:<account>`` across the cluster: one instance at a time reads, renews
        and writes the account's grant. Not getting the lock (the store unreachable) is
        AuthUnavailable; failing to release it is ignored, since it ends with its session."""
        lock = self.coordination.exclusive(f"refresh:{username}")
        try:
            await lock.__aenter__()
        except Exception as error:
            raise AuthUnavailable(
                f"cannot take the refresh lock in the gateway's state store: {error}"
            ) from error
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await lock.__aexit__(None, None, None)

    async def _from_grant(
        self, account: AccountSettings, rejected: str | None, claims: str | None
    ) -> AccessToken:
        """Under the grant lock: the stored grant's access token if it is fresh and not
        ``rejected`` (whichever instance obtained it), else a refresh, whose new material is
        stored before the lock is let go."""
        auth = await self.auth.get_account_auth(account.username)
        if auth is None or auth.token is None:
            raise ReauthRequired(self._reauth_message(account, "it has not been connected yet"))
        if auth.state == "needs_reconsent":
            raise ReauthRequired(self._reauth_message(account, auth.last_error or "consent lost"))
        try:
            token = await self._refresh_user(account, auth, force=False, claims=None)
            if token.value == rejected:  # nobody replaced it yet: ask the provider for a new one
                token = await self._refresh_user(account, auth, force=True, claims=claims)
        except ReauthRequired as error:
            await self._mark_reconsent(account, auth, str(error))
            raise ReauthRequired(self._reauth_message(account, str(error))) from error
        if token.new_token is not None:  # the provider was asked: keep the newest material
            self._count_refresh(account.username)
            await self.auth.put_account_auth(replace(auth, token=token.new_token))
        return token

    async def _refresh_user(
        self, account: AccountSettings, auth: AccountAuth, force: bool, claims: str | None
    ) -> AccessToken:
        """The stored access token or, when it is stale or ``force``, a refreshed one."""
        assert auth.token is not None and auth.principal is not None
        scopes = list(auth.scopes) or [n.scope for n in self.needed(account)]
        if account.provider == "microsoft":
            resource = [s for s in scopes if s.startswith(_scopes.GRAPH)]
            return await asyncio.to_thread(
                self.microsoft.refresh, auth.token, auth.principal, resource, force, claims
            )
        client = await self.google_client()
        return await asyncio.to_thread(self.google.refresh, client, auth.token, scopes, force)

    async def _mark_reconsent(self, account: AccountSettings, auth: AccountAuth, why: str) -> None:
        marked = replace(
            auth,
            state="needs_reconsent",
            reconsent_since=datetime.now(UTC),
            last_error=why,
            admin_notified=True,
        )
        await self.auth.put_account_auth(marked)
        await self._announce(account.username)
        await self.events.record_event("oauth.needs_reconsent", account.username, why)
        log.warning("oauth.needs_reconsent", account=account.username, reason=why)
        metrics.reconsent_needed(account.provider)
        self.invalidate(account.username)
        if self.notifier is not None and not auth.admin_notified:
            await self.notifier(account.username, self._reauth_message(account, why))

    async def reconnect_needed(self, username: str) -> str | None:
        """A sentence for the legacy client when the mailbox cannot be used until a person
        connects it (again) on the admin page; None when it is connected or needs no consent."""
        status = await self.status(username)
        if status.state == "needs_reconsent":
            why = status.last_error or "its consent was revoked or expired"
            return self._reauth_message(status.account, why)
        if status.state == "not_connected":
            return self._reauth_message(status.account, "it has not been connected yet")
        return None

    def _reauth_message(self, account: AccountSettings, why: str) -> str:
        return (
            f"The mailbox {account.address} must be connected again by its owner ({why}); "
            f"open the gateway's admin page at {self.admin_url()}"
        )

    def admin_url(self) -> str:
        return self.public_url

    def account(self, username: str) -> AccountSettings:
        """The configured account; ReauthRequired if there is none by that name."""
        try:
            return self._accounts[username]
        except KeyError:
            raise ReauthRequired(f"there is no account {username!r}") from None

    # -- consent ------------------------------------------------------------------------------

    def redirect_uri(self) -> str:
        return f"{self.admin_url()}/oauth/callback"

    def needed(self, account: AccountSettings) -> tuple[_scopes.ScopeNeed, ...]:
        if account.provider == "microsoft":
            if self.settings.microsoft.app_only:
                return _scopes.MICROSOFT_APP_ONLY
            return _scopes.microsoft_delegated()
        if account.provider == "google":
            writes = account.reading.writes
            if self.settings.google.service_account_file:
                return _scopes.google_service_account(writes)
            return _scopes.google_user(writes)
        return ()

    async def begin_consent(self, username: str, link_token: str | None = None) -> str:
        """Start a sign-in for this account; return the provider URL to send the browser to.

        With ``link_token`` the sign-in comes from a consent link, which must be live and is
        spent only when the mailbox is connected (see :meth:`complete_consent`): a provider
        error or an abandoned sign-in leaves it usable.
        """
        account = self.account(username)
        link = None
        if link_token is not None:
            link = _link_hash(link_token)
            if await self.auth.peek_consent_link(link, datetime.now(UTC)) != username:
                raise ConsentError("this consent link was already used or has expired")
        scopes = [need.scope for need in self.needed(account)]
        await self.auth.prune_pending_sign_ins(self._now())
        if account.provider == "microsoft":
            flow = await asyncio.to_thread(
                self.microsoft.start, scopes, self.redirect_uri(), account.address
            )
            await self._keep_pending(flow["state"], PendingSignIn(username, flow, link=link))
            return flow["auth_uri"]
        if account.provider == "google":
            client = await self.google_client()
            url, started = self.google.start(client, scopes, self.redirect_uri(), account.address)
            await self._keep_pending(
                started.state, PendingSignIn(username, google=started, link=link)
            )
            return url
        raise ConsentError(f"account {username!r} uses a password server; nothing to connect")

    async def complete_consent(self, response: Mapping[str, str]) -> AccountStatus:
        """Finish the sign-in the browser came back from, on whichever instance started it;
        the state must be one we issued, not used before and not older than PENDING_LIFETIME."""
        pending = await self._take_pending(response.get("state", ""))
        account = self.account(pending.account)
        if pending.microsoft_flow is not None:
            connected = await asyncio.to_thread(
                self.microsoft.finish, pending.microsoft_flow, response
            )
        else:
            assert pending.google is not None
            client = await self.google_client()
            connected = await asyncio.to_thread(
                self.google.finish, client, pending.google, response
            )
        _check_owner(account, connected)
        if pending.link is not None:  # one connection per link: spent now, not at the click
            if await self.auth.use_consent_link(pending.link, datetime.now(UTC)) is None:
                raise ConsentError("this consent link was already used or has expired")
            await self.events.record_event("oauth.consent_link_used", account.username)
        await self.save_connection(account, connected)
        return await self.status(account.username)

    async def connect_with_device_code(
        self, username: str, show: Callable[[str], None]
    ) -> AccountStatus:
        """Device code sign-in for machines without a browser (Microsoft only).

        ``show`` receives Microsoft's instruction ("open ... and enter the code ..."); this
        returns once the owner has signed in elsewhere, or raises ConsentError.
        """
        account = self.account(username)
        if account.provider != "microsoft":
            raise ConsentError(
                "Google does not allow Gmail scopes in the device flow; create a consent link "
                "with `gateway connect` (without --device) and open it in a browser instead"
            )
        scopes = [need.scope for need in self.needed(account)]
        flow = await asyncio.to_thread(self.microsoft.start_device_flow, scopes)
        show(flow["message"])
        connected = await asyncio.to_thread(self.microsoft.finish_device_flow, flow)
        await self.save_connection(account, connected)
        return await self.status(username)

    async def save_connection(self, account: AccountSettings, connected: Connected) -> None:
        """Keep a completed consent, after checking that the mailbox's owner gave it."""
        _check_owner(account, connected)
        auth = AccountAuth(
            account=account.username,
            provider=account.provider,
            state="connected",
            principal=connected.principal,
            scopes=connected.scopes,
            token=connected.token,
        )
        async with self._grant_lock(account.username):  # not under a refresh's write
            await self.auth.put_account_auth(auth)
        await self._announce(account.username)
        await self.events.record_event("oauth.connected", account.username, connected.principal)
        self._tokens.pop(account.username, None)
        log.info("oauth.connected", account=account.username, principal=connected.principal)
        if self.on_connected is not None:
            await self.on_connected(account.username)

    async def create_consent_link(self, username: str) -> tuple[str, datetime]:
        """A one-time link for the mailbox owner (no admin password needed); (url, expiry).

        Only the hash of its token is stored, so a copy of the database cannot be used to
        consent. The link connects the mailbox once: it is spent when a sign-in through it
        completes (not when it is opened), and dies after ``CONSENT_LINK_LIFETIME``.
        """
        account = self.account(username)
        if account.provider == "upstream":
            raise ConsentError(f"account {username!r} uses a password server; nothing to connect")
        token = secrets.token_urlsafe(32)
        expires = datetime.now(UTC) + CONSENT_LINK_LIFETIME
        await self.auth.add_consent_link(_link_hash(token), username, expires)
        await self.events.record_event("oauth.consent_link_created", username)
        return f"{self.admin_url()}/consent/{token}", expires

    async def consent_link_account(self, token: str) -> AccountSettings | None:
        """The account a live link is for, without spending it (None if used or expired)."""
        username = await self.auth.peek_consent_link(_link_hash(token), datetime.now(UTC))
        return self._accounts.get(username or "")

    async def disconnect(self, username: str) -> None:
        self.account(username)
        async with self._grant_lock(username):  # a refresh in flight must not write it back
            await self.auth.delete_account_auth(username)
        await self._announce(username)
        await self.events.record_event("oauth.disconnected", username)
        self._tokens.pop(username, None)

    # -- other instances' changes --------------------------------------------------------------

    async def _announce(self, username: str) -> None:
        """Tell every instance (this one too) that the account's connection changed. Renewed
        tokens are not announced: an instance's access token stays good until it expires or
        the provider refuses it, and then the stored grant is read again anyway."""
        notice = json.dumps({"account": username, "from": self._instance})
        try:
            await self.coordination.notify(AUTH_CHANNEL, notice)
        except Exception as error:  # the change is stored; the others see it at their refresh
            log.warning("oauth.announce_failed", account=username, error=str(error))

    def _on_auth_notice(self, payload: str | None) -> None:
        """An account's connection changed somewhere, or (None) notices may have been missed:
        drop the access tokens held for it, and where another instance connected a mailbox,
        do here what follows a connection (``on_connected``). The first None only says that
        the channel is now listened to: this broker, just made, has nothing older to redo."""
        try:
            notice = json.loads(payload) if payload is not None else {}
            accounts = [notice["account"]] if payload is not None else list(self._accounts)
            elsewhere = notice.get("from") != self._instance
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("oauth.bad_notice", payload=payload)
            return
        for username in accounts:
            self.invalidate(username)
        if payload is None and not self._listened:
            self._listened = True
            return
        if elsewhere and self.on_connected is not None:
            task = asyncio.create_task(self._follow_connections(accounts))
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)

    async def _follow_connections(self, accounts: list[str]) -> None:
        assert self.on_connected is not None
        for username in accounts:
            try:
                auth = await self.auth.get_account_auth(username)
                if username in self._accounts and auth is not None and auth.state == "connected":
                    await self.on_connected(username)
            except Exception as error:  # a store outage: the next notice or restart catches up
                log.warning("oauth.follow_failed", account=username, error=str(error))

    # -- sign-ins waiting for the provider's answer --------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def _keep_pending(self, state: str, pending: PendingSignIn) -> None:
        """Store the sign-in (sealed, by its state's hash) for the instance the callback
        reaches; it expires after PENDING_LIFETIME."""
        expires = self._now() + PENDING_LIFETIME
        await self.auth.put_pending_sign_in(
            state_hash(state), pending.account, pending.to_bytes(), expires
        )

    async def _take_pending(self, state: str) -> PendingSignIn:
        """The sign-in of ``state``, taken from the store once (a second callback with the same
        state, on any instance, is refused); ConsentError if unknown, used or expired."""
        taken = await self.auth.take_pending_sign_in(state_hash(state), self._now())
        if taken is None:
            raise ConsentError(NOT_STARTED_HERE)
        try:
            return PendingSignIn.from_bytes(*taken)
        except ValueError as error:  # written by another version of the gateway
            log.warning("oauth.pending_unreadable", account=taken[0], error=str(error))
            raise ConsentError(NOT_STARTED_HERE) from None

    # -- the Google client the admin entered ----------------------------------------------------

    async def google_client(self) -> GoogleClient:
        configured = self.settings.google
        if configured.client_id and configured.client_secret:
            return GoogleClient(configured.client_id, configured.client_secret.value)
        client_id = await self.auth.get_setting(GOOGLE_CLIENT_ID_SETTING)
        secret = await self.auth.get_secret(GOOGLE_CLIENT_CREDENTIAL)
        if not client_id or not secret:
            raise ReauthRequired(
                "no Google OAuth client is set up: enter its client ID and secret on the admin "
                f"page at {self.admin_url()}"
            )
        register_secret(secret)
        return GoogleClient(client_id, secret.decode("utf-8"))

    async def set_google_client(self, client_id: str, client_secret: str) -> None:
        await self.auth.set_setting(GOOGLE_CLIENT_ID_SETTING, client_id)
        await self.auth.put_secret(GOOGLE_CLIENT_CREDENTIAL, client_secret.encode("utf-8"))
        await self.events.record_event("oauth.google_client_saved", detail=client_id)

    async def google_client_origin(self) -> tuple[str, str] | None:
        """(``config`` or ``admin page``, client ID) of the Google client, or None if unset."""
        configured = self.settings.google
        if configured.client_id and configured.client_secret:
            return "config", configured.client_id
        client_id = await self.auth.get_setting(GOOGLE_CLIENT_ID_SETTING)
        return ("admin page", client_id) if client_id else None

    # -- status ---------------------------------------------------------------------------------

    def _token_expiry(self, username: str) -> datetime | None:
        cached = self._tokens.get(username)
        return None if cached is None else datetime.fromtimestamp(cached.expires_at, UTC)

    async def status(self, username: str) -> AccountStatus:
        account = self.account(username)
        needed = self.needed(account)
        if account.provider == "upstream":
            return AccountStatus(account, "upstream")
        if (account.provider == "microsoft" and self.settings.microsoft.app_only) or (
            account.provider == "google" and self.settings.google.service_account_file
        ):
            expires = self._token_expiry(username)
            return AccountStatus(account, "app_only", needed=needed, token_expires=expires)
        auth = await self.auth.get_account_auth(username)
        if auth is None:
            return AccountStatus(account, "not_connected", needed=needed, missing=needed)
        return AccountStatus(
            account,
            auth.state,
            principal=auth.principal,
            scopes=auth.scopes,
            needed=needed,
            missing=tuple(_scopes.missing(needed, auth.scopes)),
            since=auth.reconsent_since if auth.state == "needs_reconsent" else auth.updated_at,
            last_error=auth.last_error,
            token_expires=self._token_expiry(username),
        )

    async def statuses(self) -> list[AccountStatus]:
        return [await self.status(name) for name in self._accounts]


def _check_owner(account: AccountSettings, connected: Connected) -> None:
    if connected.principal.casefold() != account.address.casefold():
        raise ConsentError(
            f"signed in as {connected.principal}, but account {account.username!r} is the "
            f"mailbox {account.address}: its owner must sign in (send them a consent link)"
        )


def _link_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
