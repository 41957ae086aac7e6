"""Selected IMAP sessions share the view's listing instead of each holding a copy (1,000 idle
sessions on a 5,000-message INBOX held 40 MB of lists), and sharing changes nothing a client
sees: each session's sequence numbers move only through the EXPUNGE / EXISTS it is sent.

Real view and store; the provider is the in-memory source of the view's own tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.imap_out._mailbox import InboxMailbox
from gateway.mailbox import MailboxView, ReadingPolicy
from gateway.store import SecretBox, open_sqlite
from tests.unit.test_mailbox_view import MemorySource

KEY = bytes(range(32))


@pytest.fixture
async def view(tmp_path: Path) -> AsyncIterator[tuple[MailboxView, MemorySource]]:
    stores = await open_sqlite(tmp_path, SecretBox(KEY))
    source = MemorySource()
    for pid in "abcd":
        source.deliver(pid)
    opened = await MailboxView.open(
        stores.mailboxes, "acct", source, policy=ReadingPolicy(), poll_seconds=3600
    )
    await opened.sync()
    try:
        yield opened, source
    finally:
        await opened.close()
        await stores.close()


def uids(session: InboxMailbox) -> list[int]:
    return [info.uid for info in session.messages]


async def test_sessions_hold_the_views_listing_not_a_copy(view) -> None:
    mailbox_view, _ = view
    first, second = InboxMailbox(mailbox_view, True), InboxMailbox(mailbox_view, False)
    assert first.messages is mailbox_view.messages()
    assert second.messages is first.messages
    assert first.drain() == []  # nothing pending: the listing stays the shared one
    assert first.messages is mailbox_view.messages()


async def test_a_session_shares_again_once_it_has_reported_the_changes(view) -> None:
    mailbox_view, source = view
    mover, idle = InboxMailbox(mailbox_view, True), InboxMailbox(mailbox_view, True)
    source.deliver("e")
    await mailbox_view.sync()  # UID 5 arrives
    await mailbox_view.store_flags([2], ["\\Deleted"], 1, origin=mover)
    expunged = mover.expunge().asFuture(asyncio.get_running_loop())
    assert await expunged == [2]  # mover's own EXPUNGE answer
    assert uids(mover) == [1, 3, 4]  # not yet told of UID 5: its own list for now
    assert mover.messages is not mailbox_view.messages()

    assert mover.drain() == [b"4 EXISTS"]
    assert uids(mover) == [1, 3, 4, 5]
    assert mover.messages is mailbox_view.messages()  # shared again

    # The other session still numbers the messages as it last reported them.
    assert uids(idle) == [1, 2, 3, 4]
    assert idle.getUID(2) == 2
    assert idle.drain() == [b"2 EXPUNGE", b"4 EXISTS"]
    assert idle.messages is mailbox_view.messages()


async def test_flag_changes_move_a_session_to_the_newer_listing(view) -> None:
    mailbox_view, _ = view
    session, other = InboxMailbox(mailbox_view, True), InboxMailbox(mailbox_view, True)
    before = session.messages
    await mailbox_view.store_flags([3], ["\\Flagged"], 1, origin=other)
    assert session.messages is before  # told, not yet reported
    assert session.drain() == [b"3 FETCH (FLAGS (\\Flagged) UID 3)"]
    assert session.messages is mailbox_view.messages()
    assert session.messages is not before  # the old listing is no longer held here
