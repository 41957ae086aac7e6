"""Failed-login throttling, so that password guessing (SMTP AUTH, IMAP/POP3 login, the admin
page) gets nowhere fast.

Failures are counted per client address and per username in a sliding window. Once a key has
``limit`` failures inside the window, further attempts for it are refused without even checking
the password, until the oldest failure leaves the window.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]


class LoginThrottle:
    """Sliding-window failure counts; the clock is injectable so tests need not sleep."""

    def __init__(
        self,
        limit: int = 10,
        window: float = 300.0,
        clock: Clock = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, *keys: str) -> float:
        """Seconds until every key may try again; 0 when none of them is blocked."""
        now = self._clock()
        wait = 0.0
        for key in keys:
            failures = self._recent(key, now)
            if len(failures) >= self.limit:
                wait = max(wait, failures[-self.limit] + self.window - now)
        return wait

    def record_failure(self, *keys: str) -> None:
        now = self._clock()
        for key in keys:
            failures = self._recent(key, now)
            failures.append(now)
            self._failures[key] = failures
        if len(self._failures) > self._max_keys:
            self._forget_oldest(now)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures.get(key, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            self._failures.pop(key, None)
        return failures

    def _forget_oldest(self, now: float) -> None:
        """Bound memory when an attacker sprays usernames: drop expired keys, then the oldest."""
        for key in list(self._failures):
            self._recent(key, now)
        excess = len(self._failures) - self._max_keys
        if excess > 0:
            for key in sorted(self._failures, key=lambda k: self._failures[k][-1])[:excess]:
                del self._failures[key]
