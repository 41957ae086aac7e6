"""The login gate on an injectable clock: pair budgets, the username tarpit, the check limit, the
verified-login cache and the once-per-incident log lines (real scrypt, at a cheap cost)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.login_gate import (
    ADMIN,
    MAILBOX,
    WRONG,
    Accepted,
    LoginGate,
    MemoryFailureLog,
    PairKey,
    Refused,
    UserKey,
    tarpit_delay,
)
from gateway.passwords import hash_password, parse_hash
from tests.helpers import PASSWORD, PASSWORD_HASH, ManualClock

STORED = parse_hash(PASSWORD_HASH)
CRM = UserKey.of(MAILBOX, "crm")
SCANNER = UserKey.of(MAILBOX, "scanner")
LOCAL = "127.0.0.1"


@pytest.fixture
def time() -> ManualClock:
    """The gate's clock, and a sleep that records the tarpit's delays instead of waiting."""
    return ManualClock(now=1000.0)


@pytest.fixture
def gate(time: ManualClock) -> LoginGate:
    return LoginGate(clock=time, sleep=time.sleep, concurrent_checks=2)


async def _try(gate: LoginGate, client: str, user: UserKey, password: str) -> Accepted | Refused:
    return await gate.check(client, user, password, STORED, protocol="imap")


def test_tarpit_doubles_from_the_fourth_failure_and_stops_at_15_seconds() -> None:
    assert [tarpit_delay(n) for n in range(10)] == [0, 0, 0, 1, 2, 4, 8, 15, 15, 15]


async def test_pair_budget_refuses_without_a_check_then_slides(
    gate: LoginGate, time: ManualClock
) -> None:
    for _ in range(MAILBOX.pair_limit):
        assert await _try(gate, LOCAL, CRM, "stale password") == WRONG
        time.now += 10
    assert gate.checks_started == MAILBOX.pair_limit
    refused = await _try(gate, LOCAL, CRM, PASSWORD)  # right, but this pair is over budget
    assert refused == Refused(retry_after=pytest.approx(200))
    assert refused.sentence() == (
        "Too many failed logins for this username from your address; try again in 4 minute(s)"
    )
    assert gate.checks_started == MAILBOX.pair_limit  # refused without a check
    # Another account from the same address, and the same account from another address, pass.
    assert await _try(gate, LOCAL, SCANNER, PASSWORD) == Accepted()
    assert await _try(gate, "192.0.2.7", CRM, PASSWORD) == Accepted()
    time.now += 200  # the oldest failure leaves the window: one more try
    assert await _try(gate, LOCAL, CRM, PASSWORD) == Accepted(from_cache=True)


async def test_a_username_under_attack_is_slowed_never_locked_and_recovers(
    gate: LoginGate, time: ManualClock
) -> None:
    for n in range(30):  # one guess from each of 30 addresses: no pair reaches its budget
        assert await _try(gate, f"198.51.100.{n}", CRM, f"guess {n}") == WRONG
        time.now += 1
    assert time.slept == [1, 2, 4, 8] + [15] * 23
    time.slept.clear()
    # The account's own program: its right password works, after the delay at most.
    assert await _try(gate, LOCAL, CRM, PASSWORD) == Accepted()
    assert time.slept == [15]
    # Other usernames are not slowed.
    assert await _try(gate, LOCAL, SCANNER, PASSWORD) == Accepted()
    assert time.slept == [15]
    # Failures age out of the window one by one, and the delay shrinks with them.
    time.now = 1026 + 300  # the failures of 1000..1029: those of 1027, 1028, 1029 are recent
    time.slept.clear()
    assert await _try(gate, "198.51.100.200", CRM, "another guess") == WRONG
    assert time.slept == [1]
    # A right password already remembered is answered at once: no check, no delay.
    assert await _try(gate, LOCAL, CRM, PASSWORD) == Accepted(from_cache=True)
    assert time.slept == [1]


async def test_success_forgets_only_the_failures_from_its_own_address(
    gate: LoginGate, time: ManualClock
) -> None:
    for _ in range(3):
        await _try(gate, LOCAL, CRM, "typo")
    for _ in range(3):
        await _try(gate, "203.0.113.9", CRM, "guess")
    assert await _try(gate, LOCAL, CRM, PASSWORD) == Accepted()
    time.slept.clear()
    # The attacker's 3 remain: its next guess waits 1 s (8 s if the typos still counted).
    await _try(gate, "203.0.113.9", CRM, "guess")
    assert time.slept == [1]


async def test_a_username_that_looks_like_an_address_is_only_a_username(
    gate: LoginGate, time: ManualClock
) -> None:
    intruder = UserKey.of(MAILBOX, LOCAL)
    for _ in range(12):
        await _try(gate, "203.0.113.9", intruder, "guess")
    assert await _try(gate, LOCAL, CRM, PASSWORD) == Accepted()
    assert await _try(gate, LOCAL, SCANNER, PASSWORD) == Accepted()
    assert PairKey(LOCAL, CRM) != PairKey("203.0.113.9", intruder)


async def test_admin_and_mailbox_logins_are_separate_usernames(
    gate: LoginGate, time: ManualClock
) -> None:
    admin = UserKey.of(ADMIN, "admin")
    for _ in range(ADMIN.pair_limit):
        await _try(gate, LOCAL, admin, "guess")
    assert (await _try(gate, LOCAL, admin, PASSWORD)).throttled
    assert await _try(gate, LOCAL, UserKey.of(MAILBOX, "admin"), PASSWORD) == Accepted()


async def test_concurrent_guesses_are_counted_before_the_check(gate: LoginGate) -> None:
    results = await asyncio.gather(*(_try(gate, LOCAL, CRM, f"guess {n}") for n in range(40)))
    throttled = [r for r in results if isinstance(r, Refused) and r.throttled]
    assert gate.checks_started == MAILBOX.pair_limit
    assert len(throttled) == 40 - MAILBOX.pair_limit
    assert 1 <= gate.peak_checks <= gate.concurrent_checks  # 32 MiB each: memory is bounded


async def test_repeat_logins_are_verified_from_memory_until_the_password_changes(
    gate: LoginGate,
) -> None:
    assert await _try(gate, LOCAL, CRM, PASSWORD) == Accepted(from_cache=False)
    assert await _try(gate, LOCAL, CRM, PASSWORD) == Accepted(from_cache=True)
    assert gate.checks_started == 1
    # A wrong password is never answered from memory: it gets a full check.
    assert await _try(gate, LOCAL, CRM, PASSWORD + "x") == WRONG
    assert gate.checks_started == 2
    assert await _try(gate, LOCAL, SCANNER, PASSWORD) == Accepted(from_cache=False)
    # A new hash for the account (its password was changed): the remembered login is void.
    changed = parse_hash(hash_password(PASSWORD, log2_n=10))
    assert await gate.check(LOCAL, CRM, PASSWORD, changed, protocol="imap") == Accepted()
    # A new process (a restart) has a new key and remembers nothing.
    assert not LoginGate().verified.matches(CRM, PASSWORD, STORED)


async def test_each_incident_is_logged_once(
    gate: LoginGate, time: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.login_gate")
    for _ in range(50):
        await _try(gate, LOCAL, CRM, "stale password")
    events = [(r.getMessage(), r.fields) for r in caplog.records]  # type: ignore[attr-defined]
    failed = [f for e, f in events if e == "login.failed"]
    throttled = [f for e, f in events if e == "login.throttled"]
    tarpit = [f for e, f in events if e == "login.tarpit"]
    assert len(failed) == MAILBOX.pair_limit
    assert throttled == [
        {
            "protocol": "imap",
            "client": LOCAL,
            "user": "crm",
            "failures": 10,
            "limit": 10,
            "retry_after": 300,
        }
    ]
    assert tarpit == [{"client": LOCAL, "user": "crm", "failures": 3, "delay": 1.0}]
    time.now += 301  # the incident is over; the next one is logged again
    caplog.clear()
    for _ in range(12):
        await _try(gate, LOCAL, CRM, "stale password")
    assert [r.getMessage() for r in caplog.records].count("login.throttled") == 1


async def test_failure_memory_is_bounded(time: ManualClock) -> None:
    gate = LoginGate(clock=time, sleep=time.sleep, max_keys=10)
    for n in range(50):
        time.now += 1
        await gate.record_failure(LOCAL, UserKey.of(MAILBOX, f"user{n}"), "smtp", "spray")
    assert isinstance(gate.failures, MemoryFailureLog)
    windows = gate.failures.windows
    assert len(windows) == 10
    assert PairKey(LOCAL, UserKey.of(MAILBOX, "user49")) in windows  # newest kept
    assert UserKey.of(MAILBOX, "user0") not in windows


async def test_a_burst_of_right_logins_costs_one_check_and_no_delay(
    gate: LoginGate, time: ManualClock
) -> None:
    """A program opening sixteen connections at once with its right password: nothing is
    refused or slowed (attempts in flight are not failures), and one scrypt check serves all."""
    results = await asyncio.gather(*(_try(gate, LOCAL, CRM, PASSWORD) for _ in range(16)))
    assert all(isinstance(r, Accepted) for r in results)
    assert gate.checks_started == 1 and time.slept == []


async def test_guesses_waiting_behind_a_check_are_refused_once_the_budget_is_spent(
    gate: LoginGate,
) -> None:
    """Attempts of a pair wait for the one in flight; when the budget is spent while they
    wait, they are refused without a check, and the retry time is that of the oldest failure."""
    results = await asyncio.gather(*(_try(gate, LOCAL, CRM, f"guess {n}") for n in range(12)))
    throttled = [r for r in results if isinstance(r, Refused) and r.throttled]
    assert gate.checks_started == MAILBOX.pair_limit and len(throttled) == 2
    assert all(r.retry_after <= 300 for r in throttled)
    # The right password from another address is neither refused nor checked twice.
    assert await _try(gate, "127.0.0.2", CRM, PASSWORD) == Accepted()
