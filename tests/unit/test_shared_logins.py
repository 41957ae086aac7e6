"""Failed logins and admin sessions in the state database, as several instances share them: two
gates (or two session stores) over one database stand for two gateway instances. Each test runs
on SQLite and on the test session's PostgreSQL, on an injectable clock (no wall-clock waits)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.admin.auth import SessionStore
from gateway.login_gate import (
    MAILBOX,
    WRONG,
    Accepted,
    LoginGate,
    PairKey,
    Refused,
    SqlFailureLog,
    Tally,
    UserKey,
)
from gateway.login_gate._failures import OFFLINE_SECONDS
from gateway.passwords import parse_hash
from gateway.store import (
    Connection,
    SecretBox,
    SqlDatabase,
    StoreError,
    migrate_postgresql,
    open_postgresql,
    open_sqlite,
)
from mailgw_sandbox.postgres import PostgresServer
from tests.helpers import PASSWORD, PASSWORD_HASH, ManualClock

STORED = parse_hash(PASSWORD_HASH)
CRM = UserKey.of(MAILBOX, "crm")
LOCAL = "127.0.0.1"
_T = TypeVar("_T")


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlDatabase]:
    box = SecretBox(os.urandom(32))
    if request.param == "sqlite":
        stores = await open_sqlite(tmp_path, box)
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        url = postgres.new_database()
        await migrate_postgresql(url)
        stores = await open_postgresql(url, box, pool_size=2)
    try:
        yield stores.db
    finally:
        await stores.close()


@pytest.fixture
def clock() -> ManualClock:
    """Wall-clock seconds as the instances would read them, moved by the test."""
    return ManualClock(now=1_700_000_000.0)


def _gate(db: SqlDatabase, clock: ManualClock) -> LoginGate:
    return LoginGate(clock=clock, sleep=clock.sleep, failures=SqlFailureLog(db, clock=clock))


async def _try(gate: LoginGate, client: str, password: str) -> Accepted | Refused:
    return await gate.check(client, CRM, password, STORED, protocol="imap")


async def _rows(db: SqlDatabase) -> int:
    row = await db.fetch_one("SELECT COUNT(*) FROM login_failures")
    assert row is not None
    return int(row[0])


async def test_guesses_spread_over_two_instances_share_one_budget(
    db: SqlDatabase, clock: ManualClock
) -> None:
    a, b = _gate(db, clock), _gate(db, clock)
    for n in range(MAILBOX.pair_limit):
        assert await _try((a, b)[n % 2], LOCAL, f"guess {n}") == WRONG
        clock.now += 10
    for gate in (a, b):  # the 11th is refused on either, without a check
        refused = await _try(gate, LOCAL, PASSWORD)
        assert refused == Refused(retry_after=pytest.approx(200))
    assert a.checks_started + b.checks_started == MAILBOX.pair_limit
    # Another address is not affected; the pair is free again when its oldest failure expires.
    assert await _try(b, "192.0.2.7", PASSWORD) == Accepted()
    clock.now += 200
    assert await _try(a, LOCAL, PASSWORD) == Accepted()


async def test_the_tarpit_counts_the_other_instances_failures(
    db: SqlDatabase, clock: ManualClock
) -> None:
    a, b = _gate(db, clock), _gate(db, clock)
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    b.sleep = record
    for n in range(4):  # four addresses, one guess each, all through instance A
        await _try(a, f"198.51.100.{n}", "guess")
    await _try(b, "198.51.100.200", "guess")
    assert slept == [2.0]  # the fifth failure of the username: 1 s after the fourth, doubled


async def test_a_right_password_clears_its_own_address_only(
    db: SqlDatabase, clock: ManualClock
) -> None:
    log = SqlFailureLog(db, clock=clock)
    local, remote = PairKey(LOCAL, CRM), PairKey("203.0.113.9", CRM)
    for pair in (local, local, remote):
        await log.add(pair)
    assert await log.tally(local) == Tally(pair=2, user=3)
    await log.clear(local)
    assert await log.tally(local) == Tally(pair=0, user=1)
    assert await log.tally(remote) == Tally(pair=1, user=1)


async def test_failures_leave_the_window_and_their_rows_are_deleted(
    db: SqlDatabase, clock: ManualClock
) -> None:
    log = SqlFailureLog(db, window=300, clock=clock)
    for n in range(3):
        await log.add(PairKey(f"198.51.100.{n}", UserKey.of(MAILBOX, f"user{n}")))
    clock.now += 300
    assert await log.tally(PairKey("198.51.100.0", UserKey.of(MAILBOX, "user0"))) == Tally(0, 0)
    assert await _rows(db) == 3  # expired, not yet deleted
    assert await log.add(PairKey(LOCAL, CRM)) == 1
    assert await _rows(db) == 1  # the expired rows went with the next failure


async def test_usernames_are_stored_as_digests_of_fixed_width(
    db: SqlDatabase, clock: ManualClock
) -> None:
    log = SqlFailureLog(db, clock=clock)
    huge = UserKey.of(MAILBOX, "x" * 100_000)  # whatever a client sent, as long as it is
    assert await log.add(PairKey(LOCAL, huge)) == 1
    rows = await db.fetch_all("SELECT user_digest FROM login_failures")
    assert [len(digest) for (digest,) in rows] == [64]
    assert await log.tally(PairKey(LOCAL, huge)) == Tally(pair=1, user=1)


class Unreachable:
    """The shared database, which the test can make unreachable (a StoreError per call)."""

    def __init__(self, db: SqlDatabase) -> None:
        self.db = db
        self.down = False
        self.calls = 0

    async def run(self, job: Callable[[Connection], _T]) -> _T:
        self.calls += 1
        if self.down:
            raise StoreError("cannot use the PostgreSQL database: connection refused")
        return await self.db.run(job)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def test_an_unreachable_database_leaves_each_instance_counting_alone(
    db: SqlDatabase, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.login_gate")
    shared = Unreachable(db)
    log = SqlFailureLog(shared, clock=clock)
    gate = LoginGate(clock=clock, sleep=clock.sleep, failures=log)
    await log.add(PairKey(LOCAL, CRM))
    shared.down = True
    for n in range(MAILBOX.pair_limit):  # counted in this instance's memory meanwhile
        assert await _try(gate, LOCAL, f"guess {n}") == WRONG
    assert (await _try(gate, LOCAL, PASSWORD)).throttled
    calls = shared.calls
    events = [r.getMessage() for r in caplog.records]
    assert events.count("login.failures_local") == 1  # once per outage, not per attempt
    assert calls == 2  # the first add, then one try: no connection timeout per login after it
    shared.down = False
    clock.now += OFFLINE_SECONDS
    assert await log.tally(PairKey(LOCAL, CRM)) == Tally(pair=1, user=1)  # the table again
    assert "login.failures_shared_again" in [r.getMessage() for r in caplog.records]


async def test_a_session_signed_in_on_one_instance_is_valid_on_the_other_until_dropped(
    db: SqlDatabase, clock: ManualClock
) -> None:
    a, b = SessionStore(db, 600, clock), SessionStore(db, 600, clock)
    anonymous = await a.new()
    session = await a.sign_in(anonymous)
    assert session.signed_in and session.id != anonymous.id
    assert await b.get(anonymous.id) is None  # the pre-sign-in id is void everywhere
    seen = await b.get(session.id)
    assert seen is not None and seen.signed_in and seen.csrf_token == session.csrf_token
    await b.drop(seen)
    assert await a.get(session.id) is None
    rows = await db.fetch_all("SELECT id_digest FROM admin_sessions")
    assert session.id not in {digest for (digest,) in rows}  # only a digest of an id is kept


async def test_sessions_expire_after_inactivity_on_every_instance(
    db: SqlDatabase, clock: ManualClock
) -> None:
    a, b = SessionStore(db, 600, clock), SessionStore(db, 600, clock)
    session = await a.sign_in(await a.new())
    clock.now += 599
    assert await b.get(session.id) is not None  # touched on B: the clock restarts for A too
    clock.now += 599
    assert await a.get(session.id) is not None
    clock.now += 599  # touched at most every lifetime/10: 60 s early at most, never late
    assert await a.get(session.id) is not None
    clock.now += 600
    assert await a.get(session.id) is None
    assert await a.get("unknown") is None and await a.get(None) is None
    await a.new()  # a new session deletes the expired rows
    (count,) = await db.fetch_one("SELECT COUNT(*) FROM admin_sessions") or (None,)
    assert count == 1
