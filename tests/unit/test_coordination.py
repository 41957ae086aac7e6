"""Cluster-wide locks and notices (``Stores.coordination``) on both backends.

With SQLite the cluster is one process, so both "instances" are the same object; with
PostgreSQL they are two :class:`PgCoordination` objects, two sets of connections to one
database, as two gateway processes have. The lock and notice tests run on both; what only a
database session can lose (a killed connection) runs on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest

from gateway.store import Coordination, migrate_postgresql
from gateway.store._coordination import MAX_PAYLOAD_BYTES, LocalCoordination
from gateway.store._pg_coordination import LEAD_APPLICATION, LISTEN_APPLICATION, PgCoordination
from mailgw_sandbox.postgres import PostgresServer
from tests.helpers import until

WITHIN = 15.0  # seconds; only ever reached when something is broken


@asynccontextmanager
async def two_instances(url: str) -> AsyncIterator[tuple[PgCoordination, PgCoordination]]:
    """Two instances' coordination (two sets of connections) on the migrated database."""
    await migrate_postgresql(url)
    first, second = await PgCoordination.open(url), await PgCoordination.open(url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Coordination, Coordination]]:
    if request.param == "sqlite":
        local = LocalCoordination()
        yield local, local
        await local.close()
        return
    async with two_instances(request.getfixturevalue("pg_url")) as instances:
        yield instances


def _kill(postgres: PostgresServer, url: str, application: str) -> int:
    """End the named connections to the test's database as an admin or a network would."""
    database = urlsplit(url).path.lstrip("/")
    out = postgres.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "  # noqa: S608
        f"WHERE application_name = '{application}' AND datname = current_database()",
        database,
    )
    return int(out)


class Listener:
    """What a subscriber heard, in order (None: it may have missed notices)."""

    def __init__(self) -> None:
        self.heard: list[str | None] = []

    def __call__(self, payload: str | None) -> None:
        self.heard.append(payload)

    @property
    def payloads(self) -> list[str]:
        return [payload for payload in self.heard if payload is not None]


async def _listening(coordination: Coordination, listener: Listener) -> None:
    """On PostgreSQL a new channel's subscribers are told None once it is listened to: from
    then on no notice is missed. SQLite delivers from the start."""
    if isinstance(coordination, PgCoordination):
        await until(lambda: None in listener.heard, WITHIN, "the channel listened to")


async def test_exclusive_is_mutual_exclusion_across_instances(
    pair: tuple[Coordination, Coordination],
) -> None:
    inside: list[int] = []
    most = 0

    async def use(coordination: Coordination, number: int) -> None:
        nonlocal most
        async with coordination.exclusive("refresh:alice@example.com"):
            inside.append(number)
            most = max(most, len(inside))
            await asyncio.sleep(0.01)  # yield inside: another holder would enter now
            inside.remove(number)

    await asyncio.gather(*(use(pair[number % 2], number) for number in range(20)))
    assert most == 1


async def test_exclusive_other_names_do_not_wait(pair: tuple[Coordination, Coordination]) -> None:
    first, second = pair
    release = asyncio.Event()
    holding = asyncio.Event()

    async def hold() -> None:
        async with first.exclusive("refresh:alice@example.com"):
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await holding.wait()
    async with asyncio.timeout(WITHIN):
        async with second.exclusive("refresh:bob@example.com"):
            pass  # entered while alice's is held
    release.set()
    await holder


async def test_exclusive_released_after_an_error_and_a_cancelled_waiter(
    pair: tuple[Coordination, Coordination],
) -> None:
    first, second = pair
    with pytest.raises(ValueError, match="in the block"):
        async with first.exclusive("poll:desk"):
            raise ValueError("in the block")  # raised unchanged, lock released

    release, holding, waiting = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with first.exclusive("poll:desk"):
            holding.set()
            await release.wait()

    async def wait() -> None:
        waiting.set()
        async with second.exclusive("poll:desk"):
            pytest.fail("entered while held")

    holder = asyncio.create_task(hold())
    await holding.wait()
    waiter = asyncio.create_task(wait())
    await waiting.wait()
    await asyncio.sleep(0.1)  # let it reach the database's lock wait
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    for coordination in (second, first, second):  # nobody is left holding it
        async with asyncio.timeout(WITHIN), coordination.exclusive("poll:desk"):
            pass


async def test_try_lead_gives_one_leader_and_a_new_one_after_release(
    pair: tuple[Coordination, Coordination],
) -> None:
    first, second = pair
    leader = await first.try_lead("poll:desk")
    assert leader is not None and await leader.holding()
    assert await second.try_lead("poll:desk") is None
    assert await first.try_lead("poll:desk") is None  # not twice in one instance either
    other = await second.try_lead("poll:crm")  # another name is free
    assert other is not None
    await leader.release()
    assert not await leader.holding()
    successor = await second.try_lead("poll:desk")
    assert successor is not None and await successor.holding()
    await successor.release()
    await other.release()


async def test_new_leader_after_the_leaders_connection_is_killed(
    pg_url: str, postgres: PostgresServer
) -> None:
    async with two_instances(pg_url) as (first, second):
        leader = await first.try_lead("poll:desk")
        assert leader is not None
        assert await second.try_lead("poll:desk") is None
        # Each instance has one leader connection (the second's holds no lock): both end.
        assert _kill(postgres, pg_url, LEAD_APPLICATION) == 2
        successor = None
        for _attempt in range(100):  # the server ends the session a moment after the signal
            successor = await second.try_lead("poll:desk")
            if successor is not None:
                break
            await asyncio.sleep(0.05)
        assert successor is not None
        assert not await leader.holding()  # the old leader learns it lost the lock
        assert await successor.holding()


async def test_one_leader_connection_per_instance_however_many_it_leads(
    pg_url: str, postgres: PostgresServer
) -> None:
    async with two_instances(pg_url) as (first, second):
        held = [await first.try_lead(f"poll:box{n}") for n in range(20)]
        assert all(leadership is not None for leadership in held)
        for n in range(20):  # the other instance tries every one, as each poll interval does
            assert await second.try_lead(f"poll:box{n}") is None
        database = urlsplit(pg_url).path.lstrip("/")
        count = postgres.psql(
            "SELECT count(*) FROM pg_stat_activity "  # noqa: S608
            f"WHERE application_name = '{LEAD_APPLICATION}' AND datname = current_database()",
            database,
        )
        assert int(count) == 2
        await held[3].release()
        assert await second.try_lead("poll:box3") is not None
        assert all([await h.holding() for h in held if h is not held[3]])


async def test_close_ends_leaderships(pg_url: str) -> None:
    async with two_instances(pg_url) as (first, second):
        assert await first.try_lead("poll:desk") is not None
        await first.close()  # a stopping instance hands over at once
        assert await second.try_lead("poll:desk") is not None


async def test_notify_reaches_subscribers_on_every_instance(
    pair: tuple[Coordination, Coordination],
) -> None:
    first, second = pair
    on_first, on_second, elsewhere = Listener(), Listener(), Listener()
    stop_first = first.subscribe("mailbox_changed", on_first)
    second.subscribe("mailbox_changed", on_second)
    second.subscribe("spool_ready", elsewhere)
    await _listening(first, on_first)
    await _listening(second, on_second)

    await second.notify("mailbox_changed", "desk")  # the sender's own subscribers hear it too
    await until(lambda: on_first.payloads == on_second.payloads == ["desk"], WITHIN, "desk")
    stop_first()
    await first.notify("mailbox_changed", "crm")
    await until(lambda: on_second.payloads == ["desk", "crm"], WITHIN, "crm")
    assert on_first.payloads == ["desk"]  # unsubscribed
    assert elsewhere.payloads == []


async def test_a_failing_listener_does_not_silence_the_others(
    pair: tuple[Coordination, Coordination],
) -> None:
    first, second = pair
    heard = Listener()

    def broken(payload: str | None) -> None:
        raise RuntimeError("a subscriber's bug")

    first.subscribe("mailbox_changed", broken)
    first.subscribe("mailbox_changed", heard)
    await _listening(first, heard)
    await second.notify("mailbox_changed", "one")
    await second.notify("mailbox_changed", "two")
    await until(lambda: heard.payloads == ["one", "two"], WITHIN, "both notices")


async def test_notices_are_checked_on_both_backends(
    pair: tuple[Coordination, Coordination],
) -> None:
    first, _second = pair
    with pytest.raises(ValueError, match="at most 7999 bytes"):
        await first.notify("mailbox_changed", "x" * (MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(ValueError, match="channel names"):
        await first.notify("Mailbox-Changed", "desk")
    await first.notify("mailbox_changed", "x" * MAX_PAYLOAD_BYTES)  # the most PostgreSQL takes


async def test_subscribers_told_to_reread_after_the_listening_connection_is_lost(
    pg_url: str, postgres: PostgresServer
) -> None:
    async with two_instances(pg_url) as (first, second):
        heard = Listener()
        first.subscribe("mailbox_changed", heard)
        await _listening(first, heard)
        await second.notify("mailbox_changed", "before")
        await until(lambda: heard.payloads == ["before"], WITHIN, "the first notice")
        assert _kill(postgres, pg_url, LISTEN_APPLICATION) == 2  # both instances' listeners
        await until(lambda: heard.heard[-1] is None, WITHIN, "a None after the reconnection")
        await second.notify("mailbox_changed", "after")
        await until(lambda: heard.payloads == ["before", "after"], WITHIN, "the later notice")
