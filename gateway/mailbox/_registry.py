"""The open INBOX views: one per account, opened at its first IMAP or POP3 login and shared by
every session of that account, so one poller and one body cache serve them all. With instances
sharing a PostgreSQL, one poller per account across them all, and each instance's views follow
the others' changes (see ``_cluster``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

from ..config import AccountSettings, ReadingSettings
from ..providers import MailboxSource
from ..store import Coordination, MailboxStore
from ._cluster import Cluster
from ._view import BodyCache, MailboxView, ReadingPolicy

NO_INBOX = "This account has no INBOX to read (its upstream has no imap or pop3 server)"


class MailboxViews(Mapping[str, MailboxView]):
    """The views by account name; :meth:`view_for` opens one on first use.

    What may change on a config reload is asked for each time a view opens: the account
    (``account_for``), its source (``source_for``) and the reading settings (``reading``).
    ``coordination`` links the views to the other instances' (None: a view on its own always
    polls and tells nobody).
    """

    def __init__(
        self,
        store: MailboxStore,
        account_for: Callable[[str], AccountSettings | None],
        source_for: Callable[[AccountSettings], MailboxSource | None],
        reconnect_needed: Callable[[str], Awaitable[str | None]],
        reading: Callable[[], ReadingSettings],
        coordination: Coordination | None = None,
    ) -> None:
        self._store = store
        self._account_for = account_for
        self._source_for = source_for
        self._reconnect_needed = reconnect_needed
        self._reading = reading
        self._views: dict[str, MailboxView] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._cluster = None if coordination is None else Cluster(coordination)
        self._stop_listening = None if self._cluster is None else self._cluster.listen(self)

    def __getitem__(self, username: str) -> MailboxView:
        return self._views[username]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    async def view_for(self, username: str) -> MailboxView | str:
        """The account's INBOX view, or the sentence saying why it cannot be served (the
        mailbox must be reconnected, or there is no INBOX to read)."""
        reconnect = await self._reconnect_needed(username)
        if reconnect:
            return reconnect
        view = self._views.get(username)
        if view is not None:
            return view
        # One opening per account: logins arriving together before the view exists wait for
        # it instead of each opening (and syncing) a view of their own.
        async with self._opening.setdefault(username, asyncio.Lock()):
            view = self._views.get(username)
            if view is None:
                opened = await self._open(username)
                if isinstance(opened, str):
                    return opened
                view = self._views[username] = opened
        return view

    async def _open(self, username: str) -> MailboxView | str:
        account = self._account_for(username)
        source = None if account is None else self._source_for(account)
        if account is None or source is None:
            return NO_INBOX
        reading = self._reading()
        return await MailboxView.open(
            self._store,
            username,
            source,
            BodyCache(reading.cache_mb * 1024 * 1024),
            ReadingPolicy(account.reading.mirror_flags, account.reading.on_delete),
            reading.poll_seconds,
            cluster=self._cluster,
        )

    async def reopen(self, usernames: Iterable[str]) -> list[str]:
        """Close these accounts' open views (their settings changed, or they are gone): the
        next login opens a new one. Returns the accounts whose view was open."""
        closed = []
        for username in list(usernames):
            view = self._views.pop(username, None)
            if view is not None:
                await view.close()
                closed.append(username)
        return closed

    async def close(self) -> None:
        """Close every view: sizes learnt are saved, queued provider changes finish."""
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        views, self._views = self._views, {}
        for view in views.values():
            await view.close()
