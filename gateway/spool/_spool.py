"""The durable outbound queue and its delivery worker.

``submit`` returns only after the message and its state are durable: fsynced files
(:class:`FileSpool`, see ``_files``) or a committed database transaction (``_database``, when
several instances share one PostgreSQL). The storage is a :class:`~._store.SpoolStore`; the one
worker here runs over either. It is an asyncio task on the gateway's loop and delivers what is
due through the account's :class:`~gateway.providers.Sender`:

* at most ``sender.concurrency(account)`` messages at once per account (Graph and Gmail 4, an
  upstream account its ``max_sessions``), and at most ``pace_per_minute`` sends per account
  when configured;
* Temporary → retried after the provider's Retry-After, or else a capped exponential backoff with
  jitter, until ``retry_window`` has passed, then dead;
* a throttle (429/503, Google's quota 403: ``Temporary.throttled``) pauses *the account*: none
  of its messages, queued or new (inline delivery included), is tried until the Retry-After has
  passed (plus up to 10 %), or without one, the backoff for the account's consecutive
  throttles. Other accounts keep sending. After a pause, one message goes first; the rest
  follow once the provider has answered it without a throttle. Pauses are kept in
  ``pauses.json`` for ``gateway queue`` and for the next start;
* ReauthRequired → held; released by :meth:`release` (the account was reconnected), by any later
  successful send of the same account, or by a periodic retry every ``held_retry`` seconds;
* Permanent → dead, with the provider's reason, until someone retries or deletes it.

Before an attempt the worker *claims* the message from its store. The file store always grants
it; the database store leases it to this instance, so that of several instances exactly one
tries it, and a message another instance committed, retried or holds is learnt from the claim's
answer. If the store cannot be used (the database unreachable) the worker logs it once, leaves
the message where it was and tries again a little later.

Intake first: while messages are arriving (one began or was committed within ``intake_quiet``
seconds) and keep the loop busy (its thread's CPU share at least ``busy_above``, ``_loop_load``)
the worker starts no new attempt, for at most ``max_defer`` seconds at a time; sends already
under way go on. A delivery costs the event loop several times what accepting a message
does (HTTPS, JSON, the provider's reply), so during a burst the SMTP clients get their 250s at
the intake's own pace and the queue is worked off right after (issue 13); under steady load the
worker still starts everything due at least every ``max_defer`` seconds.

Delivery is at-least-once. The state file says when an attempt *started*; the flag is cleared
when the attempt ends with a known outcome (any answer from the provider, or a connection that
never opened). Only a message whose last attempt's outcome is unknown (a timeout or reset after
the request went out, a crash, kill or stop timeout) is looked up in the provider's sent mail by
Message-ID before it is sent again; a failed look-up leaves it unknown. Every attempt, look-up
included, counts in ``attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import mmap
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import metrics
from ..config import AccountSettings, Settings
from ..delivery import Permanent, ReauthRequired, Temporary
from ..logs import get_logger
from ._commit import Batched, GroupCommitter
from ._files import Record
from ._incoming import IncomingMessage
from ._loop_load import LoopLoad
from ._memory import LARGE, give_back, map_big_buffers
from ._store import Claim, FileStore, SpoolStore
from ._types import Envelope, SpoolError, SubmitResult, held_hint

if TYPE_CHECKING:
    from ..providers import Sender

log = get_logger(__name__)

Outcome = Literal["sent", "retry", "paused", "held", "dead", "gone"]
STORE_RETRY_SECONDS = 5.0  # a message the store could not claim is tried again after this


@dataclass(frozen=True)
class Refusal:
    """A permanent refusal seen during inline delivery, as the SMTP reply to give."""

    reply: str


class SpoolWorker:
    """The spool: ``submit`` from smtp_in, ``start``/``stop`` from the app, queue tools."""

    def __init__(
        self,
        store: SpoolStore,
        accounts: Iterable[AccountSettings],
        senders: Mapping[str, Sender],
        *,
        hostname: str = "localhost",
        deliver_inline: bool = False,
        retry_window: float = 72 * 3600.0,
        max_backoff: float = 3600.0,
        first_backoff: float = 30.0,
        held_retry: float = 900.0,
        rescan_interval: float = 30.0,
        max_in_flight: int = 64,
        intake_quiet: float = 0.05,
        max_defer: float = 1.0,
        busy_above: float = 0.5,
        jitter: Callable[[], float] = random.random,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.accounts = {a.username: a for a in accounts}
        self.senders = senders
        self.hostname = hostname
        self.deliver_inline = deliver_inline
        self.retry_window = retry_window
        self.max_backoff = max_backoff
        self.first_backoff = first_backoff
        self.held_retry = held_retry
        self.rescan_interval = rescan_interval
        self.max_in_flight = max_in_flight
        self.intake_quiet = intake_quiet
        self.max_defer = max_defer
        self.busy_above = busy_above  # the loop's CPU share above which the intake needs it
        self._loop_load = LoopLoad()
        self.jitter = jitter
        self.pause = pause  # how pacing waits; tests record the waits instead of timing them
        self._intake_at = -math.inf  # monotonic time a message last began or was committed
        self._holding_since: float | None = None  # the worker has left the loop to the intake
        self._records: dict[str, Record] = {}
        self._generation = 0  # counts directory listings begun by _rescan
        self._touched: dict[str, int] = {}  # id → generation when the worker last changed it
        self._committer = GroupCommitter(store.commit_batch)
        self._claimer: Batched[Record, Claim] = Batched(store.claim_batch, "spool-claimer")
        self._marker: Batched[Record, bool] = Batched(store.mark_batch, "spool-marker")
        self._saver: Batched[Record, bool] = Batched(store.save_batch, "spool-saver")
        self._forgetter: Batched[tuple[Record, str, str], None] = Batched(
            store.forget_batch, "spool-forgetter"
        )
        self._store_down = False  # the store failed; logged once until it works again
        self._busy: set[str] = set()
        self._arriving: set[str] = set()  # committed to disk, not yet tracked by submit
        self.found_by_rescan = 0  # messages the worker had lost track of (see _rescan)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots: dict[str, tuple[int, asyncio.Semaphore]] = {}  # account → (size, slots)
        self._next_slot: dict[str, float] = {}
        self._releases: dict[str, int] = {}  # per account: how often it was released
        self._held_accounts: set[str] = set()  # accounts that may have held mail (see release)
        self._paused: dict[str, float] = {}  # account → epoch until which the provider said wait
        self._throttles: dict[str, int] = {}  # account → throttles without Retry-After in a row
        self._probing: set[str] = set()  # accounts whose next request goes alone, after a pause
        self._in_flight: dict[str, int] = {}  # account → its messages being delivered
        self._slot_waiters: dict[str, int] = {}  # see waiting_for_slot
        self._pauses_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        store.prepare()

    # -- submission ---------------------------------------------------------------------------

    def receive(self, prologue: bytes = b"") -> IncomingMessage:
        """A new message to stream into the spool; ``prologue`` is stored before its content."""
        self.intake_seen(time.monotonic())
        return IncomingMessage(self.store.tmp, self.hostname, prologue)

    async def submit(self, envelope: Envelope, message: bytes | IncomingMessage) -> SubmitResult:
        """Commit the message (group commit, see ``_commit``), then queue or deliver it inline.

        Nothing here waits for anything but the commit: no logging I/O, no rescan.
        """
        if isinstance(message, bytes):
            incoming = self.receive()
            await incoming.write(message)
        else:
            incoming = message
        incoming.finish()
        record = Record(incoming.id, envelope, incoming.message_id, incoming.size)
        self._arriving.add(record.id)  # a listing may see it before it is tracked below
        try:
            await self._committer.commit(record, incoming)
        except SpoolError:
            raise
        except OSError as error:
            raise SpoolError(f"cannot store the message: {error.strerror or error}") from error
        finally:
            self._arriving.discard(record.id)  # no await from here until it is tracked
        self.intake_seen(time.monotonic())
        queued = SubmitResult(f"250 2.0.0 Ok: queued as {record.id}", record.id)
        if record.size >= LARGE:  # what receiving it took, trimmed without delaying the 250
            self._keep(asyncio.create_task(give_back(record.size), name="spool-trim"))
        if not self.deliver_inline or self._must_wait(envelope.account):
            self._track(record)  # a paused account's mail waits in the queue like the rest
            return queued
        self._start(record)
        try:
            claimed = await self._claim(record)  # another instance may have taken it first
            if claimed is not None:
                outcome = await self._attempt_claimed(claimed, inline=True)
            else:  # not to be tried now: known (as stored) unless it is gone
                outcome = "retry" if record.id in self._records else "gone"
        finally:
            self._finish(record)
        if isinstance(outcome, Refusal):
            return SubmitResult(outcome.reply, None)
        if outcome in ("retry", "paused", "held"):
            self._track(self._records.get(record.id, record))
        return queued

    # -- the worker -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what is on disk (a previous run's queue included) and start delivering."""
        map_big_buffers()  # a large message's buffers go back to the system when freed
        await self._rescan()
        self._paused = await self.store.load_pauses(time.time())
        self._probing = set(self._paused)
        self._stopping = False
        await self.store.start(self._arrived, self._paused_elsewhere)
        self._runner = asyncio.create_task(self._run(), name="spool-worker")
        log.info("spool.started", queued=len(self._records))

    async def stop(self, grace: float = 30.0) -> None:
        """Stop starting sends; wait up to ``grace`` seconds for those in flight, then cancel.

        What is left stays on disk for the next start; a cancelled attempt is marked as started
        and so is looked up in sent mail before it is sent again.
        """
        if self._runner is not None:
            # A flag, not cancel(): Python 3.11's wait_for can swallow a cancellation.
            self._stopping = True
            self._wake.set()
            await self._runner
            self._runner = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.store.stop()
        log.info("spool.stopped", left=len(self._records))

    async def _run(self) -> None:
        last_scan = time.monotonic()
        while not self._stopping:
            if time.monotonic() - last_scan >= self.rescan_interval:
                await self._rescan_safely()
                last_scan = time.monotonic()
            hold = self.intake_hold(time.monotonic())
            if hold > 0.0:
                await self._sleep(hold)
                continue
            if self._busy and self.max_in_flight - len(self._busy) < self._refill_at:
                # Too few free places to be worth a pass over the whole queue: each pass sorts
                # every waiting message, and one per finished send made a burst quadratic.
                await self._sleep(self.rescan_interval - (time.monotonic() - last_scan))
                continue
            now = time.time()
            waiting = [
                r
                for r in self._records.values()
                if r.id not in self._busy and r.state in ("queued", "held")
            ]
            waiting.sort(key=lambda r: (self._due(r), r.id))
            for record in waiting:
                if self._due(record) > now or len(self._busy) >= self.max_in_flight:
                    break
                if self._must_wait(record.envelope.account):
                    continue  # its account's probe is out; the probe's end wakes us
                self._start(record)
                self._keep(asyncio.create_task(self._deliver(record), name=f"spool-{record.id}"))
            pending = [
                self._due(r)  # a paused account's records are due when the pause ends
                for r in waiting
                if r.id not in self._busy and not self._probe_out(r.envelope.account)
            ]
            pause = self.rescan_interval - (time.monotonic() - last_scan)
            if pending and len(self._busy) < self.max_in_flight:
                pause = min(pause, max(0.0, min(pending) - time.time()))
            await self._sleep(pause)

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` have passed or something wakes the worker (not when stopping)."""
        self._wake.clear()
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._wake.wait()

    @property
    def _refill_at(self) -> int:
        """Free in-flight places a pass waits for while sends are under way: a quarter of
        ``max_in_flight`` (the account limits keep the rest waiting for a slot meanwhile)."""
        return max(1, self.max_in_flight // 4)

    @property
    def holding_for_intake(self) -> bool:
        """The worker is leaving the loop to the intake (see :meth:`intake_hold`)."""
        return self._holding_since is not None

    def intake_seen(self, now: float) -> None:
        """A message began arriving or was committed at ``now`` (``time.monotonic()``)."""
        self._intake_at = max(self._intake_at, now)

    def intake_hold(self, now: float) -> float:
        """Seconds the worker leaves the loop to the intake before it starts attempts: while
        messages arrive (one within ``intake_quiet``), up to ``max_defer`` from the moment it
        first held back; 0 once the intake is quiet or the hold has lasted ``max_defer``."""
        quiet_in = self._intake_at + self.intake_quiet - now
        if quiet_in <= 0.0 or self._loop_load.share(now) < self.busy_above:
            self._holding_since = None
            return 0.0
        if self._holding_since is None:
            self._holding_since = now
        left = self._holding_since + self.max_defer - now
        if left <= 0.0:
            self._holding_since = None  # this pass starts what is due; the next may hold again
            return 0.0
        return min(left, quiet_in)

    def _keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a background task until it ends (``stop`` waits for them)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, record: Record) -> None:
        try:
            claimed = await self._claim(record)
            if claimed is not None:
                await self._attempt_claimed(claimed)
        finally:
            self._finish(record)
            self._wake.set()

    async def _claim(self, record: Record) -> Record | None:
        """The message as stored, taken for this instance's attempt; None when it is not to be
        tried now (gone, another instance's, no longer due, or the store cannot be used: then
        it is tried again after ``STORE_RETRY_SECONDS``)."""
        try:
            taken, stored = await self._claimer.run(record)
        except SpoolError as error:
            self._store_failed(error)
            self._later(record)
            return None
        self._store_works()
        if stored is None:
            self._gone(record)
            return None
        self._records[record.id] = stored  # what the store says, another instance's work too
        self._touch(record.id)
        return stored if taken else None

    async def _attempt_claimed(self, record: Record, inline: bool = False) -> Outcome | Refusal:
        """One attempt on a claimed message; the claim is given back however it ends. If the
        store fails meanwhile, the message stays as last stored (an attempt that had begun is
        looked up in sent mail before the next) and is tried again later."""
        try:
            return await self._attempt(record, inline)
        except SpoolError as error:
            self._store_failed(error)
            self._later(record)
            return "retry"
        finally:
            await self.store.release_claim(record)

    def _later(self, record: Record) -> None:
        """Keep the message in memory, due again after ``STORE_RETRY_SECONDS`` (not saved)."""
        record.next_attempt = max(record.next_attempt, time.time() + STORE_RETRY_SECONDS)
        self._records[record.id] = record
        self._touch(record.id)

    def _store_failed(self, error: Exception) -> None:
        """One log line per outage of the store, however many operations fail during it."""
        if not self._store_down:
            self._store_down = True
            log.error("spool.store_unavailable", error=str(error))

    def _store_works(self) -> None:
        if self._store_down:
            self._store_down = False
            log.info("spool.store_back")

    def _start(self, record: Record) -> None:
        account = record.envelope.account
        self._busy.add(record.id)
        self._in_flight[account] = self._in_flight.get(account, 0) + 1

    def _finish(self, record: Record) -> None:
        account = record.envelope.account
        self._busy.discard(record.id)
        self._in_flight[account] = self._in_flight.get(account, 1) - 1

    def _due(self, record: Record) -> float:
        """When the record may be tried: its own next attempt, or its account's pause end."""
        return max(record.next_attempt, self._paused.get(record.envelope.account, 0.0))

    def _must_wait(self, account: str) -> bool:
        """Paused by the provider, or its one request after a pause is still out."""
        return self._paused.get(account, 0.0) > time.time() or self._probe_out(account)

    def _probe_out(self, account: str) -> bool:
        """After a pause, the account's first request is on its way: the others wait for it."""
        return account in self._probing and self._in_flight.get(account, 0) > 0

    async def _rescan_safely(self) -> None:
        """A rescan that, when the store cannot be read, keeps what is known until the next."""
        try:
            await self._rescan()
        except SpoolError as error:
            self._store_failed(error)
        else:
            self._store_works()

    def _arrived(self, records: list[Record] | None) -> None:
        """Messages another instance (or ``gateway queue``) stored or changed, as stored now;
        None: notices may have been missed, so rescan."""
        if records is None:
            self._keep(asyncio.create_task(self._rescan_safely(), name="spool-rescan"))
            return
        for record in records:
            if record.id not in self._busy and record.id not in self._arriving:
                self._track(record)

    def _paused_elsewhere(self, pauses: dict[str, float]) -> None:
        """Another instance's provider pauses: none of those accounts' mail goes before."""
        for account, until in pauses.items():
            if until > self._paused.get(account, 0.0):
                self._paused[account] = until
                self._probing.add(account)
        self._wake.set()

    async def _rescan(self) -> None:
        """Take the disk's word for every message not in flight (``gateway queue`` edits it).

        Only for records the worker did not touch since the listing began: a message committed,
        saved or forgotten while the directory was being read is newer than what the listing
        says about it, and stays as the worker knows it (issue 13: such messages were dropped
        from memory and waited for the next rescan).
        """
        try:
            await self.store.tidy()
        except (OSError, SpoolError) as error:  # space is reclaimed at the next rescan
            log.warning("spool.tidy_failed", error=str(error))
        self._generation += 1
        started = self._generation
        on_disk = {r.id: r for r in await self.store.records()}
        for queue_id in list(self._records):
            if queue_id not in on_disk and self._settled(queue_id, started):
                del self._records[queue_id]
        if self._runner is not None:  # the worker runs: it should already know every message
            self._report_found(on_disk, started)
        for queue_id, record in on_disk.items():
            if self._settled(queue_id, started):
                self._records[queue_id] = record
                if record.state == "held":
                    self._held_accounts.add(record.envelope.account)
        for queue_id, touched in list(self._touched.items()):
            if touched < started:  # this listing came after that change: the disk knows it
                del self._touched[queue_id]

    def _report_found(self, on_disk: Mapping[str, Record], listing_started: int) -> None:
        """Count and log messages on disk the worker did not know: each of them waited for
        this rescan (issue 13's goal is that none does; the benchmarks print the count)."""
        found = [
            queue_id
            for queue_id in on_disk
            if queue_id not in self._records
            and queue_id not in self._arriving
            and self._settled(queue_id, listing_started)
        ]
        if found:
            self.found_by_rescan += len(found)
            log.warning("spool.rescan_found", count=len(found), queue_ids=found[:10])

    def _settled(self, queue_id: str, listing_started: int) -> bool:
        """Not in flight, and not changed in memory since the listing that began then."""
        return queue_id not in self._busy and self._touched.get(queue_id, 0) < listing_started

    def _touch(self, queue_id: str) -> None:
        """The worker changed this record (or forgot it): a listing under way is older."""
        self._touched[queue_id] = self._generation

    def _track(self, record: Record) -> None:
        self._records[record.id] = record
        self._touch(record.id)
        self._wake.set()

    # -- one attempt ----------------------------------------------------------------------------

    async def _attempt(self, record: Record, inline: bool = False) -> Outcome | Refusal:
        """Deliver once. Inline, a permanent refusal is returned as the SMTP reply and the
        message is forgotten instead of dead-lettered."""
        account = self.accounts.get(record.envelope.account)
        sender = self.senders.get(account.provider) if account else None
        if account is None or sender is None:
            # Held, not dead: an account removed (or misspelt) by a reload loses no mail; a
            # reload that brings it back releases it.
            name = record.envelope.account
            return await self._hold(
                record,
                f"account {name!r} is not configured (removed by a config reload?): add it back "
                f"and run `gateway reload`, or delete the message with `gateway queue delete "
                f"{record.id}`",
            )
        await self._pace(account)
        async with self._delivery_slot(account.username, sender.concurrency(account)):
            if self._paused.get(account.username, 0.0) > time.time():
                return "paused"  # throttled while this one waited for a slot: no request
            try:
                mapped = getattr(sender, "reads_mapped_files", False)
                async with self.store.message(record.id, mapped) as message:
                    outcome = await self._try(record, message, inline, account, sender)
                    return metrics.send_outcome(account.provider, outcome)
            except FileNotFoundError:
                return self._gone(record)
            finally:
                if self._paused.get(account.username, 0.0) <= time.time():
                    self._probing.discard(account.username)  # answered without a throttle
                await give_back(record.size)  # what sending a large message took

    async def _try(
        self,
        record: Record,
        message: bytes | mmap.mmap,
        inline: bool,
        account: AccountSettings,
        sender: Sender,
    ) -> Outcome | Refusal:
        releases = self._releases.get(account.username, 0)
        began = time.time()
        # The previous attempt's outcome is unknown: look in sent mail before sending.
        looking_up = record.attempt_started
        try:
            record.attempt_started = True
            record.attempts += 1
            if not await self._marker.run(record):
                return self._gone(record)  # deleted, or (a database spool) no longer ours
            if looking_up:
                if await sender.already_sent(account, record.message_id):
                    await self._sent(
                        record, "found in sent mail after an interrupted attempt", began
                    )
                    return "sent"
                looking_up = False
            result = await sender.send(account, record.envelope, message)
        except FileNotFoundError:
            return self._gone(record)
        except Temporary as error:
            if not looking_up and not error.outcome_unknown:
                record.attempt_started = False  # answered, or never connected: not sent
            if error.throttled:
                until = await self._pause(account.username, error.retry_after, str(error))
                return await self._retry(record, str(error), None, not_before=until)
            return await self._retry(record, str(error), error.retry_after)
        except ReauthRequired as error:
            if not looking_up:
                record.attempt_started = False  # refused before anything was sent
            if self._releases.get(account.username, 0) != releases:
                return await self._retry(record, str(error), 0.0)  # reconnected meanwhile
            return await self._hold(record, str(error))
        except Permanent as error:
            if not inline:
                await self._dead(record, error.reason)
                return "dead"
            await self._forget(record, "refused", error.reason)
            text = " ".join(error.reason.split())[:400]  # one reply line, bounded
            return Refusal(f"{error.smtp_code} {error.status} {text}")
        except SpoolError:
            raise  # the store, not the send, failed: see _attempt_claimed
        except Exception as error:  # a bug must not lose the mail or spin: retry later
            log.exception("spool.attempt_failed", queue_id=record.id)
            return await self._retry(record, f"internal error: {error!r}", None)
        self._throttles.pop(account.username, None)
        await self._sent(record, result.detail, began)
        await self.release(account.username)  # a send worked: the account's held mail may go
        return "sent"

    def _slot(self, username: str, size: int) -> asyncio.Semaphore:
        """The account's ``size`` delivery slots; new ones when its size changed (a reload:
        sends already holding an old slot finish on it)."""
        known = self._slots.get(username)
        if known is None or known[0] != size:
            known = self._slots[username] = (size, asyncio.Semaphore(size))
        return known[1]

    @contextlib.asynccontextmanager
    async def _delivery_slot(self, username: str, size: int) -> AsyncIterator[None]:
        """One of the account's slots for the length of an attempt; counted while waited for."""
        slot = self._slot(username, size)
        self._slot_waiters[username] = self._slot_waiters.get(username, 0) + 1
        try:
            await slot.acquire()
        finally:
            self._slot_waiters[username] -= 1
        try:
            yield
        finally:
            slot.release()

    def waiting_for_slot(self, account: str) -> int:
        """The account's deliveries that are under way but wait for one of its slots (it
        sends ``sender.concurrency(account)`` at once): with the sends the provider sees, a
        test knows every started delivery is accounted for before it checks the limit."""
        return self._slot_waiters.get(account, 0)

    async def _pace(self, account: AccountSettings) -> None:
        """Space sends ``60 / pace_per_minute`` seconds apart per account, when configured."""
        per_minute = account.sending.pace_per_minute
        if not per_minute:
            return
        now = time.monotonic()
        start = max(now, self._next_slot.get(account.username, now))
        self._next_slot[account.username] = start + 60.0 / per_minute
        await self.pause(start - now)

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Seconds until the next attempt: the provider's Retry-After (plus up to 10 %), or
        ``first_backoff`` doubling per attempt up to ``max_backoff``, jittered to 50-100 %."""
        if retry_after is not None:
            return retry_after * (1.0 + 0.1 * self.jitter())
        ceiling = min(self.max_backoff, self.first_backoff * 2 ** max(0, attempts - 1))
        return ceiling * (0.5 + 0.5 * self.jitter())

    async def _pause(self, account: str, retry_after: float | None, reason: str) -> float:
        """The provider throttles ``account``: no request for it until the returned epoch
        time (the Retry-After, or the backoff for this many throttles in a row)."""
        if retry_after is None:
            throttles = self._throttles[account] = self._throttles.get(account, 0) + 1
            wait = self.backoff(throttles, None)
        else:
            wait = self.backoff(1, retry_after)
        async with self._pauses_lock:
            now = time.time()
            until = max(self._paused.get(account, 0.0), now + wait)
            self._paused[account] = until
            self._probing.add(account)
            current = {name: end for name, end in self._paused.items() if end > now}
            try:
                await self.store.save_pause(account, until, current)
            except (OSError, SpoolError) as error:  # the pause still holds in memory
                log.error("spool.pauses_not_saved", error=str(error))
        log.warning("spool.paused", account=account, seconds=round(until - now, 3), reason=reason)
        self._wake.set()
        return until

    def pauses(self) -> dict[str, datetime]:
        """Accounts the provider paused, with the (UTC) time until which they wait."""
        now = time.time()
        return {
            account: datetime.fromtimestamp(until, UTC)
            for account, until in self._paused.items()
            if until > now
        }

    async def _retry(
        self,
        record: Record,
        reason: str,
        retry_after: float | None,
        not_before: float | None = None,
    ) -> Outcome:
        now = time.time()
        if now - record.retry_since >= self.retry_window:
            hours = self.retry_window / 3600
            await self._dead(record, f"still failing after {hours:g} h: {reason}")
            return "dead"
        record.state, record.reason = "queued", reason
        if not_before is None:
            not_before = now + self.backoff(record.attempts, retry_after)
        record.next_attempt = not_before
        await self._save(record)
        log.info("spool.retry", queue_id=record.id, attempts=record.attempts, reason=reason)
        return "retry"

    async def _hold(self, record: Record, reason: str) -> Outcome:
        record.state, record.reason = "held", reason
        record.next_attempt = time.time() + self.held_retry
        account = record.envelope.account
        self._held_accounts.add(account)
        await self._save(record)
        log.warning("spool.held", queue_id=record.id, account=account, then=held_hint(account))
        return "held"

    async def _dead(self, record: Record, reason: str) -> None:
        record.state, record.reason = "dead", reason
        await self._save(record)
        await self.store.log_delivery(record, "dead", reason)
        log.warning("spool.dead", queue_id=record.id, reason=reason)

    async def _sent(self, record: Record, detail: str, began: float) -> None:
        """Logged with ``queue_wait``: seconds from the commit until the delivering attempt
        began (backoffs included), which shows whether a message sat waiting for a rescan."""
        await self._forget(record, "sent", detail)
        wait = round(began - record.created, 3)
        log.info("spool.sent", queue_id=record.id, detail=detail, queue_wait=wait)

    async def _forget(self, record: Record, result: str, detail: str) -> None:
        """Remove the files, then log the outcome (a crash between repeats no delivery)."""
        self._records.pop(record.id, None)
        self._touch(record.id)
        await self._forgetter.run((record, result, detail))

    async def _save(self, record: Record) -> None:
        if await self._saver.run(record):
            self._records[record.id] = record
            self._touch(record.id)
        else:
            self._gone(record)

    def _gone(self, record: Record) -> Outcome:
        """Deleted by ``gateway queue delete`` while in flight."""
        self._records.pop(record.id, None)
        self._touch(record.id)
        return "gone"

    # -- queue tools --------------------------------------------------------------------------

    async def release(self, account: str) -> int:
        """The account was reconnected: send its held mail now. Returns how many.

        An attempt in flight that ends in "reauth required" after this call is retried at once
        rather than held, since it may have used the token from before the reconnection.
        """
        self._releases[account] = self._releases.get(account, 0) + 1
        count = 0
        if account not in self._held_accounts:  # every send calls this: no pass over the queue
            self._wake.set()
            return 0
        self._held_accounts.discard(account)
        for record in list(self._records.values()):
            if record.envelope.account == account and record.state == "held":
                record.state, record.next_attempt = "queued", 0.0
                await self._save(record)
                count += 1
        self._wake.set()
        return count

    async def retry(self, queue_id: str | None = None) -> int:
        """Make one message (or every waiting, held and dead one) due now, with a new window."""
        changed = await self.store.retry(queue_id)
        await self._rescan()
        self._wake.set()
        return changed

    async def delete(self, queue_id: str) -> bool:
        """Drop a message without delivering it (logged as deleted)."""
        record = self._records.get(queue_id) or await self.store.load(queue_id)
        if record is None:
            return False
        await self._forget(record, "deleted", "deleted by the admin")
        return True

    @property
    def awaiting_commit(self) -> int:
        """Submitted messages waiting for the next group commit (one is under way): tests
        wait for this instead of sleeping before they check that no 250 came early."""
        return self._committer.waiting

    def messages(self) -> list[Record]:
        """Every message in the spool (queued, held, dead), oldest first."""
        return sorted(self._records.values(), key=lambda r: r.id)

    async def recent_deliveries(self, limit: int = 50) -> list[dict[str, Any]]:
        """The delivery log, newest first: message-id, account, recipients, result, time."""
        return await self.store.recent_deliveries(limit)


class FileSpool(SpoolWorker):
    """The single-instance spool: its messages in files under ``directory`` (``_files``)."""

    def __init__(
        self,
        directory: Path,
        accounts: Iterable[AccountSettings],
        senders: Mapping[str, Sender],
        **options: Any,
    ) -> None:
        store = FileStore(directory)
        self.files = store.files  # tests and benches look at the files themselves
        super().__init__(store, accounts, senders, **options)

    @classmethod
    def from_settings(cls, settings: Settings, senders: Mapping[str, Sender]) -> FileSpool:
        return cls(settings.state_dir / "spool", settings.accounts, senders, **options(settings))


def options(settings: Settings) -> dict[str, Any]:
    """The worker's settings from the config (reload changes them in place: ``reload``)."""
    return {
        "hostname": settings.hostname,
        "deliver_inline": settings.smtp.deliver_inline,
        "retry_window": settings.spool.retry_hours * 3600.0,
        "max_backoff": settings.spool.max_backoff_minutes * 60.0,
        "first_backoff": float(settings.spool.first_backoff_seconds),
        "max_defer": settings.spool.hold_for_intake_ms / 1000.0,
    }
