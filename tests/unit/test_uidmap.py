"""The UID map's rules, against a real store: ascending, never reused, idempotent, persistent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.mailbox import UidMap
from gateway.providers import SEEN, RemoteMessage
from gateway.store import MailboxStore
from tests.helpers import sqlite_mailboxes

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def msg(pid: str, minutes: int = 0, seen: bool = False) -> RemoteMessage:
    return RemoteMessage(pid, T0 + timedelta(minutes=minutes), frozenset({SEEN} if seen else ()))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailboxStore]:
    async with sqlite_mailboxes(tmp_path) as mailboxes:
        yield mailboxes


def uid_of(uids: UidMap) -> dict[str, int]:
    return {e.provider_id: e.uid for e in uids.entries()}


async def test_first_sync_orders_by_arrival_not_by_listing(store: MailboxStore) -> None:
    uids = await UidMap.load(store, "a")
    applied = await uids.reconcile([msg("c", 3), msg("a", 1), msg("b", 2)], "c1")
    assert uid_of(uids) == {"a": 1, "b": 2, "c": 3}
    assert applied.added == [1, 2, 3] and uids.uidnext == 4 and uids.cursor == "c1"


async def test_apply_is_idempotent_and_uids_are_never_reused(store: MailboxStore) -> None:
    uids = await UidMap.load(store, "a")
    await uids.reconcile([msg("a"), msg("b", 1)], "c1")
    again = await uids.apply([msg("a"), msg("b", 1)], [], {}, "c2")
    assert again.added == again.removed == again.flags_changed == []
    gone = await uids.apply([], ["b", "unknown"], {}, "c3")
    assert gone.removed == [2]
    back = await uids.apply([msg("b", 1)], [], {}, "c4")  # returned to the INBOX: a new UID
    assert back.added == [3] and uid_of(uids) == {"a": 1, "b": 3}


async def test_flags_change_only_when_different(store: MailboxStore) -> None:
    uids = await UidMap.load(store, "a")
    await uids.reconcile([msg("a"), msg("b", 1)], "c1")
    applied = await uids.apply(
        [msg("a", seen=True)], [], {"b": frozenset(), "x": frozenset({SEEN})}, "c2"
    )
    assert applied.flags_changed == [1]
    assert uids.by_id["a"].flags == (SEEN,) and uids.by_id["b"].flags == ()


async def test_removed_wins_over_added_in_one_batch(store: MailboxStore) -> None:
    uids = await UidMap.load(store, "a")
    applied = await uids.apply([msg("a")], ["a"], {}, "c1")
    assert applied.added == [] and uids.uidnext == 1


async def test_state_survives_reopening_the_store(tmp_path: Path) -> None:
    async with sqlite_mailboxes(tmp_path) as first:
        uids = await UidMap.load(first, "a")
        await uids.reconcile([msg("a"), msg("b", 1, seen=True)], "c1")
        await uids.apply([], ["a"], {}, "c2")
        validity = uids.uidvalidity
    async with sqlite_mailboxes(tmp_path) as second:
        again = await UidMap.load(second, "a")
        assert (again.uidvalidity, again.uidnext, again.cursor) == (validity, 3, "c2")
        assert [(e.uid, e.provider_id, e.flags) for e in again.entries()] == [(2, "b", (SEEN,))]
        assert again.by_id["b"].internal_date == T0 + timedelta(minutes=1)
        other = await UidMap.load(second, "other")
        assert not other.known and other.entries() == []


async def test_reconcile_keeps_survivors_and_rebuild_changes_uidvalidity(
    store: MailboxStore,
) -> None:
    uids = await UidMap.load(store, "a")
    await uids.reconcile([msg("a"), msg("b", 1), msg("c", 2)], "c1")
    validity = uids.uidvalidity
    applied = await uids.reconcile([msg("c", 2), msg("d", 3), msg("a")], "c2")
    assert applied.removed == [2] and applied.added == [4]
    assert uid_of(uids) == {"a": 1, "c": 3, "d": 4} and uids.uidvalidity == validity
    rebuilt = await uids.rebuild([msg("c", 2), msg("a")], "c3")
    assert rebuilt.rebuilt and uids.uidvalidity > validity
    assert uid_of(uids) == {"a": 1, "c": 2} and uids.uidnext == 3
    reloaded = await UidMap.load(store, "a")
    assert uid_of(reloaded) == {"a": 1, "c": 2} and reloaded.uidvalidity == uids.uidvalidity
