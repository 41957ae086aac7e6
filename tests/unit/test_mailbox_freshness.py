"""How often a view asks the provider: the freshness window shared by logins, NOOP never
asking, and the background warm-up (batched, bounded by its quota, clients first).

The clock is injected and the warm-up's sleeps advance it, so nothing depends on wall-clock
speed; provider calls are counted by an in-memory source.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.imap_out._mailbox import InboxMailbox
from gateway.mailbox import MailboxView
from gateway.mailbox._warmup import RequestWindow
from gateway.providers import Batch, Changes, RemoteMessage, Snapshot, WarmUpQuota
from gateway.store import MailboxStore
from tests.helpers import sqlite_mailboxes

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    """Monotonic seconds that only move when told, or when a warm-up sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class BatchingSource:
    """A provider with batched downloads; every call is recorded with the clock's time."""

    ids_stable = True
    warm_up = WarmUpQuota(requests=10, seconds=60.0, batch=4)

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.inbox: dict[str, RemoteMessage] = {}
        self.bodies: dict[str, bytes] = {}
        self.calls: list[tuple[str, float, int]] = []  # (kind, when, inner requests)
        self.gate: asyncio.Event | None = None  # when set, syncs and fetch_raw wait for it
        self.throttle_next: float | None = None  # the next batch refuses half with this wait

    def deliver(self, count: int) -> None:
        for _ in range(count):
            pid = f"m{len(self.inbox)}"
            when = T0 + timedelta(minutes=len(self.inbox))
            self.inbox[pid] = RemoteMessage(pid, when, frozenset())
            self.bodies[pid] = f"Subject: {pid}\n\nbody of {pid}\n".encode()

    def provider_rounds(self) -> int:
        return sum(1 for kind, _, _ in self.calls if kind in ("list", "changes"))

    async def list_inbox(self) -> Snapshot:
        self.calls.append(("list", self.clock(), 1))
        if self.gate is not None:
            await self.gate.wait()
        return Snapshot(list(self.inbox.values()), "c")

    async def changes_since(self, cursor: str) -> Changes:
        self.calls.append(("changes", self.clock(), 1))
        if self.gate is not None:
            await self.gate.wait()
        return Changes(list(self.inbox.values()), [], {}, "c", frozenset(self.inbox))

    async def fetch_raw(self, provider_id: str) -> bytes:
        self.calls.append(("fetch", self.clock(), 1))
        if self.gate is not None:
            await self.gate.wait()
        return self.bodies[provider_id]

    async def fetch_batch(self, provider_ids: list[str]) -> Batch:
        assert len(provider_ids) <= self.warm_up.batch
        self.calls.append(("batch", self.clock(), len(provider_ids)))
        await asyncio.sleep(0)
        if self.throttle_next is not None:
            wait, self.throttle_next = self.throttle_next, None
            kept = provider_ids[: len(provider_ids) // 2]
            return Batch({p: self.bodies[p] for p in kept}, [], wait)
        return Batch({p: self.bodies[p] for p in provider_ids})

    async def set_flags(self, provider_id: str, seen: bool | None, flagged: bool | None) -> None:
        raise AssertionError("no mirroring here")

    async def remove(self, provider_id: str, how: str) -> None:
        raise AssertionError("no mirroring here")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailboxStore]:
    async with sqlite_mailboxes(tmp_path) as mailboxes:
        yield mailboxes


async def open_view(store: MailboxStore, source: BatchingSource, clock: Clock) -> MailboxView:
    return await MailboxView.open(
        store, "acct", source, poll_seconds=30, clock=clock, sleep=clock.sleep
    )


async def test_logins_within_the_freshness_window_share_one_sync(store: MailboxStore) -> None:
    clock = Clock()
    source = BatchingSource(clock)
    source.deliver(3)
    view = await open_view(store, source, clock)
    view.warm_up = None  # only syncs are counted here
    assert view.fresh_seconds == 10  # min(poll_seconds, 10)

    source.gate = asyncio.Event()
    crowd = [asyncio.create_task(view.ensure_fresh()) for _ in range(200)]
    await asyncio.sleep(0)
    source.gate.set()
    await asyncio.gather(*crowd)
    assert source.provider_rounds() == 1  # 200 logins arriving together: one provider round

    clock.now += 9.5
    await asyncio.gather(*(view.ensure_fresh() for _ in range(50)))
    assert source.provider_rounds() == 1  # still inside the window: its state is used
    assert len(view.messages()) == 3

    clock.now += 1
    source.deliver(1)
    await view.ensure_fresh()
    assert source.provider_rounds() == 2 and len(view.messages()) == 4
    await view.close()


async def test_noop_and_check_never_ask_the_provider(store: MailboxStore) -> None:
    clock = Clock()
    source = BatchingSource(clock)
    source.deliver(2)
    view = await open_view(store, source, clock)
    view.warm_up = None
    await view.ensure_fresh()
    mailbox = InboxMailbox(view, False)  # a selected session; its poller now runs
    try:
        for _ in range(20):  # a client NOOPing every 5 s for 100 s
            clock.now += 5
            await mailbox.refresh()
        assert source.provider_rounds() == 1  # only the SELECT's sync; the poller's pace rules
    finally:
        mailbox.close()
        await view.close()


async def test_poller_reports_to_a_noop_what_it_found(store: MailboxStore) -> None:
    clock = Clock()
    source = BatchingSource(clock)
    source.deliver(1)
    view = await MailboxView.open(store, "acct", source, poll_seconds=0.01, clock=clock)
    view.warm_up = None
    await view.ensure_fresh()
    mailbox = InboxMailbox(view, False)
    try:
        source.deliver(1)
        for _ in range(500):  # the poller, not the NOOP, asks the provider
            await asyncio.sleep(0.01)
            if len(view.messages()) == 2:
                break
        await mailbox.refresh()
        assert mailbox.drain() == [b"2 EXISTS"]
    finally:
        mailbox.close()
        await view.close()


async def test_request_window_keeps_to_its_limit() -> None:
    clock = Clock()
    window = RequestWindow(10, 60.0, clock, clock.sleep)
    sent: list[tuple[float, int]] = []
    for count in (4, 4, 4, 4, 4, 4):
        await window.take(count)
        sent.append((clock.now, count))
    for when, _ in sent:
        assert sum(n for t, n in sent if when <= t < when + 60) <= 10
    assert clock.now - sent[0][0] >= 120  # 24 requests at 10 a minute: two waits


async def test_warm_up_learns_every_size_in_batches_within_its_quota(store: MailboxStore) -> None:
    clock = Clock()
    source = BatchingSource(clock)
    source.deliver(25)
    view = await open_view(store, source, clock)
    assert view.warm_up is not None
    await view.sync()  # the first sync starts the warm-up
    await asyncio.wait_for(view.warm_up.finished.wait(), 5)
    await view.close()  # saves what was learnt

    batches = [(when, n) for kind, when, n in source.calls if kind == "batch"]
    assert sum(n for _, n in batches) == 25 and len(batches) == 7  # 6 x 4 + 1
    for when, _ in batches:  # never more than 10 inner requests in any 60 s
        assert sum(n for t, n in batches if when <= t < when + 60) <= 10
    assert view.warm_up.requests == 25 and view.warm_up.round_trips == 7

    again = await open_view(store, source, clock)
    again.warm_up = None
    listing = {info.uid: await again.size(info.uid) for info in again.messages()}
    assert not [c for c in source.calls if c[0] == "fetch"]  # the listing downloads nothing
    assert listing[1] == len(b"Subject: m0\r\n\r\nbody of m0\r\n")
    assert (await again.headers([1]))[1] == b"Subject: m0\r\n\r\n"
    await again.close()


async def test_warm_up_waits_for_clients_and_for_retry_after(store: MailboxStore) -> None:
    clock = Clock()
    source = BatchingSource(clock)
    source.deliver(8)
    view = await open_view(store, source, clock)
    assert view.warm_up is not None
    warm_up, view.warm_up = view.warm_up, None
    await view.sync()  # synced without a warm-up, so the client download comes first

    source.gate = asyncio.Event()
    client = asyncio.create_task(view.fetch(1))  # a client download in progress
    await asyncio.sleep(0)
    view.warm_up = warm_up
    warm_up.kick()
    for _ in range(10):
        await asyncio.sleep(0)
    assert not [c for c in source.calls if c[0] == "batch"]  # clients first
    source.gate.set()
    await client

    source.throttle_next = 2.5
    await asyncio.wait_for(warm_up.finished.wait(), 5)
    assert 2.5 in clock.sleeps  # the Retry-After inside the batch was kept
    assert all(view.known_size(info.uid) is not None for info in view.messages())
    await view.close()


async def test_warm_up_stops_with_the_view(store: MailboxStore) -> None:
    clock = Clock()
    source = BatchingSource(clock)
    source.deliver(30)
    stalled = asyncio.Event()

    async def never(seconds: float) -> None:  # a window wait that only a stop ends
        stalled.set()
        await asyncio.Event().wait()

    view = await MailboxView.open(store, "acct", source, clock=clock, sleep=never)
    assert view.warm_up is not None
    await view.sync()
    await asyncio.wait_for(stalled.wait(), 5)  # 10 requests sent, waiting for the window
    await view.close()
    assert view.warm_up.finished.is_set()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "warm-up acct"]
