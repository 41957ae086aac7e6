"""Two gateways on one PostgreSQL serve the same INBOX (issue 16, "the same view everywhere").

Two ``Gateway`` instances run in this process, each with its own state directory and ports, on
one migrated database of the session's private PostgreSQL and with one secret key, against the
sandbox's Graph or Gmail over HTTPS; clients are imaplib over real sockets. Every provider
request each instance makes is counted on its own HTTP client (an event hook: the production
client, observed, not replaced), so "one poller" is measured, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import poplib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailgw_sandbox import Sandbox, User
from tests.helpers import (
    CLOUD_ACCOUNTS,
    HOST,
    PASSWORD,
    InboxSeeder,
    idling,
    imap_starttls_login,
    running_cluster,
    sandbox_config,
    serve_without_consent,
    until,
)

POLL_SECONDS = 1
T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
WITHIN = 20.0  # seconds to wait for an event that takes a few poll intervals


def _is_poll(request: httpx.Request) -> bool:
    """A request that asks the provider what changed (delta, history, a listing), not a body."""
    path = request.url.path
    return "/delta" in path or path.endswith(("/history", "/profile", "/messages"))


@dataclass
class Instance:
    name: str
    gateway: Any
    account: str
    polls: int = 0
    cafile: str = ""

    def login(self) -> imaplib.IMAP4:
        return imap_starttls_login(self.gateway.ports["imap"], self.cafile, self.account)

    def polling(self) -> bool:
        """Whether this instance's view of the account holds the poll lock (as it knows)."""
        view = self.gateway.views.get(self.account) if self.gateway.views else None
        return view is not None and view.lead.leading


@dataclass
class Cluster:
    sandbox: Sandbox
    user: User
    a: Instance
    b: Instance

    def __post_init__(self) -> None:
        self.seed = InboxSeeder(self.sandbox, self.user, T0)

    async def poller(self) -> tuple[Instance, Instance]:
        """(the instance that polls, the other), once exactly one does."""
        await until(
            lambda: self.a.polling() != self.b.polling(),
            WITHIN,
            lambda: f"one poller: a {self.a.polling()}, b {self.b.polling()}",
        )
        return (self.a, self.b) if self.a.polling() else (self.b, self.a)


def _counting(instance: Instance) -> Callable[[httpx.Request], Any]:
    async def hook(request: httpx.Request) -> None:
        if _is_poll(request):
            instance.polls += 1

    return hook


@pytest.fixture(params=["microsoft", "google"])
async def cluster(
    request: pytest.FixtureRequest,
    sandbox: Sandbox,
    tmp_path: Path,
    pg_url: str,
) -> AsyncIterator[Cluster]:
    config, _ = sandbox_config(sandbox, tmp_path / "a")
    serve_without_consent(sandbox, config, tmp_path, ("gmail.send", "gmail.readonly"))
    config["reading"] = {"poll_seconds": POLL_SECONDS}
    account, address = CLOUD_ACCOUNTS[request.param]
    user = sandbox.directory.user(address)
    assert user is not None
    async with running_cluster(config, tmp_path, pg_url) as gateways:
        instances = []
        for name, gateway in zip("ab", gateways, strict=True):
            instance = Instance(name, gateway, account)
            instance.cafile = str(gateway.settings.state_dir / "tls/ca.crt")
            gateway.http.event_hooks["request"].append(_counting(instance))
            instances.append(instance)
        yield Cluster(sandbox, user, *instances)


def _fetch_all(instance: Instance) -> tuple[bytes, list[Any]]:
    client = instance.login()
    try:
        typ, data = client.select("INBOX")
        assert typ == "OK", data
        validity = client.response("UIDVALIDITY")[1][0]
        typ, fetched = client.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
        assert typ == "OK", fetched
        return validity, fetched
    finally:
        client.logout()


async def test_the_same_uids_and_bytes_through_either_instance(cluster: Cluster) -> None:
    ids = [cluster.seed(f"same{n}") for n in range(3)]
    through_a = await asyncio.to_thread(_fetch_all, cluster.a)
    through_b = await asyncio.to_thread(_fetch_all, cluster.b)
    assert through_a == through_b
    _validity, fetched = through_a
    bodies = [part for part in fetched if isinstance(part, tuple)]
    assert len(bodies) == len(ids) == 3
    assert [re.search(rb"UID (\d+)", head).group(1) for head, _ in bodies] == [b"1", b"2", b"3"]
    assert [body.split(b"Subject: ")[1][:5] for _, body in bodies] == [b"same0", b"same1", b"same2"]


def _store_seen(instance: Instance) -> None:
    client = instance.login()
    try:
        client.select("INBOX")
        typ, data = client.uid("STORE", "1", "+FLAGS", r"(\Seen)")
        assert typ == "OK" and rb"\Seen" in data[0], data
    finally:
        client.logout()


def _flags(instance: Instance) -> dict[int, bytes]:
    client = instance.login()
    try:
        client.select("INBOX")
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS)")
        assert typ == "OK", data
        found = {}
        for line in data:
            uid, flags = re.search(rb"UID (\d+)", line), re.search(rb"FLAGS \(([^)]*)\)", line)
            assert uid is not None and flags is not None, line
            found[int(uid.group(1))] = flags.group(1)
        return found
    finally:
        client.logout()


async def test_store_on_one_instance_is_seen_on_the_other(cluster: Cluster) -> None:
    cluster.seed("flag0")
    cluster.seed("flag1")
    assert await asyncio.to_thread(_flags, cluster.b) == {1: b"", 2: b""}
    await asyncio.to_thread(_store_seen, cluster.a)
    # B's view reads the stored map when A's notice reaches it: no provider call is involved
    # (the flag is the gateway's own, the provider still has the message unread).
    seen: dict[int, bytes] = {}

    async def check() -> bool:
        seen.update(await asyncio.to_thread(_flags, cluster.b))
        return seen.get(1) == rb"\Seen"

    deadline = asyncio.get_running_loop().time() + WITHIN
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"B still shows {seen}"
        await asyncio.sleep(0.1)
    assert seen == {1: rb"\Seen", 2: b""}


def _idle_until_exists(instance: Instance, arrive: Callable[[], None]) -> bytes:
    client = instance.login()
    try:
        client.select("INBOX")
        with idling(client) as wait:
            arrive()
            return wait(rb"^\* \d+ EXISTS")
    finally:
        client.logout()


async def _watching(cluster: Cluster) -> list[imaplib.IMAP4]:
    """A selected session on each instance, so each runs a poller for the account."""
    clients = []
    for instance in (cluster.a, cluster.b):
        client = await asyncio.to_thread(instance.login)
        await asyncio.to_thread(client.select, "INBOX")
        clients.append(client)
    return clients


async def test_new_mail_reaches_an_idle_client_of_the_instance_that_does_not_poll(
    cluster: Cluster,
) -> None:
    cluster.seed("old")
    watchers = await _watching(cluster)
    try:
        leader, other = await cluster.poller()
        await until(lambda: leader.polls > 0, WITHIN, "the poller polling")
        before = other.polls
        line = await asyncio.to_thread(_idle_until_exists, other, lambda: cluster.seed("new"))
        assert line.startswith(b"* 2 EXISTS"), line
        assert other.polls == before, "the instance that does not poll asked the provider"
        assert leader.polling() and not other.polling()
    finally:
        for client in watchers:
            await asyncio.to_thread(client.logout)


async def test_the_poller_stopping_hands_polling_to_the_other(cluster: Cluster) -> None:
    cluster.seed("before")
    watchers = await _watching(cluster)
    try:
        leader, other = await cluster.poller()
        await leader.gateway.stop()
        await until(other.polling, WITHIN, "the other instance taking over the polling")
        line = await asyncio.to_thread(_idle_until_exists, other, lambda: cluster.seed("after"))
        assert line.startswith(b"* 2 EXISTS"), line
    finally:
        for client in watchers:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.logout)


def _unique_ids(instance: Instance, delete_first: bool = False) -> list[bytes]:
    """The POP3 unique-ids (UIDL) of the INBOX through ``instance``; with ``delete_first``,
    the first message is deleted (DELE, then QUIT commits it: a local deletion by default)."""
    client = poplib.POP3(HOST, instance.gateway.ports["pop3"], timeout=10)
    try:
        client.user(instance.account)
        client.pass_(PASSWORD)
        listing = [line.split()[1] for line in client.uidl()[1]]
        if delete_first:
            client.dele(1)
        return listing
    finally:
        client.quit()


async def test_pop3_sees_one_mailbox_and_its_deletions_through_either_instance(
    cluster: Cluster,
) -> None:
    for n in range(3):
        cluster.seed(f"pop{n}")
    through_a = await asyncio.to_thread(_unique_ids, cluster.a, True)
    assert len(through_a) == 3
    assert await asyncio.to_thread(_unique_ids, cluster.b) == through_a[1:]
    assert await asyncio.to_thread(_unique_ids, cluster.a) == through_a[1:]
