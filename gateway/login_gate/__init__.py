"""The one login gate: SMTP AUTH, IMAP LOGIN/AUTHENTICATE, POP3 USER/PASS and the admin sign-in
all check passwords here, so guesses over every protocol count in one budget.

Every legacy program on a machine connects from 127.0.0.1, so the client address alone cannot be
a key (one stale password would stop everyone's mail), and a username alone cannot be either (an
attacker anywhere could lock an account's own program out). So:

* **A budget per (client address, username) pair.** ``realm.pair_limit`` failures inside
  ``window`` seconds, and that pair is refused at once, without a password check, with the
  protocol's temporary refusal, until its oldest failure leaves the window. Attempts still being
  checked are judged one at a time per pair (the gate is claimed *before* the slow hash), so
  concurrent guesses cannot overrun it, and a program's burst of simultaneous logins with its
  right password costs one check: the rest find it remembered. A right password clears the
  pair's failures.
* **A tarpit per username**, from every address, modelled on Dovecot's auth penalty
  (src/auth/auth-penalty.c: a delay that doubles per failure, capped at 15 s, forgotten as
  failures age). A username under attack from many addresses gets slow, never locked: its own
  program's right password still works, after the delay at most. A right password forgets the
  failures that came from its own address.
* **The check itself.** At most ``concurrent_checks`` scrypt checks run at once (each takes
  32 MiB), and a right password is remembered in a :class:`~gateway.passwords.VerifiedLogins`
  cache, so a program that logs in every few minutes costs one HMAC instead of one scrypt.
  A wrong password is always checked by scrypt (the cache never answers "no"), and an unknown
  username is checked against a dummy hash of the same cost, so timing tells nothing.

Keys are typed (:class:`UserKey`, :class:`PairKey`): a username is never mistaken for an
address. The failures live in a :class:`FailureLog`: this process's memory (bounded: at most
``max_keys`` keys, the oldest go first) for one gateway, or the shared database
(:class:`SqlFailureLog`) when several instances serve behind a load balancer, so guesses spread
over the instances count in one budget. Attempts in flight, the verified-login cache and the
scrypt slots stay per instance: another instance needs none of them. A throttled pair and a
tarpitted username are each logged once per incident (per instance), not per attempt.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from .. import metrics
from ..logs import get_logger
from ..passwords import ScryptHash, VerifiedLogins, verify_password
from ._failures import (
    WINDOW_SECONDS,
    FailureLog,
    MemoryFailureLog,
    SqlFailureLog,
    Tally,
)
from ._keys import ADMIN, MAILBOX, PairKey, Realm, UserKey

__all__ = [
    "ADMIN",
    "MAILBOX",
    "WINDOW_SECONDS",
    "WRONG",
    "Accepted",
    "FailureLog",
    "LoginCheck",
    "LoginGate",
    "MemoryFailureLog",
    "PairKey",
    "Realm",
    "Refused",
    "SqlFailureLog",
    "Tally",
    "UserKey",
    "tarpit_delay",
]

log = get_logger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
_K = TypeVar("_K", bound=Hashable)

# Dovecot's auth penalty: 2 s doubling to at most 15 s. Ours starts later (three free failures:
# a typo, a client retrying once) and at 1 s.
TARPIT_FREE_FAILURES = 3
TARPIT_FIRST_DELAY = 1.0
TARPIT_MAX_DELAY = 15.0
INCIDENTS_REMEMBERED = 10_000  # pairs and usernames whose incident was logged, at most


@dataclass(frozen=True)
class Accepted:
    """The password is right; ``from_cache`` when it was recognised without scrypt."""

    from_cache: bool = False


@dataclass(frozen=True)
class Refused:
    """A wrong password (``retry_after`` 0), or a pair over its budget: refused for
    ``retry_after`` more seconds without a password check."""

    retry_after: float = 0.0

    @property
    def throttled(self) -> bool:
        return self.retry_after > 0

    @property
    def minutes(self) -> int:
        """Whole minutes to wait, rounded up: never tell a client to come back too early."""
        return max(1, math.ceil(self.retry_after / 60))

    def sentence(self) -> str:
        """What a throttled client is told (after the protocol's temporary-refusal code)."""
        return (
            "Too many failed logins for this username from your address; "
            f"try again in {self.minutes} minute(s)"
        )


WRONG = Refused()

# What the IMAP and POP3 listeners call for a login: (username, password, client address) ->
# the account name, or why the gate refused it (the composition root passes Accounts.login).
LoginCheck = Callable[[str, str, str], Awaitable[str | Refused]]


def tarpit_delay(failures: int) -> float:
    """Seconds a username with this many recent failures (and attempts in flight) waits before
    its next check: 0 for the first few, then 1, 2, 4, 8, 15, 15, ..."""
    if failures < TARPIT_FREE_FAILURES:
        return 0.0
    return min(TARPIT_FIRST_DELAY * 2 ** (failures - TARPIT_FREE_FAILURES), TARPIT_MAX_DELAY)


class LoginGate:
    """Where every password is checked; see the module docstring for the rules.

    ``clock`` and ``sleep`` are injectable (tests replace ``sleep`` to observe the tarpit
    without waiting). ``failures`` is where failures are counted: this process's memory unless
    given (the composition root gives a :class:`SqlFailureLog` on PostgreSQL).
    ``checks_started`` and ``peak_checks`` count scrypt checks, so tests can see how many
    guesses reached the hash and how many ran at once (memory: 32 MiB each).
    """

    def __init__(
        self,
        *,
        window: float = WINDOW_SECONDS,
        concurrent_checks: int = max(1, min(4, os.cpu_count() or 1)),
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_keys: int = 100_000,
        failures: FailureLog | None = None,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.concurrent_checks = concurrent_checks
        self.verified = VerifiedLogins()
        self.checks_started = 0
        self.peak_checks = 0
        self.failures: FailureLog = failures or MemoryFailureLog(window, clock, max_keys)
        self._running = 0
        self._slots = asyncio.Semaphore(concurrent_checks)
        self._in_flight: dict[Hashable, int] = {}
        self._settling: dict[PairKey, asyncio.Event] = {}  # pairs with attempts waiting
        self._throttled: dict[PairKey, float] = {}  # pairs whose incident was logged, and when
        self._tarpitted: dict[UserKey, float] = {}  # usernames whose incident was logged

    async def check(
        self, client: str, user: UserKey, password: str, stored: ScryptHash, *, protocol: str
    ) -> Accepted | Refused:
        """Is ``password`` right for ``stored`` (the user's hash, or a dummy for an unknown
        user)? Refused without a check while the (client, user) pair is over its budget.

        One check at a time per pair: a second attempt of the pair waits for the first to
        settle, then is judged again. Guesses sent at once are so counted one by one, and a
        program that opens sixteen connections at once with its right password pays one scrypt
        check: the others find it remembered (a remembered password need not wait).
        """
        pair = PairKey(client, user)
        while pair in self._in_flight and not self.verified.matches(user, password, stored):
            await self._settled(pair)
        # Claimed before the failures are read: no other attempt of the pair on this instance
        # can settle unseen between the read and the check.
        self._claim(pair)
        try:
            return await self._judge(pair, password, stored, protocol)
        finally:
            self._release(pair)

    async def _judge(
        self, pair: PairKey, password: str, stored: ScryptHash, protocol: str
    ) -> Accepted | Refused:
        """The verdict on one claimed attempt: over budget, remembered, or checked."""
        user = pair.user
        tally = await self.failures.tally(pair)
        if tally.pair >= user.realm.pair_limit:
            refusal = Refused(retry_after=max(1.0, tally.frees_in))
            self._report_throttled(pair, protocol, tally, refusal)
            metrics.login(protocol, "throttled")
            return refusal
        self._throttled.pop(pair, None)
        if self.verified.matches(user, password, stored):
            await self._succeeded(pair, tally, protocol)
            return Accepted(from_cache=True)
        delay = self._tarpit(user, pair.client, tally)
        if delay:
            await self.sleep(delay)
        accepted = await self._verify(user, password, stored)
        if accepted is not None:
            await self._succeeded(pair, tally, protocol)
            return accepted
        await self.record_failure(pair.client, user, protocol, "wrong username or password")
        return WRONG

    async def _succeeded(self, pair: PairKey, tally: Tally, protocol: str) -> None:
        if tally.pair:  # nothing to forget otherwise: no write for a clean login
            await self.failures.clear(pair)
        metrics.login(protocol, "ok")

    async def record_failure(self, client: str, user: UserKey, protocol: str, reason: str) -> None:
        """Count a failed login against the pair and the username, and log it."""
        failures = await self.failures.add(PairKey(client, user))
        metrics.login(protocol, "failed")
        log.warning(
            "login.failed",
            protocol=protocol,
            client=client,
            user=_shown(user),
            reason=reason,
            failures=failures,
        )

    # -- incidents, each logged once ------------------------------------------------------------

    def _report_throttled(
        self, pair: PairKey, protocol: str, tally: Tally, refusal: Refused
    ) -> None:
        if pair in self._throttled:
            return
        self._throttled = self._remember_incident(self._throttled, pair)
        log.warning(
            "login.throttled",
            protocol=protocol,
            client=pair.client,
            user=_shown(pair.user),
            failures=tally.pair,
            limit=pair.user.realm.pair_limit,
            retry_after=math.ceil(refusal.retry_after),
        )

    def _tarpit(self, user: UserKey, client: str, tally: Tally) -> float:
        """The delay for this attempt: failures of the username from every address, plus the
        attempts for it already under way from other addresses (one at most per address; the
        count includes this attempt's own claim)."""
        count = tally.user + self._in_flight.get(user, 1) - 1
        delay = tarpit_delay(count)
        if not delay:
            self._tarpitted.pop(user, None)
        elif user not in self._tarpitted:
            self._tarpitted = self._remember_incident(self._tarpitted, user)
            log.warning(
                "login.tarpit",
                client=client,
                user=_shown(user),
                failures=count,
                delay=delay,
            )
        return delay

    def _remember_incident(self, logged: dict[_K, float], key: _K) -> dict[_K, float]:
        """``logged`` with ``key`` added now; bounded: incidents logged longer ago than the
        window are over (their failures have expired) and are forgotten first."""
        now = self.clock()
        logged[key] = now
        if len(logged) <= INCIDENTS_REMEMBERED:
            return logged
        return {k: at for k, at in logged.items() if now - at < self.failures.window}

    # -- claims and the check ------------------------------------------------------------------

    def _claim(self, pair: PairKey) -> None:
        for key in (pair, pair.user):
            self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def _release(self, pair: PairKey) -> None:
        for key in (pair, pair.user):
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]
        settled = self._settling.pop(pair, None)
        if settled is not None:
            settled.set()  # every attempt of the pair waiting for this one is judged again

    async def _settled(self, pair: PairKey) -> None:
        """Wait until the pair's check in flight has ended (success, failure or hang-up)."""
        await self._settling.setdefault(pair, asyncio.Event()).wait()

    async def _verify(self, user: UserKey, password: str, stored: ScryptHash) -> Accepted | None:
        if self.verified.matches(user, password, stored):
            return Accepted(from_cache=True)
        if await self._scrypt(password, stored):
            self.verified.remember(user, password, stored)
            return Accepted()
        return None

    async def _scrypt(self, password: str, stored: ScryptHash) -> bool:
        """One scrypt check in a thread, holding a slot until the thread is done: a client that
        hangs up mid-check cannot free its slot while its 32 MiB are still in use."""
        await self._slots.acquire()
        self.checks_started += 1
        self._running += 1
        self.peak_checks = max(self.peak_checks, self._running)
        check = asyncio.ensure_future(asyncio.to_thread(verify_password, password, stored))
        check.add_done_callback(self._check_done)
        return await asyncio.shield(check)

    def _check_done(self, check: asyncio.Future[bool]) -> None:
        self._running -= 1
        self._slots.release()
        if not check.cancelled():
            check.exception()  # retrieved: a check nobody awaits any more logs no warning


def _shown(user: UserKey) -> str:
    """A username as logged: bounded in length (it is whatever a client sent)."""
    return user.name[:64]
