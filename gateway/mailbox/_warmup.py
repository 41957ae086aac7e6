"""Warm views: the sizes and header sections of a mailbox learnt in the background.

A client's first listing (``UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)``) needs the
exact size of every message, and Graph and Gmail only give estimates, so a cold view must
download every body. After an account's first sync (and later for new messages) the view's
:class:`WarmUp` downloads the bodies it has no size for, in provider batches (Graph
``$batch``, Gmail ``/batch/gmail/v1``), and keeps only their size and header section (not the
body: the body cache stays for what clients read).

The warm-up is bounded by the source's :class:`~gateway.providers._inbox.WarmUpQuota`, a
share of the provider's per-mailbox quota counted in a sliding window (batched requests
count one by one, as the providers count them), waits while a client of the view is
downloading (clients first), pauses for a ``Retry-After`` it is given, and stops with the
view.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

from ..logs import get_logger
from ..providers import Batch, WarmUpQuota

log = get_logger(__name__)

FAILURE_PAUSE = 60.0  # seconds after a batch failed outright (provider down, grant revoked)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RequestWindow:
    """At most ``limit`` requests in any ``seconds``-long window (a sliding log)."""

    def __init__(self, limit: int, seconds: float, clock: Clock, sleep: Sleep) -> None:
        self.limit, self.seconds = limit, seconds
        self._clock, self._sleep = clock, sleep
        self._sent: deque[tuple[float, int]] = deque()
        self._used = 0

    async def take(self, count: int) -> None:
        """Wait until ``count`` more requests fit, then count them as sent now."""
        count = min(count, self.limit)
        while True:
            now = self._clock()
            while self._sent and self._sent[0][0] <= now - self.seconds:
                self._used -= self._sent.popleft()[1]
            if self._used + count <= self.limit:
                self._sent.append((now, count))
                self._used += count
                return
            await self._sleep(self._sent[0][0] + self.seconds - now)


class WarmUp:
    """One view's background learner; :meth:`kick` after a sync, :meth:`stop` with the view.

    ``pending`` names the messages still without a size (in the order to learn them),
    ``learn`` keeps what a batch brought, ``clients_idle`` returns once no client of the view
    is downloading; ``fetch_batch`` is the source's batched download.
    """

    def __init__(
        self,
        quota: WarmUpQuota,
        fetch_batch: Callable[[list[str]], Awaitable[Batch]],
        pending: Callable[[], list[str]],
        learn: Callable[[dict[str, bytes]], None],
        clients_idle: Callable[[], Awaitable[object]],  # e.g. Event.wait (its True unused)
        clock: Clock,
        sleep: Sleep = asyncio.sleep,
        name: str = "warm-up",
    ) -> None:
        self.quota = quota
        self._fetch_batch = fetch_batch
        self._pending = pending
        self._learn = learn
        self._clients_idle = clients_idle
        self._clock, self._sleep = clock, sleep
        self._window = RequestWindow(quota.requests, quota.seconds, clock, sleep)
        self._task: asyncio.Task[None] | None = None
        self._name = name
        self._asked: set[str] = set()  # asked in this pass: not asked again in it
        self.requests = 0  # provider requests made (inner requests of batches counted)
        self.round_trips = 0
        self.finished = asyncio.Event()

    def kick(self) -> None:
        """Learn what is pending now, unless a run is already under way (it will see it)."""
        if self._task is None or self._task.done():
            self.finished.clear()
            self._asked.clear()
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        started = self._clock()
        try:
            while True:
                todo = [pid for pid in self._pending() if pid not in self._asked]
                if not todo:
                    break
                await self._clients_idle()
                chunk = todo[: self.quota.batch]
                await self._window.take(len(chunk))
                self.requests += len(chunk)
                self.round_trips += 1
                self._asked.update(chunk)  # once per pass, even while their save is pending
                try:
                    batch = await self._fetch_batch(chunk)
                except Exception as error:  # provider down or grant gone: later, not now
                    log.warning("mailbox.warm_up_failed", name=self._name, error=str(error))
                    self._asked.difference_update(chunk)
                    await self._sleep(FAILURE_PAUSE)
                    continue
                self._learn(batch.bodies)
                if batch.retry_after is not None:  # throttled: ask the refused ones again
                    answered = batch.bodies.keys() | set(batch.gone)
                    self._asked.difference_update(p for p in chunk if p not in answered)
                    await self._sleep(batch.retry_after)
            log.info(
                "mailbox.warm_up_done",
                name=self._name,
                requests=self.requests,
                round_trips=self.round_trips,
                seconds=round(self._clock() - started, 2),
            )
        finally:
            self.finished.set()
