"""The spool with a scripted sender: durability, retry/backoff, held, dead, inline, restart,
pacing and the queue command."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import AccountSettings, ConfigError, SendingSettings, load_settings
from gateway.delivery import DeliveryResult, Envelope, Permanent, Temporary
from gateway.oauth import ReauthRequired
from gateway.spool import FileSpool, FileStore, SpoolError, queue_main
from gateway.spool._loop_load import LoopLoad
from gateway.spool._spool import options
from tests.helpers import PASSWORD_HASH

RAW = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
# over _incoming._FLUSH_AT: written out while it arrives, so it is committed as a file of its own
LARGE_RAW = RAW + b"a line of a large message's body, longer than 256 KiB in all\r\n" * 4500


class Scripted:
    """Answers each send with the next scripted outcome (an exception to raise, or success),
    and each sent-mail look-up with the next of ``lookups`` (then: is it in ``sent_ids``)."""

    def __init__(
        self,
        *outcomes: Exception | None,
        sent_ids: set[str] | None = None,
        lookups: tuple[Exception, ...] = (),
        latency: float = 0.0,
        concurrency: int = 4,
    ) -> None:
        self.outcomes = list(outcomes)
        self.slots = concurrency
        self.calls: list[tuple[float, bytes]] = []
        self.sent_ids = sent_ids or set()
        self.lookup_outcomes = list(lookups)
        self.lookups: list[str] = []
        self.latency = latency
        self.in_flight: dict[str, int] = {}
        self.alone: list[bool] = []  # per send: whether no other send of its account overlapped
        self.epochs: list[tuple[str, float]] = []  # (account, time.time()) of each send

    def concurrency(self, account: AccountSettings) -> int:
        return self.slots

    async def send(
        self, account: AccountSettings, envelope: Envelope, raw: bytes
    ) -> DeliveryResult:
        self.calls.append((time.monotonic(), raw))
        self.epochs.append((account.username, time.time()))
        name = account.username
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        index = len(self.alone)
        self.alone.append(self.in_flight[name] == 1)
        try:
            outcome = self.outcomes.pop(0) if self.outcomes else None
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.in_flight[name] > 1:
                self.alone[index] = False
            if outcome is not None:
                raise outcome
            return DeliveryResult("ok")
        finally:
            self.in_flight[name] -= 1

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        self.lookups.append(message_id)
        if self.lookup_outcomes:
            raise self.lookup_outcomes.pop(0)
        return message_id in self.sent_ids


def account(pace: int | None = None, username: str = "crm") -> AccountSettings:
    return AccountSettings(
        username=username,
        password_hash=PASSWORD_HASH,
        provider="microsoft",
        address=f"{username}@example.com",
        sending=SendingSettings(pace_per_minute=pace),
    )


def envelope(user: str = "crm") -> Envelope:
    return Envelope(user, "a@example.com", ("b@example.org",), False, datetime.now(UTC), "::1")


def make(tmp_path: Path, sender: Scripted, pace: int | None = None, **options: object) -> FileSpool:
    settings = {"first_backoff": 0.02, "max_backoff": 0.1, "rescan_interval": 0.2, **options}
    return FileSpool(tmp_path / "spool", [account(pace)], {"microsoft": sender}, **settings)  # type: ignore[arg-type]


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_submit_is_on_disk_before_the_reply_and_gets_a_message_id(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted())
    result = await spool.submit(envelope(), RAW)
    assert result.reply == f"250 2.0.0 Ok: queued as {result.queue_id}"
    stored = spool.files.read_message(result.queue_id)
    state = spool.files.load(result.queue_id)
    assert stored.endswith(RAW) and stored.startswith(b"Message-ID: <")
    assert state is not None and state.message_id in stored.decode() and state.state == "queued"
    assert [p.name for p in (tmp_path / "spool" / "queue").iterdir()] == [f"{result.queue_id}.seg"]
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


async def test_existing_message_id_is_kept(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted())
    raw = b"Message-ID:\r\n <x.1@example.com>\r\n" + RAW
    result = await spool.submit(envelope(), raw)
    (record,) = spool.messages()
    assert record.message_id == "<x.1@example.com>"
    assert spool.files.read_message(result.queue_id) == raw


async def test_disk_failure_is_a_spool_error(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted())
    (tmp_path / "spool" / "tmp").rmdir()  # where a large message's file is written
    (tmp_path / "spool" / "queue").rmdir()  # where a small one's segment is
    with pytest.raises(SpoolError, match="cannot store the message"):
        await spool.submit(envelope(), RAW)


def test_backoff_honours_decimal_retry_after_and_caps_exponential(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted(), first_backoff=10.0, max_backoff=60.0, jitter=lambda: 1.0)
    assert spool.backoff(1, 2.128) == pytest.approx(2.128 * 1.1)
    assert [spool.backoff(n, None) for n in (1, 2, 3, 4, 9)] == [10, 20, 40, 60, 60]
    low = make(tmp_path, Scripted(), first_backoff=10.0, max_backoff=60.0, jitter=lambda: 0.0)
    assert low.backoff(2, None) == 10.0


async def test_temporary_failures_are_retried_then_sent(tmp_path: Path) -> None:
    sender = Scripted(Temporary("503", 0.05), Temporary("reset"))
    spool = make(tmp_path, sender)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert len(sender.calls) == 3
    assert sender.calls[1][0] - sender.calls[0][0] >= 0.05
    (logged,) = await spool.recent_deliveries()
    assert logged["result"] == "sent" and logged["recipients"] == 1


async def test_retry_window_ends_in_a_dead_letter(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted(*[Temporary("down")] * 50), retry_window=0.15)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["dead"])
    finally:
        await spool.stop()
    assert spool.messages()[0].reason.startswith("still failing after")


async def test_permanent_is_dead_and_inline_permanent_is_a_5xx(tmp_path: Path) -> None:
    refusal = Permanent("HTTP 403 ErrorSendAsDenied: no", 553, "5.7.1")
    spool = make(tmp_path, Scripted(refusal))
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["dead"])
    finally:
        await spool.stop()
    assert spool.messages()[0].reason == refusal.reason

    inline = make(tmp_path / "inline", Scripted(refusal), deliver_inline=True)
    result = await inline.submit(envelope(), RAW)
    assert (result.reply, result.queue_id) == ("553 5.7.1 HTTP 403 ErrorSendAsDenied: no", None)
    assert inline.messages() == [] and inline.files.records() == []


async def test_inline_temporary_is_queued_and_inline_success_is_logged(tmp_path: Path) -> None:
    sender = Scripted(Temporary("429", 5.0), None)
    spool = make(tmp_path, sender, deliver_inline=True)
    first = await spool.submit(envelope(), RAW)
    assert first.reply.startswith("250 ") and [r.state for r in spool.messages()] == ["queued"]
    second = await spool.submit(envelope(), RAW)
    assert second.reply.startswith("250 ") and len(spool.messages()) == 1
    assert (await spool.recent_deliveries())[0]["queue_id"] == second.queue_id


async def test_held_until_release_and_released_by_a_later_success(tmp_path: Path) -> None:
    sender = Scripted(ReauthRequired("reconnect crm"), ReauthRequired("reconnect crm"))
    spool = make(tmp_path, sender, held_retry=60.0)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["held"])
        assert await spool.release("crm") == 1
        await until(lambda: len(sender.calls) == 2 and spool.messages()[0].state == "held")
        await spool.submit(envelope(), RAW)  # succeeds, and takes the held one along
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert len(sender.calls) == 4


async def test_restart_resumes_from_disk_and_checks_sent_mail_first(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted())
    queued = await spool.submit(envelope(), RAW)
    (record,) = spool.messages()
    record.attempt_started = True
    spool.files.save(record)
    (tmp_path / "spool" / "queue" / "debris.eml").write_bytes(b"half a submit")

    sender = Scripted(sent_ids={record.message_id})
    again = make(tmp_path, sender)
    await again.start()
    try:
        await until(lambda: again.messages() == [])
    finally:
        await again.stop()
    assert sender.calls == []  # found in sent mail: not sent again
    assert not (tmp_path / "spool" / "queue" / "debris.eml").exists()
    assert (await again.recent_deliveries())[0]["queue_id"] == queued.queue_id


async def test_pacing_spaces_sends(tmp_path: Path) -> None:
    """Each send starts at its own slot, 60 / pace_per_minute seconds after the previous one:
    the slots are read from the waits the spool asks for, not from how long they took."""
    slots: list[float] = []

    async def pause(seconds: float) -> None:
        slots.append(time.monotonic() + seconds)  # when this send may start
        await asyncio.sleep(0)

    sender = Scripted()
    spool = make(tmp_path, sender, pace=600, pause=pause)  # one every 0.1 s
    await spool.start()
    try:
        for _ in range(3):
            await spool.submit(envelope(), RAW)
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert len(sender.calls) == 3 and len(slots) == 3
    assert min(b - a for a, b in itertools.pairwise(slots)) >= 0.1 - 0.005


async def test_mail_of_an_unknown_account_is_held_not_dead(tmp_path: Path) -> None:
    """An account removed by a reload (or misspelt) loses nothing: its mail waits, says why,
    and goes once the account is back and released."""
    sender = Scripted()
    spool = make(tmp_path, sender)
    await spool.start()
    try:
        await spool.submit(envelope("gone"), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["held"])
        reason = spool.messages()[0].reason
        assert "'gone' is not configured" in reason and "gateway reload" in reason
        spool.accounts["gone"] = account(None, "gone")
        assert await spool.release("gone") == 1
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert len(sender.calls) == 1


async def test_queue_command_lists_retries_and_deletes(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted(Permanent("refused for a reason")))
    await spool.start()
    try:
        dead = await spool.submit(envelope(), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["dead"])
        other = await spool.submit(envelope(), RAW)
        await until(lambda: len(spool.messages()) == 1)
    finally:
        await spool.stop()
    directory = tmp_path / "spool"
    out = io.StringIO()
    assert await queue_main(FileStore(directory), "list", None, out) == 0
    assert dead.queue_id in out.getvalue() and "reason: refused for a reason" in out.getvalue()
    assert other.queue_id not in out.getvalue()  # delivered

    assert await queue_main(FileStore(directory), "retry", dead.queue_id, io.StringIO()) == 0
    (record,) = spool.files.records()
    assert (record.state, record.next_attempt) == ("queued", 0.0)
    assert await queue_main(FileStore(directory), "delete", "nope", io.StringIO()) == 1
    assert await queue_main(FileStore(directory), "delete", dead.queue_id, io.StringIO()) == 0
    assert spool.files.records() == []
    assert (await spool.recent_deliveries())[0]["result"] == "deleted"
    assert await queue_main(FileStore(directory), "frobnicate", None, io.StringIO()) == 2


async def test_queue_release_makes_an_accounts_held_mail_due(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted(ReauthRequired("reconnect")), held_retry=60.0)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["held"])
    finally:
        await spool.stop()
    out = io.StringIO()
    assert await queue_main(FileStore(tmp_path / "spool"), "release", "other", out) == 0
    assert spool.files.records()[0].state == "held"
    assert await queue_main(FileStore(tmp_path / "spool"), "release", "crm", out) == 0
    assert "1 held message(s) of crm released" in out.getvalue()
    assert spool.files.records()[0].state == "queued"


def two_accounts(tmp_path: Path, sender: Scripted, **options: object) -> FileSpool:
    settings = {"first_backoff": 0.02, "max_backoff": 0.1, "rescan_interval": 0.2, **options}
    accounts = [account(), account(username="other")]
    return FileSpool(tmp_path / "spool", accounts, {"microsoft": sender}, **settings)  # type: ignore[arg-type]


def throttled(retry_after: float | None) -> Temporary:
    return Temporary("HTTP 429 ApplicationThrottled", retry_after, throttled=True)


async def test_a_throttle_pauses_every_message_of_the_mailbox_and_no_other(
    tmp_path: Path,
) -> None:
    # A Retry-After long enough that the other mailbox's send lands inside it on a busy machine.
    sender = Scripted(throttled(1.0), concurrency=1)
    spool = two_accounts(tmp_path, sender, jitter=lambda: 0.5)
    for _ in range(3):
        await spool.submit(envelope(), RAW)
    await spool.start()
    try:
        await until(lambda: "crm" in spool.pauses())
        until_epoch = spool.pauses()["crm"].timestamp()
        await spool.submit(envelope("other"), RAW)  # another mailbox is not paused
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    crm = [at for name, at in sender.epochs if name == "crm"]
    other = [at for name, at in sender.epochs if name == "other"]
    assert len(crm) == 4 and len(other) == 1  # 3 messages + the one 429, nothing more
    assert all(at >= until_epoch for at in crm[1:]), "a request reached a paused mailbox"
    assert until_epoch >= crm[0] + 1.0 * 1.05  # the Retry-After plus its jitter
    assert other[0] < until_epoch


async def test_without_retry_after_the_mailbox_backs_off_and_one_message_probes_first(
    tmp_path: Path,
) -> None:
    sender = Scripted(throttled(None), throttled(None), latency=0.02)
    spool = make(tmp_path, sender, first_backoff=0.1, max_backoff=1.0, jitter=lambda: 1.0)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: len(sender.calls) == 1 and "crm" in spool.pauses())
        first_pause = spool.pauses()["crm"].timestamp() - sender.epochs[0][1]
        for _ in range(3):
            await spool.submit(envelope(), RAW)
        await until(lambda: len(sender.calls) == 2 and not sender.outcomes)
        await until(lambda: "crm" in spool.pauses())
        second_pause = spool.pauses()["crm"].timestamp() - sender.epochs[1][1]
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert len(sender.calls) == 6  # 4 messages, each sent once, + the two throttled tries
    assert sender.alone[1] and sender.alone[2], "after a pause, one request must go alone"
    # Lower bounds only: each pause is set after its send, so a busy machine makes it later,
    # never earlier. backoff(1), then backoff(2) for a second throttle in a row.
    assert first_pause >= 0.1 and second_pause >= 0.2


async def test_sent_mail_is_looked_up_only_after_an_unknown_outcome(tmp_path: Path) -> None:
    known = Temporary("HTTP 503 serviceNotAvailable", 0.01)
    lost = Temporary("ReadTimeout", outcome_unknown=True)
    sender = Scripted(throttled(0.01), known, lost, Temporary("ConnectError"))
    spool = make(tmp_path, sender)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    # 429, 503 and a failed connect are known outcomes: only the timeout's retry looks first.
    assert len(sender.calls) == 5 and len(sender.lookups) == 1


async def test_a_known_outcome_clears_the_attempt_and_attempts_are_counted(
    tmp_path: Path,
) -> None:
    sender = Scripted(throttled(30.0))
    spool = make(tmp_path, sender)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: len(sender.calls) == 1 and spool.messages()[0].reason != "")
    finally:
        await spool.stop()
    (record,) = spool.files.records()
    assert (record.attempts, record.attempt_started) == (1, False)


async def test_a_failed_look_up_counts_as_an_attempt_and_leaves_the_outcome_unknown(
    tmp_path: Path,
) -> None:
    spool = make(tmp_path, Scripted())
    await spool.submit(envelope(), RAW)
    (record,) = spool.messages()
    record.attempt_started, record.attempts = True, 1  # a crash in the middle of attempt 1
    spool.files.save(record)

    sender = Scripted(lookups=(throttled(0.2),))
    again = make(tmp_path, sender)
    await again.start()
    try:
        await until(lambda: len(sender.lookups) == 1 and "crm" in again.pauses())
        (waiting,) = again.files.records()
        assert (waiting.attempts, waiting.attempt_started) == (2, True)
        assert sender.calls == []
        await until(lambda: again.messages() == [])
    finally:
        await again.stop()
    assert len(sender.lookups) == 2 and len(sender.calls) == 1  # looked up again, then sent


async def test_inline_delivery_queues_for_a_paused_mailbox_and_the_queue_says_until_when(
    tmp_path: Path,
) -> None:
    sender = Scripted(throttled(60.0))
    spool = make(tmp_path, sender, deliver_inline=True)
    first = await spool.submit(envelope(), RAW)
    second = await spool.submit(envelope(), RAW)
    assert first.reply.startswith("250 2.0.0 Ok: queued") and second.queue_id is not None
    assert len(sender.calls) == 1  # the second message did not go to the paused mailbox
    out = io.StringIO()
    assert await queue_main(FileStore(tmp_path / "spool"), "list", None, out) == 0
    until_text = spool.pauses()["crm"].strftime("%Y-%m-%d %H:%M:%SZ")
    assert out.getvalue().count(f"paused by the provider until {until_text}") == 2

    restarted = make(tmp_path, Scripted())  # the pause survives a restart
    await restarted.start()
    try:
        assert restarted.pauses() == spool.pauses()
    finally:
        await restarted.stop()


async def test_the_worker_wakes_up_when_a_pause_ends(tmp_path: Path) -> None:
    sender = Scripted(throttled(0.1))
    spool = make(tmp_path, sender, rescan_interval=3600.0)  # no rescan would wake it
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert len(sender.calls) == 2


# -- group commit and the rescan (issue 13) -------------------------------------------------


class Gate:
    """Holds a blocking call (in its worker thread) until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def hold(self) -> None:
        self.entered.set()
        assert self.opened.wait(10), "the test never opened the gate"

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "the gated call never came"


async def test_concurrent_submissions_share_a_commit_and_wait_for_it(tmp_path: Path) -> None:
    spool = make(tmp_path, Scripted())
    commit_batch = spool.files.commit_batch
    batches: list[int] = []
    first = Gate()

    def gated(batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        if len(batches) == 1:
            first.hold()
        return commit_batch(batch)

    spool.files.commit_batch = gated  # type: ignore[method-assign]
    lone = asyncio.create_task(spool.submit(envelope(), RAW))
    await first.reached()
    others = [asyncio.create_task(spool.submit(envelope(), RAW)) for _ in range(9)]
    await until(lambda: spool.awaiting_commit == 9)  # all nine queued behind the held commit
    assert not lone.done() and not any(task.done() for task in others)  # no 250 before fsync
    first.opened.set()
    results = await asyncio.gather(lone, *others)
    assert batches == [1, 9]  # the nine that came during the first commit shared the next
    queue = tmp_path / "spool" / "queue"
    for result in results:
        assert result.reply.startswith("250 ")
        assert spool.files.load(result.queue_id) is not None
    assert [path.suffix for path in queue.iterdir()] == [".seg"]  # all ten in one segment
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


async def test_messages_committed_during_a_rescan_listing_go_at_once(tmp_path: Path) -> None:
    """Issue 13: ids committed while the rescan read the directory were dropped from memory
    and waited for the next rescan. With no next rescan (1 h), they must still go now."""
    release = asyncio.Event()

    class Blocking(Scripted):
        async def send(self, account, envelope, raw):  # type: ignore[no-untyped-def]
            await release.wait()
            return await super().send(account, envelope, raw)

    sender = Blocking()
    spool = make(tmp_path, sender, rescan_interval=3600.0, max_in_flight=1)
    await spool.start()
    try:
        listing = Gate()
        records = spool.files.records

        def slow_listing():  # type: ignore[no-untyped-def]
            found = records()
            listing.hold()
            return found

        spool.files.records = slow_listing  # type: ignore[method-assign]
        rescan = asyncio.create_task(spool._rescan())
        await listing.reached()
        # Committed after the listing was taken: one goes in flight, the rest wait in memory.
        ids = {(await spool.submit(envelope(), RAW)).queue_id for _ in range(5)}
        listing.opened.set()
        await rescan
        spool.files.records = records  # type: ignore[method-assign]
        assert {r.id for r in spool.messages()} == ids  # none dropped by the rescan
        release.set()
        await until(lambda: len(sender.calls) == 5 and spool.messages() == [])
    finally:
        release.set()
        await spool.stop()


async def test_the_rescan_counts_messages_the_worker_did_not_know(tmp_path: Path) -> None:
    """Issue 13's burst figure: a message only a rescan finds waited for it. One committed
    behind the worker's back (another spool on the same directory) is counted and logged; one
    whose commit is on disk but whose submit has not yet tracked it is not."""
    sender = Scripted()
    spool = make(tmp_path, sender, rescan_interval=3600.0, max_in_flight=0)  # nothing leaves
    await spool.start()
    try:
        commit_batch = spool.files.commit_batch
        written = Gate()

        def held_after_writing(batch):  # type: ignore[no-untyped-def]
            results = commit_batch(batch)
            written.hold()
            return results

        spool.files.commit_batch = held_after_writing  # type: ignore[method-assign]
        arriving = asyncio.create_task(spool.submit(envelope(), RAW))
        await written.reached()
        lost = (await make(tmp_path, sender).submit(envelope(), RAW)).queue_id
        await spool._rescan()  # lists both: the arriving one is on disk already
        assert spool.found_by_rescan == 1 and lost in {r.id for r in spool.messages()}
        written.opened.set()
        await arriving
        await spool._rescan()  # all known now: nothing more found
        assert spool.found_by_rescan == 1 and len(spool.messages()) == 2
    finally:
        written.opened.set()
        await spool.stop()


async def test_a_rescan_does_not_bring_back_a_message_sent_during_its_listing(
    tmp_path: Path,
) -> None:
    sender = Scripted()
    spool = make(tmp_path, sender, rescan_interval=3600.0)
    queue_id = (await spool.submit(envelope(), RAW)).queue_id
    listing = Gate()
    records = spool.files.records

    def slow_listing():  # type: ignore[no-untyped-def]
        found = records()
        listing.hold()
        return found

    spool.files.records = slow_listing  # type: ignore[method-assign]
    rescan = asyncio.create_task(spool._rescan())
    await listing.reached()  # the listing holds the message
    await spool.delete(str(queue_id))  # gone meanwhile
    listing.opened.set()
    await rescan
    assert spool.messages() == []


class CountingRecords(dict):  # type: ignore[type-arg]
    """The spool's record table, counting the passes made over it (``values()``)."""

    passes = 0

    def values(self):  # type: ignore[no-untyped-def, override]
        self.passes += 1
        return super().values()


async def test_a_burst_costs_the_worker_linear_work_not_a_pass_per_send(tmp_path: Path) -> None:
    """Issue 13: after every send the worker sorted the whole queue to start one more message,
    and ``release`` walked it looking for held mail; a 5,000-message queue took the loop
    quadratic time. Now a pass waits for a quarter of ``max_in_flight`` to be free, and a send
    only walks the queue when its account may have held mail."""
    messages = 400
    sender = Scripted(latency=0.001)
    spool = make(tmp_path, sender, rescan_interval=3600.0)
    for _ in range(messages):
        await spool.submit(envelope(), RAW)
    await spool.start()
    counted = CountingRecords(spool._records)
    spool._records = counted
    due_calls = 0
    due = spool._due

    def counting_due(record):  # type: ignore[no-untyped-def]
        nonlocal due_calls
        due_calls += 1
        return due(record)

    spool._due = counting_due  # type: ignore[method-assign]
    try:
        await until(lambda: len(sender.calls) == messages and spool.messages() == [], within=30)
    finally:
        await spool.stop()
    # A pass per send: about messages**2 / 2 sort keys (80,000 here) and as many passes.
    assert due_calls < messages * messages / 8
    assert counted.passes < messages / 4


async def test_held_mail_from_before_a_restart_is_released_by_a_send_of_its_account(
    tmp_path: Path,
) -> None:
    """``release`` skips the queue for accounts with no held mail; mail held in an earlier run
    (known only from disk) still counts as held mail of its account."""
    first = make(tmp_path, Scripted(ReauthRequired("consent revoked")))
    await first.start()
    try:
        await first.submit(envelope(), RAW)
        await until(lambda: [r.state for r in first.messages()] == ["held"])
    finally:
        await first.stop()
    sender = Scripted()
    spool = make(tmp_path, sender, held_retry=3600.0)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: spool.messages() == [])  # the new one went, then the held one
    finally:
        await spool.stop()
    assert len(sender.calls) == 2


class Holding(Scripted):
    """Holds every send until released; records the most of one account's sends at once."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency=concurrency)
        self.release = asyncio.Event()
        self.most_at_once = 0

    async def send(self, account, envelope, raw):  # type: ignore[no-untyped-def]
        self.in_flight[account.username] = self.in_flight.get(account.username, 0) + 1
        self.most_at_once = max(self.most_at_once, self.in_flight[account.username])
        try:
            await self.release.wait()
        finally:
            self.in_flight[account.username] -= 1
        return await super().send(account, envelope, raw)


async def test_an_account_sends_as_many_at_once_as_its_sender_allows(tmp_path: Path) -> None:
    """Issue 13: the spool's per-account limit was fixed at 4 whatever the upstream pool held;
    it follows ``sender.concurrency(account)``, also when that changes (a reload)."""
    sender = Holding(concurrency=9)
    spool = make(tmp_path, sender, rescan_interval=3600.0)
    for _ in range(12):
        await spool.submit(envelope(), RAW)
    await spool.start()
    try:
        # Every delivery is under way: sending, or waiting for a slot (a tenth would be
        # sending by now, were the limit not kept).
        await until(lambda: sender.in_flight.get("crm", 0) + spool.waiting_for_slot("crm") == 12)
        assert sender.most_at_once == 9 and spool.waiting_for_slot("crm") == 3
        sender.release.set()
        await until(lambda: spool.messages() == [])
        sender.slots, sender.most_at_once = 2, 0  # the account's capacity shrinks (a reload)
        sender.release = asyncio.Event()
        for _ in range(5):
            await spool.submit(envelope(), RAW)
        await until(lambda: sender.in_flight.get("crm", 0) + spool.waiting_for_slot("crm") == 5)
        assert sender.most_at_once == 2 and spool.waiting_for_slot("crm") == 3  # not the old 9
        sender.release.set()
        await until(lambda: spool.messages() == [])
    finally:
        sender.release.set()
        await spool.stop()
    assert len(sender.calls) == 17


async def test_a_large_message_gives_its_heap_back_after_intake_and_after_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: RSS kept growing over successive 30 MB messages; glibc's malloc_trim is called
    (in a worker thread) after a large message is committed and after it is sent."""
    from gateway.spool import _memory

    assert _memory.available()  # glibc on the machines this runs on
    trims: list[int] = []
    monkeypatch.setattr(_memory, "_trim", lambda pad: trims.append(pad) or 1)
    sender = Scripted()
    spool = make(tmp_path, sender)
    await spool.start()
    try:
        await spool.submit(envelope(), RAW)
        await until(lambda: len(sender.calls) == 1 and spool.messages() == [])
        assert trims == []  # a small message: no trim
        large = RAW + b"x" * _memory.LARGE
        await spool.submit(envelope(), large)
        await until(lambda: len(sender.calls) == 2 and spool.messages() == [])
        await until(lambda: len(trims) == 2)
    finally:
        await spool.stop()
    assert trims == [0, 0]


async def test_a_batch_fsyncs_its_files_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: one thread fsyncing each message file in turn paid one journal commit per
    file; a batch's fsyncs now wait together (the file system joins them)."""
    spool = make(tmp_path, Scripted())
    together = threading.Barrier(4, timeout=5)  # breaks unless 4 fsyncs are in flight at once
    real_fsync = os.fsync
    files = iter(range(8))  # the batch's 8 files (one per message); the directory's comes after

    def fsync(fd: int) -> None:
        if next(files, None) is not None:
            together.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    batches: list[int] = []
    spool._committer._batched.on_batch = batches.append
    received = [spool.receive() for _ in range(8)]
    for incoming in received:  # written out before they are submitted together
        await incoming.write(LARGE_RAW)
    results = await asyncio.gather(*(spool.submit(envelope(), m) for m in received))
    assert batches == [8]  # 8 files, fsynced 4 at a time at least
    assert all(r.reply.startswith("250 ") for r in results)
    assert not together.broken


def test_the_worker_leaves_the_loop_to_the_intake_for_at_most_max_defer(tmp_path: Path) -> None:
    """Issue 13: a delivery costs the loop several times what accepting a message does, so
    while messages arrive the worker starts none, but never for longer than max_defer."""
    spool = make(tmp_path, Scripted(), intake_quiet=0.05, max_defer=1.0, busy_above=0.0)
    start = 1000.0
    assert spool.intake_hold(start) == 0.0  # nothing arrived: deliver at once
    spool.intake_seen(start)
    assert spool.intake_hold(start + 0.01) == pytest.approx(0.04)  # until the intake is quiet
    assert spool.intake_hold(start + 0.05) == 0.0 and not spool.holding_for_intake
    for arrival in (2000.0, 2000.04, 2000.5, 2000.9, 2000.98):  # a burst longer than max_defer
        spool.intake_seen(arrival)
        assert spool.intake_hold(arrival) > 0.0
    assert spool.intake_hold(2000.99) == pytest.approx(0.01)  # the hold's end comes first
    assert spool.intake_hold(2001.0) == 0.0  # max_defer: this pass starts what is due
    assert spool.intake_hold(2001.01) == pytest.approx(0.02)  # the burst goes on: hold again
    spool.intake_seen(1500.0)  # an older report does not move the last arrival back
    assert spool.intake_hold(2001.02) > 0.0


def test_the_worker_holds_back_only_while_the_intake_keeps_the_loop_busy(
    tmp_path: Path,
) -> None:
    """Issue 13: holding deliveries back helps the intake only when it needs the loop; with
    room to spare on the loop, messages arriving do not delay the sends."""
    spool = make(tmp_path, Scripted(), intake_quiet=0.05, max_defer=1.0, busy_above=0.5)
    cpu = [0.0]
    spool._loop_load = LoopLoad(cpu=lambda: cpu[0])
    spool.intake_seen(1000.0)
    assert spool.intake_hold(1000.0) > 0.0  # not measured yet: counts as busy
    cpu[0] += 0.025  # 20 % of the next 125 ms
    spool.intake_seen(1000.125)
    assert spool.intake_hold(1000.125) == 0.0 and not spool.holding_for_intake
    cpu[0] += 0.1125  # 90 %
    spool.intake_seen(1000.25)
    assert spool.intake_hold(1000.25) > 0.0 and spool.holding_for_intake


def test_the_loops_share_is_measured_in_windows_and_unknown_counts_as_busy() -> None:
    cpu = [5.0]
    load = LoopLoad(cpu=lambda: cpu[0])
    assert load.share(10.0) == 1.0  # nothing measured yet
    cpu[0] += 0.03
    assert load.share(10.05) == 1.0  # within the window: the last figure
    assert load.share(10.2) == pytest.approx(0.15)
    cpu[0] += 0.1
    assert load.share(12.0) == 1.0  # the worker slept through windows: unknown again
    cpu[0] += 0.01
    assert load.share(12.2) == pytest.approx(0.05)


def test_hold_for_intake_ms_sets_the_hold_and_zero_turns_it_off(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    """``spool.hold_for_intake_ms`` is the hold's limit; 0 starts sends at once even while
    messages keep arriving (the highest delivered rate in a long burst)."""
    off = load_settings(write_config(spool={"hold_for_intake_ms": 0}), environ={})
    assert options(off)["max_defer"] == 0.0
    spool = make(tmp_path, Scripted(), max_defer=options(off)["max_defer"], busy_above=0.0)
    spool.intake_seen(1000.0)
    assert spool.intake_hold(1000.01) == 0.0 and not spool.holding_for_intake
    assert options(load_settings(write_config(), environ={}))["max_defer"] == 1.0  # default
    with pytest.raises(ConfigError, match="hold_for_intake_ms"):
        load_settings(write_config(spool={"hold_for_intake_ms": 60000}), environ={})


async def test_no_attempt_starts_while_messages_arrive_and_all_go_once_it_is_quiet(
    tmp_path: Path,
) -> None:
    sender = Scripted()
    spool = make(tmp_path, sender, intake_quiet=3600.0, max_defer=3600.0, busy_above=0.0)
    await spool.start()
    try:
        for _ in range(3):
            assert (await spool.submit(envelope(), RAW)).reply.startswith("250 ")
        await until(lambda: spool.holding_for_intake)
        assert sender.calls == [] and len(spool.messages()) == 3
        spool.intake_quiet = 0.0  # the intake is quiet from now on
        await spool.submit(envelope(), RAW)
        await until(lambda: len(sender.calls) == 4 and not spool.messages())
        assert not spool.holding_for_intake
    finally:
        await spool.stop()
