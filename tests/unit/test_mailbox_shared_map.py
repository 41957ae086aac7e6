"""Two views of one account over one stored map, as two instances sharing a database have them.

One SQLite store stands for the shared database and one ``LocalCoordination`` for the cluster's
locks and notices (the PostgreSQL versions are exercised in
tests/integration/test_mailbox_cluster.py); each "instance" has its own view, its own
``Cluster`` routing notices to it and its own provider client (``MemorySource`` over one
INBOX). What is tested is the view's part: one of them polls, the other never calls the
provider and still sees every change; concurrent client changes of one message both count; a
sync saved over another instance's change is applied again instead of overwriting it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.mailbox import Applied, MailboxView
from gateway.mailbox._cluster import Cluster
from gateway.store import LocalCoordination, MailboxStore
from tests.helpers import sqlite_mailboxes
from tests.unit.test_mailbox_view import MemorySource

FLAGGED, SEEN = "\\Flagged", "\\Seen"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailboxStore]:
    async with sqlite_mailboxes(tmp_path) as mailboxes:
        yield mailboxes


class Pair:
    """Views "a" and "b" of account "acct", each with its own source over one INBOX."""

    def __init__(self, store: MailboxStore) -> None:
        self.store = store
        self.coordination = LocalCoordination()
        self.a_source = MemorySource()
        self.b_source = MemorySource()
        self.b_source.inbox, self.b_source.bodies = self.a_source.inbox, self.a_source.bodies
        self.told: dict[str, list[Applied]] = {"a": [], "b": []}
        self.views: dict[str, MailboxView] = {}
        self._stops: list = []
        self.now = 0.0  # the views' clock: freshness windows pass when a test says so

    def clock(self) -> float:
        return self.now

    async def open(self, name: str) -> MailboxView:
        cluster = Cluster(self.coordination)
        source = self.a_source if name == "a" else self.b_source
        view = await MailboxView.open(
            self.store, "acct", source, poll_seconds=3600, clock=self.clock, cluster=cluster
        )
        view.answer_seconds = 30  # never reached when green: the answer is awaited, not timed
        self._stops.append(cluster.listen({"acct": view}))
        view.watch(lambda applied, origin: self.told[name].append(applied))
        self.views[name] = view
        return view

    async def close(self) -> None:
        for stop in self._stops:
            stop()
        for view in self.views.values():
            await view.close()


@pytest.fixture
async def pair(store: MailboxStore) -> AsyncIterator[Pair]:
    made = Pair(store)
    try:
        yield made
    finally:
        await made.close()


async def _settled(pair: Pair) -> None:
    """Wait until both views hold the same stored version (every notice handled)."""
    for _ in range(1000):
        versions = {await pair.store.mailbox_version("acct")}
        versions |= {view._uids.version for view in pair.views.values()}
        if len(versions) == 1:
            return
        await asyncio.sleep(0)
    pytest.fail(f"views never caught up: {versions}")


async def test_only_the_leader_asks_the_provider_and_the_other_still_sees_new_mail(
    pair: Pair,
) -> None:
    pair.a_source.deliver("m1")
    a = await pair.open("a")
    await a.ensure_fresh()  # a polls (its watcher keeps its poller, hence the lead)
    assert a.lead.leading
    b = await pair.open("b")
    assert not b.lead.leading
    assert [m.provider_id for m in b.messages()] == ["m1"]  # read from the store at open

    pair.a_source.deliver("m2")
    pair.now += 60  # a's last sync is no longer fresh
    await b.ensure_fresh()  # b asks a to sync and reads what a saved
    assert pair.b_source.calls == []
    assert [c[0] for c in pair.a_source.calls] == ["list", "changes"]
    assert [m.uid for m in b.messages()] == [1, 2]
    assert any(t.added == [2] for t in pair.told["b"])  # b's sessions were told (EXISTS)


async def test_client_changes_on_both_instances_of_one_message_both_count(pair: Pair) -> None:
    pair.a_source.deliver("m1")
    a = await pair.open("a")
    await a.ensure_fresh()
    b = await pair.open("b")
    await asyncio.gather(a.store_flags([1], [SEEN], 1), b.store_flags([1], [FLAGGED], 1))
    await _settled(pair)
    assert a.flags(1) == b.flags(1) == {SEEN, FLAGGED}
    _state, entries = await pair.store.load_mailbox("acct")
    assert set(entries[0].local_flags or ()) == {SEEN, FLAGGED}


async def test_a_deletion_elsewhere_reaches_the_other_view(pair: Pair) -> None:
    pair.a_source.deliver("m1")
    pair.a_source.deliver("m2")
    a = await pair.open("a")
    await a.ensure_fresh()
    b = await pair.open("b")
    assert await b.delete([1]) == [1]
    await _settled(pair)
    assert [m.uid for m in a.messages()] == [2]
    assert any(t.removed == [1] for t in pair.told["a"])  # a's sessions see EXPUNGE


async def test_a_sync_over_another_instances_change_keeps_it(pair: Pair) -> None:
    pair.a_source.deliver("m1")
    a = await pair.open("a")
    await a.ensure_fresh()
    b = await pair.open("b")
    # b's STORE is saved; a's copy is now behind (its notice not handled yet: no await).
    await b.store_flags([1], [FLAGGED], 1)
    pair.a_source.deliver("m2")
    pair.a_source.set_provider_flags("m1", SEEN)  # read at the provider meanwhile
    applied = await a.sync()  # saved over b's change: read again, synced again
    assert applied.added == [2]
    assert [c[0] for c in pair.a_source.calls] == ["list", "changes", "changes"]
    await _settled(pair)
    assert a.flags(1) == b.flags(1) == {SEEN, FLAGGED}
    assert [m.uid for m in b.messages()] == [1, 2]


async def test_closing_the_leader_lets_the_other_lead(pair: Pair) -> None:
    pair.a_source.deliver("m1")
    a = await pair.open("a")
    await a.ensure_fresh()
    b = await pair.open("b")
    await a.close()
    pair.views.pop("a")
    pair.a_source.deliver("m2")
    applied = await b.ensure_fresh()  # b takes the lead and syncs itself
    assert b.lead.leading and applied.added == [2]
    assert [c[0] for c in pair.b_source.calls] == ["changes"]
