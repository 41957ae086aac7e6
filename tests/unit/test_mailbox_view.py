"""The INBOX view's own rules, against a real store and an in-memory source.

The source here is a stand-in for a provider (the integration tests use the sandbox clouds and
a real Dovecot); what is tested is the view: local flags and deletions persisted per account,
every provider flag carried, each flag the provider changes winning over the gateway's own
state of that flag only, watchers told of every change with who caused it, the opt-in
mirroring calls, sizes learnt once and kept, and a crowd of concurrent syncs costing one
provider round.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.mailbox import Applied, MailboxView, ReadingPolicy
from gateway.providers import SEEN, Changes, NotSupported, RemoteMessage, Snapshot
from gateway.store import MailboxStore
from tests.helpers import sqlite_mailboxes

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class MemorySource:
    """A provider INBOX in memory; records the calls the view makes."""

    ids_stable = True

    def __init__(self) -> None:
        self.inbox: dict[str, RemoteMessage] = {}
        self.bodies: dict[str, bytes] = {}
        self.calls: list[tuple] = []
        self.gate: asyncio.Event | None = None  # when set, listings wait for it

    def deliver(
        self, pid: str, body: bytes = b"Subject: x\n\nhello\n", flags: Iterable[str] = ()
    ) -> None:
        when = T0 + timedelta(minutes=len(self.inbox))
        self.inbox[pid] = RemoteMessage(pid, when, frozenset(flags))
        self.bodies[pid] = body

    def set_provider_flags(self, pid: str, *flags: str) -> None:
        """As if changed in the provider's own client."""
        old = self.inbox[pid]
        self.inbox[pid] = RemoteMessage(pid, old.internal_date, frozenset(flags), old.size)

    async def list_inbox(self) -> Snapshot:
        self.calls.append(("list",))
        if self.gate is not None:
            await self.gate.wait()
        return Snapshot(list(self.inbox.values()), "c")

    async def changes_since(self, cursor: str) -> Changes:
        self.calls.append(("changes",))
        if self.gate is not None:
            await self.gate.wait()
        listed = list(self.inbox.values())
        return Changes(listed, [], {}, "c", frozenset(self.inbox))

    async def fetch_raw(self, provider_id: str) -> bytes:
        self.calls.append(("fetch", provider_id))
        return self.bodies[provider_id]

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        self.calls.append(("flags", provider_id, seen, flagged))

    async def remove(self, provider_id: str, how: str) -> None:
        self.calls.append(("remove", provider_id, how))
        if how == "archive":
            raise NotSupported("no archive here")
        self.inbox.pop(provider_id, None)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailboxStore]:
    async with sqlite_mailboxes(tmp_path) as mailboxes:
        yield mailboxes


async def open_view(
    store: MailboxStore, source: MemorySource, policy: ReadingPolicy | None = None
) -> MailboxView:
    return await MailboxView.open(
        store, "acct", source, policy=policy or ReadingPolicy(), poll_seconds=3600
    )


async def test_local_flags_and_deletions_survive_reopening(store: MailboxStore) -> None:
    source = MemorySource()
    for pid in "abc":
        source.deliver(pid)
    view = await open_view(store, source)
    await view.sync()
    # Keywords are kept too; \\Recent, unknown system flags and non-atoms are not flags.
    names = ["\\flagged", "\\Answered", "$Junk", "\\Recent", "\\Foo", "bad(name", "a]b"]
    now = await view.store_flags([1, 2], names, 1)
    kept = {"\\Flagged", "\\Answered", "$Junk"}
    assert now == {1: kept, 2: kept}
    assert view.keywords() == ("$Junk",)
    await view.store_flags([3], ["$junk"], 1)  # IMAP keywords compare without case
    assert view.flags(3) == {"$Junk"}
    assert await view.delete([2]) == [2]
    assert [m.uid for m in view.messages()] == [1, 3]
    await view.close()

    again = await open_view(store, source)
    assert [m.uid for m in again.messages()] == [1, 3]  # before any sync: from the store
    assert again.flags(1) == kept
    with pytest.raises(KeyError):
        again.flags(2)  # hidden for every session of the account
    # The default policy leaves the provider untouched.
    assert not [c for c in source.calls if c[0] in ("flags", "remove")]


async def test_provider_read_state_wins_over_local_seen_only(store: MailboxStore) -> None:
    source = MemorySource()
    source.deliver("a")
    view = await open_view(store, source)
    await view.sync()
    await view.store_flags([1], ["\\Flagged"], 1)
    source.set_provider_flags("a", SEEN)  # read in the provider's own client
    applied = await view.sync()
    assert applied.flags_changed == [1]
    assert view.flags(1) == {"\\Flagged", SEEN}
    source.set_provider_flags("a")
    await view.sync()
    assert view.flags(1) == {"\\Flagged"}


async def test_every_provider_flag_is_carried_and_wins_only_where_it_changed(
    store: MailboxStore,
) -> None:
    source = MemorySource()
    source.deliver("a", flags=["\\Flagged", "$Forwarded"])  # as an upstream IMAP server has it
    source.deliver("b", flags=["\\Answered", "\\Draft", SEEN])
    view = await open_view(store, source)
    await view.sync()
    assert view.flags(1) == {"\\Flagged", "$Forwarded"}
    assert view.flags(2) == {"\\Answered", "\\Draft", SEEN}
    assert view.keywords() == ("$Forwarded",)
    # Locally: read, and the keyword taken off.
    await view.store_flags([1], [SEEN], 1)
    await view.store_flags([1], ["$Forwarded"], -1)
    # At the provider: unflagged and answered; $Forwarded and \\Seen did not change there.
    source.set_provider_flags("a", "\\Answered", "$Forwarded")
    applied = await view.sync()
    assert applied.flags_changed == [1]
    assert view.flags(1) == {SEEN, "\\Answered"}
    assert view.keywords() == ()
    source.set_provider_flags("a", "\\Answered")  # the keyword removed there too: no change
    await view.sync()
    assert view.flags(1) == {SEEN, "\\Answered"}


async def test_present_removes_what_the_provider_no_longer_lists(store: MailboxStore) -> None:
    source = MemorySource()
    for pid in "ab":
        source.deliver(pid)
    view = await open_view(store, source)
    await view.sync()
    del source.inbox["a"]
    source.deliver("c")
    applied = await view.sync()
    assert applied.removed == [1] and applied.added == [3]


async def test_watchers_hear_every_change_and_who_made_it(store: MailboxStore) -> None:
    source = MemorySource()
    source.deliver("a")
    view = await open_view(store, source)
    heard: list[tuple[Applied, object]] = []
    view.watch(lambda applied, origin: heard.append((applied, origin)))
    await view.sync()
    session = object()
    await view.store_flags([1], ["\\Seen"], 1, origin=session)
    await view.delete([1], origin=session)
    assert [(a.added, a.flags_changed, a.removed, o) for a, o in heard] == [
        ([1], [], [], None),
        ([], [1], [], session),
        ([], [], [1], session),
    ]
    await view.close()


async def test_opt_in_policy_mirrors_and_survives_unsupported(store: MailboxStore) -> None:
    source = MemorySource()
    for pid in "ab":
        source.deliver(pid)
    view = await open_view(store, source, ReadingPolicy(mirror_flags=True, on_delete="trash"))
    await view.sync()
    await view.store_flags([1], ["\\Seen", "\\Flagged"], 1)
    await view.delete([2])
    await view.close()  # waits for the background provider calls
    assert ("flags", "a", True, True) in source.calls
    assert ("remove", "b", "trash") in source.calls

    archiving = await open_view(store, source, ReadingPolicy(on_delete="archive"))
    await archiving.delete([1])
    await archiving.close()  # NotSupported is logged, the local deletion holds
    assert ("remove", "a", "archive") in source.calls
    assert archiving.messages() == ()


async def test_sizes_are_learnt_once_and_kept(store: MailboxStore) -> None:
    source = MemorySource()
    source.deliver("a", body=b"Subject: lf\n\nbare LF lines\n")
    view = await open_view(store, source)
    await view.sync()
    assert await view.size(1) == len(b"Subject: lf\r\n\r\nbare LF lines\r\n")
    await view.close()
    fetches = [c for c in source.calls if c[0] == "fetch"]
    again = await open_view(store, source)
    assert await again.size(1) == 30 and again.messages()[0].size == 30
    assert [c for c in source.calls if c[0] == "fetch"] == fetches  # no second download


async def test_concurrent_syncs_share_provider_rounds(store: MailboxStore) -> None:
    source = MemorySource()
    source.deliver("a")
    view = await open_view(store, source)
    await view.sync()
    source.gate = asyncio.Event()
    crowd = [asyncio.create_task(view.sync()) for _ in range(50)]
    await asyncio.sleep(0)
    source.gate.set()
    await asyncio.gather(*crowd)
    rounds = [c for c in source.calls if c[0] == "changes"]
    assert len(rounds) <= 2, len(rounds)  # the one running, and one for those who came after


async def test_polling_runs_only_while_watched(store: MailboxStore) -> None:
    source = MemorySource()
    view = await MailboxView.open(store, "acct", source, poll_seconds=0.01)
    watcher = lambda applied, origin: None  # noqa: E731
    view.watch(watcher)
    view.watch(lambda applied, origin: None)
    for _ in range(500):  # a few polls, however slow the machine
        if len(source.calls) >= 2:
            break
        await asyncio.sleep(0.01)
    polled = len(source.calls)
    assert polled >= 2
    (poller,) = [t for t in asyncio.all_tasks() if t.get_name() == "poll acct"]
    await view.close()
    await asyncio.wait([poller], timeout=5)  # the poller has ended: no call can follow
    assert poller.done()
    assert len(source.calls) == polled


async def test_headers_come_from_cache_store_or_one_download(
    store: MailboxStore, tmp_path: Path
) -> None:
    source = MemorySource()
    source.deliver("a", body=b"Subject: a\r\n\r\nbody a\r\n")
    source.deliver("b", body=b"Subject: b\n\nbody b\n")
    view = await open_view(store, source)
    await view.sync()
    assert await view.headers([1, 2, 99]) == {1: b"Subject: a\r\n\r\n", 2: b"Subject: b\r\n\r\n"}
    assert [c for c in source.calls if c[0] == "fetch"] == [("fetch", "a"), ("fetch", "b")]
    await view.close()
    source.calls.clear()
    again = await open_view(store, source)
    assert await again.headers([2, 1]) == {1: b"Subject: a\r\n\r\n", 2: b"Subject: b\r\n\r\n"}
    assert source.calls == []  # from the store: no download after a restart
    del source.inbox["a"]
    await again.sync()
    assert await store.load_mailbox_headers("acct", ["a", "b"]) == {"b": b"Subject: b\r\n\r\n"}
    with sqlite3.connect(tmp_path / "gateway.db") as conn:  # encrypted at rest, like tokens
        (sealed,) = conn.execute("SELECT header FROM mailbox_headers").fetchone()
    assert b"Subject" not in sealed


async def test_provider_changes_cut_off_by_a_stop_are_caught_up_at_the_next_start(
    store: MailboxStore,
) -> None:
    source = MemorySource()
    for pid in "abc":
        source.deliver(pid)
    view = await open_view(store, source)  # keep: nothing goes to the provider
    await view.sync()
    await view.store_flags([1], ["\\Seen"], 1)
    await view.delete([2])
    await view.close()
    assert not [c for c in source.calls if c[0] in ("flags", "remove")]

    policy = ReadingPolicy(mirror_flags=True, on_delete="trash")
    again = await open_view(store, source, policy)  # as after a crash, or a policy turned on
    await again.sync()
    await again.close()
    assert ("remove", "b", "trash") in source.calls
    assert ("flags", "a", True, False) in source.calls
    assert "b" not in source.inbox
    source.calls.clear()
    third = await open_view(store, source, policy)
    await third.sync()  # the trashed one left the map; nothing is asked twice
    await third.close()
    assert not [c for c in source.calls if c[0] == "remove"]


async def test_logins_arriving_together_share_one_new_view(store: MailboxStore) -> None:
    """Before an account's view exists, simultaneous logins wait for one opening instead of
    each opening (and syncing) a view of its own (1,000 logins after a restart made 1,000
    provider rounds)."""
    from types import SimpleNamespace

    from gateway.config import ReadingSettings
    from gateway.mailbox import MailboxViews

    source = MemorySource()
    account = SimpleNamespace(reading=SimpleNamespace(mirror_flags=False, on_delete="keep"))

    async def connected(username: str) -> None:
        return None

    views = MailboxViews(
        store, lambda name: account, lambda acct: source, connected, ReadingSettings
    )
    opened = await asyncio.gather(*(views.view_for("acct") for _ in range(20)))
    try:
        assert len({id(view) for view in opened}) == 1 and list(views) == ["acct"]
    finally:
        await views.close()
