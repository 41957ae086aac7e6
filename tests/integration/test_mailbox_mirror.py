"""Mirroring to the provider over real HTTPS against the sandbox's Graph and Gmail: \\Seen and
\\Flagged, archive and trash (never a permanent deletion), idempotence for a message already
gone, and the admin's sentence when the consent lacks the write scope.

Tokens come from a broker stand-in that mints real sandbox grants, here with the write scope
(Graph Mail.ReadWrite, Gmail gmail.modify) unless a test asks for the read-only ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from gateway import outbound
from gateway.delivery import Permanent, ReauthRequired, Temporary
from gateway.providers import SEEN, Changes, GmailSource, GraphSource
from mailgw_sandbox import Fault, Sandbox
from tests.helpers import READ_SCOPES, SandboxTokens

TARGET = {"microsoft": "graph", "google": "gmail"}
WRITE_SCOPES = {
    "microsoft": {"Mail.ReadWrite"},
    "google": {"https://www.googleapis.com/auth/gmail.modify"},
}
WRITE_SCOPE_NAME = {"microsoft": "Mail.ReadWrite", "google": "gmail.modify"}
GRAPH_PLACES = {"Inbox": "inbox", "Archive": "archive", "Deleted Items": "trash"}


class ScopedTokens(SandboxTokens):
    """:class:`SandboxTokens` with the scopes chosen by the test."""

    def __init__(self, sandbox: Sandbox, user: Any, scopes: set[str]) -> None:
        super().__init__(sandbox, user)
        self.scopes = scopes

    async def access_token(self, username: str) -> str:
        if self._token is None:
            grant = self.sandbox.directory.issue(
                "access", self.user.provider, self.app, self.user.address, self.scopes
            )
            self._token = grant.token
        return self._token


@dataclass(frozen=True)
class State:
    """A message as the provider now keeps it."""

    seen: bool
    flagged: bool
    place: str  # inbox, archive or trash


class World:
    def __init__(self, sandbox: Sandbox, client: httpx.AsyncClient, provider: str) -> None:
        self.sandbox, self.client, self.provider = sandbox, client, provider
        self.address = "desk@contoso.example" if provider == "microsoft" else "desk@example.com"
        self.user = sandbox.add_user(provider, self.address)  # type: ignore[arg-type]
        self.ops = sandbox.ops(self.user)
        self.source = self.make_source(WRITE_SCOPES[provider])
        self.seeded = 0

    def make_source(self, scopes: set[str], address: str | None = None) -> Any:
        tokens = ScopedTokens(self.sandbox, self.user, scopes)
        if self.provider == "microsoft":
            graph = f"{self.sandbox.url}/v1.0"
            return GraphSource(self.client, tokens, graph, "desk", address or self.address)
        return GmailSource(self.client, tokens, self.sandbox.url, "desk")

    def seed(self, subject: str) -> tuple[str, bytes]:
        raw = (
            f"From: Sender <s@example.org>\r\nTo: desk\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.org>\r\n\r\nBody of {subject}.\r\n"
        ).encode()
        self.seeded += 1
        return self.ops.seed_inbox(self.user, raw), raw

    def calls(self) -> int:
        return self.sandbox.faults.requests.get(TARGET[self.provider], 0)

    async def look(self, provider_id: str) -> State:
        """Read the message back through the provider's own API (read calls only)."""
        api = self.source.api
        if self.provider == "microsoft":
            source: GraphSource = self.source
            message = (
                await api.call(
                    "GET",
                    f"{source.mailbox}/messages/{quote(provider_id, safe='')}",
                    "look",
                    params={"$select": "isRead,flag,parentFolderId"},
                    headers=source.headers,
                )
            ).json()
            folder = (
                await api.call(
                    "GET", f"{source.mailbox}/mailFolders/{message['parentFolderId']}", "look"
                )
            ).json()
            return State(
                message["isRead"],
                message["flag"]["flagStatus"] == "flagged",
                GRAPH_PLACES[folder["displayName"]],
            )
        gmail: GmailSource = self.source
        labels = set(
            (
                await api.call(
                    "GET",
                    f"{gmail.base}/messages/{provider_id}",
                    "look",
                    params={"format": "minimal"},
                )
            )
            .json()
            .get("labelIds", [])
        )
        place = "trash" if "TRASH" in labels else "inbox" if "INBOX" in labels else "archive"
        return State("UNREAD" not in labels, "STARRED" in labels, place)


@pytest.fixture(params=["microsoft", "google"])
async def world(sandbox: Sandbox, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    async with outbound.async_client(sandbox.ca_file) as client:
        yield World(sandbox, client, request.param)


def reported_seen(changes: Changes) -> dict[str, bool]:
    """\\Seen per id as a sync would apply it (Graph delta reports updates as items)."""
    now = {pid: SEEN in flags for pid, flags in changes.flags.items()}
    return {**{m.id: m.seen for m in changes.added}, **now}


async def test_seen_and_flagged_are_mirrored(world: World) -> None:
    first, _ = world.seed("a")
    other, _ = world.seed("b")
    snapshot = await world.source.list_inbox()

    await world.source.set_flags(first, seen=True, flagged=True)
    assert await world.look(first) == State(True, True, "inbox")
    assert await world.look(other) == State(False, False, "inbox")
    changes = await world.source.changes_since(snapshot.cursor)
    assert reported_seen(changes) == {first: True}  # Graph: delta update; Gmail: UNREAD removed
    assert changes.removed == []

    await world.source.set_flags(first, seen=False, flagged=None)  # None: flag untouched
    assert await world.look(first) == State(False, True, "inbox")
    await world.source.set_flags(first, seen=None, flagged=False)
    assert await world.look(first) == State(False, False, "inbox")
    again = await world.source.changes_since(changes.cursor)
    assert reported_seen(again) == {first: False}

    before = world.calls()
    await world.source.set_flags(first, seen=None, flagged=None)
    assert world.calls() == before  # nothing to change: no request


async def test_archive_and_trash_leave_inbox_and_keep_the_message(world: World) -> None:
    archived, raw = world.seed("archived")
    trashed, _ = world.seed("trashed")
    kept, _ = world.seed("kept")
    snapshot = await world.source.list_inbox()

    await world.source.remove(archived, "archive")
    await world.source.remove(trashed, "trash")

    assert world.ops.inbox_ids(world.user) == [kept]
    assert (await world.look(archived)).place == "archive"  # same (immutable) id, moved
    assert (await world.look(trashed)).place == "trash"
    assert await world.source.fetch_raw(archived) == raw  # not deleted: still readable
    changes = await world.source.changes_since(snapshot.cursor)
    assert sorted(changes.removed) == sorted([archived, trashed])
    assert changes.added == []  # nothing came back
    assert [m.id for m in (await world.source.list_inbox()).messages] == [kept]


async def test_message_already_gone_is_success(world: World) -> None:
    gone, _ = world.seed("gone")
    world.ops.delete(world.user, gone)  # deleted for good at the provider meanwhile
    await world.source.set_flags(gone, seen=True, flagged=True)
    await world.source.remove(gone, "archive")
    await world.source.remove(gone, "trash")

    twice, _ = world.seed("twice")
    await world.source.remove(twice, "trash")
    await world.source.remove(twice, "trash")  # a repeated removal is harmless
    assert (await world.look(twice)).place == "trash"


async def test_read_only_consent_names_the_missing_scope(world: World) -> None:
    message, _ = world.seed("ro")
    read_only = world.make_source(READ_SCOPES[world.provider])
    scope = WRITE_SCOPE_NAME[world.provider]
    for attempt in (
        read_only.set_flags(message, seen=True, flagged=None),
        read_only.remove(message, "archive"),
        read_only.remove(message, "trash"),
    ):
        with pytest.raises(ReauthRequired) as raised:
            await attempt
        text = str(raised.value)
        assert "HTTP 403" in text and scope in text
        assert "enable the option's scope" in text and "reconnect the account" in text
    assert await world.look(message) == State(False, False, "inbox")  # nothing changed


async def test_other_failures_keep_their_classification(world: World) -> None:
    message, _ = world.seed("fail")
    world.sandbox.faults.add(Fault(TARGET[world.provider], "503", remaining=1))  # type: ignore[arg-type]
    with pytest.raises(Temporary):
        await world.source.remove(message, "trash")
    assert (await world.look(message)).place == "inbox"
    if world.provider == "microsoft":  # a 404 for the mailbox is not "message already gone"
        nobody = world.make_source(WRITE_SCOPES["microsoft"], "nobody@contoso.example")
        with pytest.raises(Permanent, match="ErrorInvalidUser"):
            await nobody.set_flags(message, seen=True, flagged=None)
