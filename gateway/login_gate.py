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
address. Memory is bounded: at most ``max_keys`` keys are remembered; the oldest go first.
A throttled pair and a tarpitted username are each logged once per incident, not per attempt.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from . import metrics
from .logs import get_logger
from .passwords import ScryptHash, VerifiedLogins, verify_password

log = get_logger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

WINDOW_SECONDS = 300.0
# Dovecot's auth penalty: 2 s doubling to at most 15 s. Ours starts later (three free failures:
# a typo, a client retrying once) and at 1 s.
TARPIT_FREE_FAILURES = 3
TARPIT_FIRST_DELAY = 1.0
TARPIT_MAX_DELAY = 15.0


@dataclass(frozen=True)
class Realm:
    """A namespace of usernames with its own pair budget: mailbox accounts, or the admin page."""

    name: str
    pair_limit: int


MAILBOX = Realm("mailbox", pair_limit=10)
ADMIN = Realm("admin", pair_limit=5)


@dataclass(frozen=True)
class UserKey:
    realm: Realm
    name: str  # casefolded: logins ignore case

    @classmethod
    def of(cls, realm: Realm, username: str) -> UserKey:
        return cls(realm, username.casefold())


@dataclass(frozen=True)
class PairKey:
    client: str
    user: UserKey


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


class FailureLog:
    """Recent failure times per key, each tagged with the client it came from; a sliding window
    with at most ``max_keys`` keys (an attacker spraying usernames cannot grow it)."""

    def __init__(self, window: float, clock: Clock, max_keys: int) -> None:
        self.window = window
        self._clock = clock
        self._max_keys = max_keys
        self._entries: dict[Hashable, deque[tuple[float, str]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def recent(self, key: Hashable) -> deque[tuple[float, str]]:
        """The key's failures inside the window, oldest first (expired ones are dropped)."""
        entries = self._entries.get(key)
        if entries is None:
            return deque()
        cutoff = self._clock() - self.window
        while entries and entries[0][0] <= cutoff:
            entries.popleft()
        if not entries:
            del self._entries[key]
        return entries

    def add(self, key: Hashable, client: str) -> int:
        """Record one failure; returns how many the key has now."""
        entries = self.recent(key)
        entries.append((self._clock(), client))
        self._entries[key] = entries
        if len(self._entries) > self._max_keys:
            self._forget_oldest()
        return len(entries)

    def forget(self, key: Hashable, client: str | None = None) -> None:
        """Drop the key's failures (only those from ``client`` when given)."""
        if client is None:
            self._entries.pop(key, None)
            return
        kept = deque(entry for entry in self.recent(key) if entry[1] != client)
        if kept:
            self._entries[key] = kept
        else:
            self._entries.pop(key, None)

    def expires_in(self, key: Hashable, index: int) -> float:
        """Seconds until the key's ``index``-th recent failure (0 = oldest) leaves the window."""
        entries = self.recent(key)
        if index >= len(entries):
            return self.window
        return max(0.0, entries[index][0] + self.window - self._clock())

    def _forget_oldest(self) -> None:
        for key in list(self._entries):
            self.recent(key)
        excess = len(self._entries) - self._max_keys
        if excess > 0:
            by_age = sorted(self._entries, key=lambda k: self._entries[k][-1][0])
            for key in by_age[:excess]:
                del self._entries[key]


class LoginGate:
    """Where every password is checked; see the module docstring for the rules.

    ``clock`` and ``sleep`` are injectable (tests replace ``sleep`` to observe the tarpit
    without waiting). ``checks_started`` and ``peak_checks`` count scrypt checks, so tests can
    see how many guesses reached the hash and how many ran at once (memory: 32 MiB each).
    """

    def __init__(
        self,
        *,
        window: float = WINDOW_SECONDS,
        concurrent_checks: int = max(1, min(4, os.cpu_count() or 1)),
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_keys: int = 100_000,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.concurrent_checks = concurrent_checks
        self.verified = VerifiedLogins()
        self.checks_started = 0
        self.peak_checks = 0
        self._running = 0
        self._slots = asyncio.Semaphore(concurrent_checks)
        self._failures = FailureLog(window, clock, max_keys)
        self._in_flight: dict[Hashable, int] = {}
        self._settling: dict[PairKey, asyncio.Event] = {}  # pairs with attempts waiting
        self._throttled: set[PairKey] = set()  # pairs whose incident was logged
        self._tarpitted: set[UserKey] = set()  # usernames whose incident was logged

    async def check(
        self, client: str, user: UserKey, password: str, stored: ScryptHash, *, protocol: str
    ) -> Accepted | Refused:
        """Is ``password`` right for ``stored`` (the user's hash, or a dummy for an unknown
        user)? Refused without a check while the (client, user) pair is over its budget.

        One check at a time per pair: a second attempt of the pair waits for the first to
        settle, then is judged again. Guesses sent at once are so counted one by one, and a
        program that opens sixteen connections at once with its right password pays one scrypt
        check: the others find it remembered.
        """
        pair = PairKey(client, user)
        while True:
            refusal = self._over_budget(pair)
            if refusal is not None:
                self._report_throttled(pair, protocol)
                metrics.login(protocol, "throttled")
                return refusal
            if self.verified.matches(user, password, stored):
                self._succeeded(pair, client, protocol)
                return Accepted(from_cache=True)
            if pair not in self._in_flight:
                break
            await self._settled(pair)
        self._throttled.discard(pair)
        delay = self._tarpit(user, client)
        self._claim(pair)
        try:
            if delay:
                await self.sleep(delay)
            accepted = await self._verify(user, password, stored)
        finally:
            self._release(pair)
        if accepted is not None:
            self._succeeded(pair, client, protocol)
            return accepted
        self.record_failure(client, user, protocol, "wrong username or password")
        return WRONG

    def _succeeded(self, pair: PairKey, client: str, protocol: str) -> None:
        self._failures.forget(pair)
        self._failures.forget(pair.user, client)
        metrics.login(protocol, "ok")

    def record_failure(self, client: str, user: UserKey, protocol: str, reason: str) -> None:
        """Count a failed login against the pair and the username, and log it."""
        failures = self._failures.add(PairKey(client, user), client)
        self._failures.add(user, client)
        metrics.login(protocol, "failed")
        log.warning(
            "login.failed",
            protocol=protocol,
            client=client,
            user=_shown(user),
            reason=reason,
            failures=failures,
        )

    # -- the pair budget -----------------------------------------------------------------------

    def _over_budget(self, pair: PairKey) -> Refused | None:
        limit = pair.user.realm.pair_limit
        failures = len(self._failures.recent(pair))
        if failures < limit:
            return None
        # Free again once enough failures have left the window.
        must_expire = failures - limit  # index of the failure whose expiry frees one attempt
        return Refused(retry_after=max(1.0, self._failures.expires_in(pair, must_expire)))

    def _report_throttled(self, pair: PairKey, protocol: str) -> None:
        if pair in self._throttled:
            return
        self._throttled.add(pair)
        if len(self._throttled) > 10_000:  # bounded: forget incidents whose failures expired
            self._throttled = {p for p in self._throttled if p in self._failures}
        log.warning(
            "login.throttled",
            protocol=protocol,
            client=pair.client,
            user=_shown(pair.user),
            failures=len(self._failures.recent(pair)),
            limit=pair.user.realm.pair_limit,
            retry_after=math.ceil(self._over_budget(pair).retry_after),  # type: ignore[union-attr]
        )

    # -- the username tarpit -------------------------------------------------------------------

    def _tarpit(self, user: UserKey, client: str) -> float:
        """The delay for this attempt: failures of the username from every address, plus the
        attempts for it already under way from other addresses (one at most per address)."""
        count = len(self._failures.recent(user)) + self._in_flight.get(user, 0)
        delay = tarpit_delay(count)
        if not delay:
            self._tarpitted.discard(user)
        elif user not in self._tarpitted:
            self._tarpitted.add(user)
            if len(self._tarpitted) > 10_000:
                self._tarpitted = {u for u in self._tarpitted if u in self._failures}
            log.warning(
                "login.tarpit",
                client=client,
                user=_shown(user),
                failures=count,
                delay=delay,
            )
        return delay

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
