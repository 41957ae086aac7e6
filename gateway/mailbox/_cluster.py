"""One poller per mailbox across instances, and every instance's views told of each change.

Instances sharing a PostgreSQL each keep their own view of an account, over one stored map
(``UidMap``; the store counts every change of it in a version). Of all of them, the view holding
the cluster-wide lock ``poll:<account>`` (:class:`PollLead`) asks the provider and allocates UIDs;
the others never call the provider for the account: they read the map again when told.

Whoever saves a change (a sync's result, a client's flags or deletion) sends the notice
``mailbox`` with the account; every instance reloads its view of that account if the stored
version moved (its own notice costs one version read) and tells its sessions, which turn it
into EXISTS / EXPUNGE / FETCH as for a local change. A view that is not the poller asks for a
fresh state with ``mailbox_poll``: the poller syncs (unless it just did) and answers with a
``mailbox`` notice. With SQLite (``LocalCoordination``) the only view of an account always wins
the lock, so a single instance works exactly as without any of this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from ..logs import get_logger
from ..store import Coordination, Leadership

log = get_logger(__name__)

CHANGED = "mailbox"  # payload: the account whose stored map changed
POLL = "mailbox_poll"  # payload: the account a session wants fresh


class Member(Protocol):
    """What a view does when told (see ``MailboxView``)."""

    def reload_soon(self) -> None: ...

    def poll_requested(self) -> None: ...


class Cluster:
    """This instance's side of the cluster for its views (one per ``MailboxViews``)."""

    def __init__(self, coordination: Coordination) -> None:
        self.coordination = coordination

    async def changed(self, account: str) -> None:
        """Tell every instance (this one included) that the account's map changed. The change
        is saved already; a notice that cannot go out is logged, and the others see the change
        at their next version check (each watched view checks at its poll interval)."""
        try:
            await self.coordination.notify(CHANGED, account)
        except Exception as error:
            log.warning("mailbox.notice_failed", account=account, error=str(error))

    async def ask_poll(self, account: str) -> None:
        """Ask the instance that polls the account to sync now."""
        try:
            await self.coordination.notify(POLL, account)
        except Exception as error:
            log.warning("mailbox.notice_failed", account=account, error=str(error))

    def listen(self, views: Mapping[str, Member]) -> Callable[[], None]:
        """Route notices to the open views; returns the function that stops it. ``None`` (the
        notices may have been missed) reloads every open view."""

        def on_changed(account: str | None) -> None:
            targets = list(views.values()) if account is None else [views.get(account)]
            for view in targets:
                if view is not None:
                    view.reload_soon()

        def on_poll(account: str | None) -> None:
            view = None if account is None else views.get(account)
            if view is not None:
                view.poll_requested()

        stops = [
            self.coordination.subscribe(CHANGED, on_changed),
            self.coordination.subscribe(POLL, on_poll),
        ]

        def stop_listening() -> None:
            for stop in stops:
                stop()

        return stop_listening


class PollLead:
    """Whether this instance's view of an account is the one that asks the provider.

    Taken when the view needs the provider (a poll, a session wanting it fresh) and nobody
    holds it; kept while the view's poller runs; given up when the poller stops (nobody here
    watches any more) or the view closes, so an instance whose sessions watch can take it.
    Without a cluster (a view on its own) the view always leads.
    """

    def __init__(self, cluster: Cluster | None, account: str) -> None:
        self.cluster = cluster
        self.account = account
        self._held: Leadership | None = None

    @property
    def leading(self) -> bool:
        """Leading as far as this instance knows (no database round trip)."""
        return self.cluster is None or self._held is not None

    async def take(self) -> bool:
        """Lead now: still hold the lock, or take it if it is free."""
        if self.cluster is None:
            return True
        if self._held is not None:
            if await self._held.holding():
                return True
            self._held = None
            log.warning("mailbox.poll_lead_lost", account=self.account)
        self._held = await self.cluster.coordination.try_lead(f"poll:{self.account}")
        if self._held is not None:
            log.info("mailbox.poll_lead_taken", account=self.account)
        return self._held is not None

    async def give_up(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await held.release()
            log.info("mailbox.poll_lead_released", account=self.account)
