"""Where the login gate remembers recent failed logins: one :class:`FailureLog` interface, two
homes for the failures.

* :class:`MemoryFailureLog`, for one gateway (SQLite mode): this process's memory, bounded, no
  database round trip per login.
* :class:`SqlFailureLog`, for several gateways on one PostgreSQL: every failure is a row of the
  shared ``login_failures`` table and every attempt reads the rows, so an attacker who spreads
  guesses over the instances behind a load balancer gets the budget of one instance. One read
  per login attempt, one write per failure (and per right password after failures): never
  anything per command. Rows carry a digest of the username, not the username (a client can
  send any text, and a length PostgreSQL would refuse to index), and are deleted once they have
  left the window. Instances compare their wall clocks, so they must keep them in sync (NTP).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..logs import get_logger
from ..store import Connection, SqlDatabase, StoreError, epoch_text, text_epoch
from ._keys import PairKey, UserKey

log = get_logger(__name__)

Clock = Callable[[], float]
_T = TypeVar("_T")

WINDOW_SECONDS = 300.0
# After the shared table could not be reached, this instance counts on its own for so long
# before it tries the database again: a login then waits for no connection timeout.
OFFLINE_SECONDS = 30.0


@dataclass(frozen=True)
class Tally:
    """What a log knows of a (client, username) pair at one moment."""

    pair: int  # the pair's failures inside the window
    user: int  # the username's failures inside the window, from every address
    frees_in: float = 0.0  # seconds until the pair is under its budget again (0: it is)


class FailureLog(Protocol):
    """Recent failed logins per (client, username) pair and per username, in a sliding window."""

    @property
    def window(self) -> float:
        """Seconds a failure counts."""

    async def tally(self, pair: PairKey) -> Tally:
        """The pair's and its username's failures now."""

    async def add(self, pair: PairKey) -> int:
        """Record one failure of the pair (and so of its username); the pair's count now."""

    async def clear(self, pair: PairKey) -> None:
        """A right password: forget the pair's failures, which are also the username's
        failures from that address (those from other addresses stay)."""


def _frees_in(pair: PairKey, failures: int, expiry_of: Callable[[int], float]) -> float:
    """Seconds until the pair is under its budget: until the failure whose expiry frees one
    attempt (index ``failures - limit``, oldest first) leaves the window."""
    limit = pair.user.realm.pair_limit
    return 0.0 if failures < limit else expiry_of(failures - limit)


class SlidingWindows:
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


class MemoryFailureLog:
    """This process's failures: one gateway counts alone, without a database round trip.

    Its methods never wait for anything, so the gate's decisions around them stay atomic on the
    event loop.
    """

    def __init__(self, window: float, clock: Clock, max_keys: int = 100_000) -> None:
        self.windows = SlidingWindows(window, clock, max_keys)

    @property
    def window(self) -> float:
        return self.windows.window

    async def tally(self, pair: PairKey) -> Tally:
        failures = len(self.windows.recent(pair))
        frees_in = _frees_in(pair, failures, lambda index: self.windows.expires_in(pair, index))
        return Tally(failures, len(self.windows.recent(pair.user)), frees_in)

    async def add(self, pair: PairKey) -> int:
        self.windows.add(pair.user, pair.client)
        return self.windows.add(pair, pair.client)

    async def clear(self, pair: PairKey) -> None:
        self.windows.forget(pair)
        self.windows.forget(pair.user, pair.client)


class SqlFailureLog:
    """Failures in the shared database (``login_failures``), counted by every instance.

    ``clock`` is the wall clock (instances compare its readings). When the database cannot be
    reached the instance falls back to counting on its own in memory (logged once per outage),
    so logins go on with a per-instance budget instead of failing, and uses the table again
    ``OFFLINE_SECONDS`` later.
    """

    def __init__(
        self,
        db: SqlDatabase,
        window: float = WINDOW_SECONDS,
        clock: Clock = time.time,
    ) -> None:
        self._db = db
        self._window = window
        self._clock = clock
        self._local = MemoryFailureLog(window, clock)
        self._offline_until = -math.inf
        self._pruned_at = -math.inf

    @property
    def window(self) -> float:
        return self._window

    async def tally(self, pair: PairKey) -> Tally:
        return await self._shared(pair, self._tally_job, self._local.tally)

    async def add(self, pair: PairKey) -> int:
        return await self._shared(pair, self._add_job, self._local.add)

    async def clear(self, pair: PairKey) -> None:
        await self._shared(pair, _clear_job, self._local.clear)

    async def _shared(
        self,
        pair: PairKey,
        job: Callable[[Connection, PairKey, float], _T],
        local: Callable[[PairKey], Awaitable[_T]],
    ) -> _T:
        """*job* on the shared table, or *local* while the database is unreachable."""
        now = self._clock()
        if now < self._offline_until:
            return await local(pair)
        try:
            result = await self._db.run(lambda conn: job(conn, pair, now))
        except StoreError as error:
            self._offline_until = now + OFFLINE_SECONDS
            log.warning("login.failures_local", reason=str(error), retry_in=OFFLINE_SECONDS)
            return await local(pair)
        if self._offline_until > -math.inf:
            self._offline_until = -math.inf
            log.info("login.failures_shared_again")
        return result

    def _tally_job(self, conn: Connection, pair: PairKey, now: float) -> Tally:
        cutoff = epoch_text(now - self._window)
        user, from_client = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN client = ? THEN 1 ELSE 0 END), 0) "
            "FROM login_failures WHERE user_digest = ? AND at > ?",
            (pair.client, user_digest(pair.user), cutoff),
        ).fetchone()
        failures = int(from_client)

        def expiry_of(index: int) -> float:
            row = conn.execute(
                "SELECT at FROM login_failures WHERE user_digest = ? AND client = ? AND at > ? "
                "ORDER BY at LIMIT 1 OFFSET ?",
                (user_digest(pair.user), pair.client, cutoff, index),
            ).fetchone()
            if row is None:  # a right password cleared them since the count
                return 0.0
            return max(0.0, text_epoch(row[0]) + self._window - now)

        return Tally(failures, int(user), _frees_in(pair, failures, expiry_of))

    def _add_job(self, conn: Connection, pair: PairKey, now: float) -> int:
        digest = user_digest(pair.user)
        cutoff = epoch_text(now - self._window)
        conn.execute(
            "INSERT INTO login_failures (user_digest, client, at) VALUES (?, ?, ?)",
            (digest, pair.client, epoch_text(now)),
        )
        if now - self._pruned_at >= self._window / 10:  # rows out of the window, now and then
            self._pruned_at = now
            conn.execute("DELETE FROM login_failures WHERE at <= ?", (cutoff,))
        (failures,) = conn.execute(
            "SELECT COUNT(*) FROM login_failures WHERE user_digest = ? AND client = ? AND at > ?",
            (digest, pair.client, cutoff),
        ).fetchone()
        return int(failures)


def _clear_job(conn: Connection, pair: PairKey, now: float) -> None:
    conn.execute(
        "DELETE FROM login_failures WHERE user_digest = ? AND client = ?",
        (user_digest(pair.user), pair.client),
    )


def user_digest(user: UserKey) -> str:
    """The username as the table keys it: SHA-256 of realm and casefolded name, fixed width."""
    named = f"{user.realm.name}\0{user.name}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(named).hexdigest()
