"""INBOX views over real HTTPS against the sandbox's Graph and Gmail: first and incremental
sync, UID stability across restarts and resyncs, byte-identical bodies, API call counts.

Tokens come from a stand-in for the broker that mints real sandbox grants with read-only scopes
(the broker is tested in test_oauth.py); everything below it is the production code path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from gateway import outbound
from gateway.delivery import Temporary
from gateway.mailbox import MailboxUnavailable, MailboxView
from gateway.providers import SEEN, CursorExpired, GmailSource, GraphSource
from gateway.store import SecretBox, Stores, open_sqlite
from mailgw_sandbox import Fault, Sandbox
from tests.helpers import SandboxTokens

KEY = bytes(range(32))
TARGET = {"microsoft": "graph", "google": "gmail"}
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class World:
    """One sandbox user, its source, and a store that can be closed and reopened (a restart)."""

    def __init__(self, sandbox: Sandbox, client: httpx.AsyncClient, provider: str, state: Path):
        self.sandbox = sandbox
        self.provider = provider
        self.state = state
        address = "desk@contoso.example" if provider == "microsoft" else "desk@example.com"
        self.user = sandbox.add_user(provider, address)  # type: ignore[arg-type]
        self.ops = sandbox.ops(self.user)
        tokens = SandboxTokens(sandbox, self.user)
        if provider == "microsoft":
            self.source: GraphSource | GmailSource = GraphSource(
                client, tokens, f"{sandbox.url}/v1.0", "desk", address, page_size=10
            )
        else:
            self.source = GmailSource(client, tokens, sandbox.url, "desk")
        self.store: Stores | None = None
        self.seeded = 0

    async def view(self) -> MailboxView:
        """Open (again) the store and the account's view, as a restarted gateway would."""
        if self.store is not None:
            await self.store.close()
        self.store = await open_sqlite(self.state, SecretBox(KEY))
        return await MailboxView.open(self.store.mailboxes, "desk", self.source)

    def seed(self, subject: str) -> tuple[str, bytes]:
        raw = (
            f"From: Sender <s@example.org>\r\nTo: desk\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\nX-Raw: caf\xe9 \u65e5\u672c\r\n\r\n"
            f"Body of {subject}.\r\n\u65e5\u672c\u8a9e\r\n"
        ).encode()
        when = T0 + timedelta(minutes=self.seeded)
        self.seeded += 1
        return self.ops.seed_inbox(self.user, raw, received_at=when), raw

    def calls(self) -> int:
        return self.sandbox.faults.requests.get(TARGET[self.provider], 0)


@pytest.fixture(params=["microsoft", "google"])
async def world(
    sandbox: Sandbox, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[World]:
    async with outbound.async_client(sandbox.ca_file) as client:
        made = World(sandbox, client, request.param, tmp_path / "state")
        try:
            yield made
        finally:
            if made.store is not None:
                await made.store.close()


def table(view: MailboxView) -> dict[str, tuple[int, tuple[str, ...]]]:
    return {m.provider_id: (m.uid, m.flags) for m in view.messages()}


async def test_first_then_incremental_sync(world: World) -> None:
    seeded = [world.seed(f"m{n}") for n in range(4)]
    ids = [pid for pid, _ in seeded]
    view = await world.view()
    applied = await view.sync()
    assert applied.added == [1, 2, 3, 4]
    assert [m.provider_id for m in view.messages()] == ids  # UIDs in arrival order
    assert [m.internal_date for m in view.messages()] == [
        T0 + timedelta(minutes=n) for n in range(4)
    ]
    for uid, (_, raw) in enumerate(seeded, 1):
        assert await view.fetch(uid) == raw  # byte-identical
        assert await view.size(uid) == len(raw)

    new_id, _ = world.seed("m4")
    world.ops.move(world.user, ids[0], "archive")
    world.ops.delete(world.user, ids[1])
    world.ops.set_read(world.user, ids[2], True)
    applied = await view.sync()
    assert (applied.added, applied.removed, applied.flags_changed) == ([5], [1, 2], [3])
    assert table(view) == {ids[2]: (3, (SEEN,)), ids[3]: (4, ()), new_id: (5, ())}
    assert view.uidnext == 6

    world.ops.move(world.user, ids[3], "trash")
    world.ops.move(world.user, ids[0], "inbox")  # back again: a new UID, never an old one
    applied = await view.sync()
    assert (applied.added, applied.removed) == ([6], [4])
    assert table(view)[ids[0]] == (6, ())
    again = await view.sync()  # nothing new: nothing changes
    assert again.added == again.removed == again.flags_changed == []


async def test_restart_keeps_uids_and_uidvalidity(world: World) -> None:
    ids = [world.seed(f"r{n}")[0] for n in range(3)]
    view = await world.view()
    await view.sync()
    before = (view.uidvalidity, table(view))
    restarted = await world.view()  # store closed and reopened
    assert (restarted.uidvalidity, table(restarted)) == before
    late, _ = world.seed("r3")
    applied = await restarted.sync()  # incremental from the stored cursor
    assert applied.added == [4] and applied.removed == []
    assert table(restarted)[late] == (4, ()) and restarted.uidvalidity == before[0]
    assert [table(restarted)[i][0] for i in ids] == [1, 2, 3]


@pytest.mark.parametrize("world", ["google"], indirect=True)
async def test_gmail_history_404_resyncs_keeping_uids(sandbox: Sandbox, world: World) -> None:
    ids = [world.seed(f"h{n}")[0] for n in range(3)]
    view = await world.view()
    await view.sync()
    validity = view.uidvalidity
    world.ops.move(world.user, ids[1], "archive")
    new_id, raw = world.seed("h3")
    world.ops.set_read(world.user, ids[2], True)
    sandbox.google.expire_history(world.user)
    with pytest.raises(CursorExpired):
        await world.source.changes_since(view._uids.cursor or "")
    applied = await view.sync()
    assert not applied.rebuilt and view.uidvalidity == validity
    assert (applied.added, applied.removed, applied.flags_changed) == ([4], [2], [3])
    assert table(view) == {ids[0]: (1, ()), ids[2]: (3, (SEEN,)), new_id: (4, ())}
    assert await view.fetch(4) == raw


@pytest.mark.parametrize("world", ["microsoft"], indirect=True)
async def test_graph_expired_delta_token_resyncs_keeping_uids(world: World) -> None:
    ids = [world.seed(f"d{n}")[0] for n in range(2)]
    view = await world.view()
    await view.sync()
    cursor = view._uids.cursor or ""
    stale = cursor.split("$deltatoken=")[0] + "$deltatoken=expired"
    with pytest.raises(CursorExpired):
        await world.source.changes_since(stale)
    view._uids.state = type(view._uids.state)(view.uidvalidity, view.uidnext, stale)
    world.ops.delete(world.user, ids[0])
    applied = await view.sync()
    assert (applied.added, applied.removed, applied.rebuilt) == ([], [1], False)
    assert table(view) == {ids[1]: (2, ())}


async def test_first_sync_api_calls(world: World) -> None:
    """Graph: one delta page per 10 (the page size asked here). Gmail: profile, one list page
    per 500, then one messages.get(format=minimal) per message for internalDate and UNREAD."""
    count = 25
    for n in range(count):
        world.seed(f"c{n}")
    view = await world.view()
    before = world.calls()
    await view.sync()
    calls = world.calls() - before
    expected = 3 if world.provider == "microsoft" else 1 + 1 + count
    assert calls == expected, f"{world.provider}: {calls} calls for {count} messages"
    assert len(view.messages()) == count
    await view.fetch(1)
    await view.fetch(1)  # the second comes from the cache
    assert world.calls() - before == expected + 1


async def test_provider_outage_is_temporary_and_changes_nothing(world: World) -> None:
    """A 503 mid-sync surfaces as MailboxUnavailable caused by the providers' Temporary (with
    Retry-After); the map and cursor are untouched, and the next sync applies everything once."""
    ids = [world.seed(f"f{n}")[0] for n in range(2)]
    view = await world.view()
    await view.sync()
    before = (view.uidnext, view._uids.cursor, table(view))
    late, _ = world.seed("f2")
    world.sandbox.faults.add(Fault(TARGET[world.provider], "503", remaining=1))  # type: ignore[arg-type]
    with pytest.raises(MailboxUnavailable) as raised:
        await view.sync()
    cause = raised.value.__cause__
    assert isinstance(cause, Temporary) and cause.retry_after == pytest.approx(2.128)
    assert str(raised.value) == str(cause)
    assert (view.uidnext, view._uids.cursor, table(view)) == before
    applied = await view.sync()
    assert applied.added == [3] and table(view)[late] == (3, ())
    assert [table(view)[i][0] for i in ids] == [1, 2]
