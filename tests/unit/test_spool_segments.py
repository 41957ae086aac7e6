"""Small messages stored many to a segment file (``_segments``): one file and one fsync per
batch, state files over the first state, forgetting by a status byte, torn tails cut at start,
``gateway queue`` beside a running gateway, a failed fsync, and what stays one file each."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.spool import _prefix, _segments
from gateway.spool._files import Record, SpoolFiles
from gateway.spool._incoming import _FLUSH_AT, IncomingMessage
from tests.unit.test_spool import RAW, Scripted, make, until
from tests.unit.test_spool import envelope as spool_envelope
from tests.unit.test_spool_files import envelope, names, spool_files

LARGE = 300 * 1024  # bytes of a message the intake writes out before its commit


def content(n: int, size: int = 0) -> bytes:
    """A message with its own Message-ID (stored as it is), ``size`` bytes of body at least."""
    head = f"Message-ID: <{n}@example.com>\r\nSubject: message {n}\r\n\r\n".encode()
    lines = max(1, size // 78 + 1) if size else 1
    return head + (f"line of message {n} ".encode().ljust(76, b".") + b"\r\n") * lines


async def pending(
    files: SpoolFiles, raw: bytes, recipients: int = 1
) -> tuple[Record, IncomingMessage]:
    """A received message, ready for ``commit_batch``."""
    incoming = IncomingMessage(files.tmp, "gw.test")
    await incoming.write(raw)
    incoming.finish()
    return Record(incoming.id, envelope(recipients), incoming.message_id, incoming.size), incoming


async def commit_all(files: SpoolFiles, *raws: bytes) -> list[Record]:
    """Commit ``raws`` in one batch, all successfully."""
    batch = [await pending(files, raw) for raw in raws]
    assert files.commit_batch(batch) == [None] * len(batch)
    return [record for record, _ in batch]


def segments(files: SpoolFiles) -> list[str]:
    return [name for name in names(files) if name.endswith(".seg")]


def ids(records: list[Record]) -> list[str]:
    return [record.id for record in records]


def path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every fsync from now on, as the path of the file (or directory) it synced."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(path_of(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def failing_on_segments(real_fsync: Callable[[int], None]) -> Callable[[int], None]:
    """An fsync that fails with EIO on a segment's descriptor, and works on the rest."""

    def fsync(fd: int) -> None:
        if path_of(fd).endswith(".seg"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    return fsync


def status_byte(files: SpoolFiles, entry: _segments.Entry) -> bytes:
    with (files.queue / entry.segment).open("rb") as segment:
        segment.seek(entry.status_at)
        return segment.read(1)


def entries_of(files: SpoolFiles, records: list[Record]) -> list[_segments.Entry]:
    found = [files.segments.find(record.id) for record in records]
    assert None not in found
    return [entry for entry in found if entry is not None]


async def test_a_batch_of_small_messages_is_one_segment_and_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: a batch of small messages costs one file and one fsync (plus the directory's
    for a new segment), and each message still reads back exactly, beside one-file messages."""
    files = spool_files(tmp_path)
    raws = [content(n, size=2000 * n) for n in range(1, 5)]
    synced = record_fsyncs(monkeypatch)
    small = await commit_all(files, *raws)
    (segment,) = segments(files)
    assert names(files) == [segment] == [f"{small[0].id}.seg"]
    assert sorted(synced) == sorted([str(files.queue / segment), str(files.queue)])
    for record, raw in zip(small, raws, strict=True):
        assert files.read_message(record.id) == raw
        mapped = files.map_message(record.id)
        assert isinstance(mapped, bytes) and mapped == raw
        assert files.load(record.id) == record
    large_raw, later_raw = content(5, size=LARGE), content(6)
    synced.clear()
    large, later = await commit_all(files, large_raw, later_raw)  # the later one: same segment
    assert names(files) == sorted([segment, f"{large.id}.eml"])
    assert str(files.queue / segment) in synced and synced.count(str(files.queue)) == 1
    assert files.read_message(large.id) == large_raw and files.read_message(later.id) == later_raw
    every = [*small, large, later]
    assert files.records() == sorted(every, key=lambda record: record.id)
    assert ids(files.records()) == sorted(ids(every))


async def test_a_state_change_writes_a_state_file_over_the_entrys_first_state(
    tmp_path: Path,
) -> None:
    """A segment entry's state is fixed at commit: a later state lives in <id>.json, which
    must win in load() and records(), also once the spool restarts."""
    files = spool_files(tmp_path)
    changed, unchanged = await commit_all(files, content(1), content(2))
    changed.attempt_started, changed.attempts, changed.reason = True, 1, "503 busy"
    assert files.save(changed)
    (segment,) = segments(files)
    assert names(files) == sorted([segment, f"{changed.id}.json"])
    assert files.load(changed.id) == changed and files.load(unchanged.id) == unchanged
    assert files.records() == sorted([changed, unchanged], key=lambda record: record.id)
    files.segments.close()
    again = SpoolFiles(files.directory)
    again.prepare()  # keeps the state file of a message that lives in a segment
    assert names(again) == sorted([segment, f"{changed.id}.json"])
    assert again.load(changed.id) == changed
    assert again.records() == sorted([changed, unchanged], key=lambda record: record.id)
    assert again.read_message(changed.id) == content(1)


async def test_forgetting_marks_entries_done_and_deletes_segments_left_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forgotten entry is a D in its status byte and is gone at once; a segment with nothing
    live goes too, unless it is still the one being appended to."""
    monkeypatch.setattr(_segments, "SEGMENT_BYTES", 1)  # every batch starts a new segment
    files = spool_files(tmp_path)
    first = await commit_all(files, content(1), content(2), content(3))
    second = await commit_all(files, content(4), content(5))
    old, current = f"{first[0].id}.seg", f"{second[0].id}.seg"
    assert segments(files) == sorted([old, current])
    entries = entries_of(files, first + second)

    files.forget_batch([(first[0], "sent", "ok"), (second[0], "sent", "ok")])
    assert [status_byte(files, entry) for entry in entries] == [b"D", b"L", b"L", b"D", b"L"]
    for gone in (first[0], second[0]):
        assert files.load(gone.id) is None
        with pytest.raises(FileNotFoundError):
            files.read_message(gone.id)
        with pytest.raises(FileNotFoundError):
            files.map_message(gone.id)
    assert ids(files.records()) == sorted(ids([*first[1:], *second[1:]]))
    assert files.read_message(first[1].id) == content(2)
    assert segments(files) == sorted([old, current])  # both still hold live messages

    files.forget_batch([(record, "sent", "ok") for record in first[1:]])
    assert segments(files) == [current]  # the old one had nothing live left
    files.forget_batch([(second[1], "sent", "ok")])
    assert segments(files) == [current]  # nothing live either, but still appended to
    assert files.records() == [] and names(files) == [current]
    assert [status_byte(files, entry) for entry in entries[3:]] == [b"D", b"D"]
    lines = files.recent_deliveries(10)
    assert sorted(line["queue_id"] for line in lines) == sorted(ids(first + second))


def torn_half(state: bytes, raw: bytes) -> bytes:
    whole = b"".join(_segments.encode(state, [raw]))
    return whole[: len(whole) // 2]


def wrong_crc(state: bytes, raw: bytes) -> bytes:
    header, *rest = _segments.encode(state, [raw])
    whole = bytearray(header + b"".join(rest))
    whole[-3] ^= 0x20  # one bit of the content: lengths fine, the CRC no longer matches
    return bytes(whole)


def torn_header(state: bytes, raw: bytes) -> bytes:
    return b"".join(_segments.encode(state, [raw]))[:20]


def garbage(state: bytes, raw: bytes) -> bytes:
    return b"not an entry at all, " * 8


@pytest.mark.parametrize("tail", [torn_half, wrong_crc, torn_header, garbage])
async def test_a_torn_tail_is_cut_at_start_and_new_messages_go_to_a_new_segment(
    tmp_path: Path, tail: Callable[[bytes, bytes], bytes]
) -> None:
    """A crash during a batch's write (no 250 sent) leaves a tail that fails the check: the
    restart cuts it, keeps every committed message, and never appends after it."""
    files = spool_files(tmp_path)
    kept = await commit_all(files, content(1), content(2))
    (segment,) = segments(files)
    path = files.queue / segment
    committed_size = path.stat().st_size
    lost, _ = await pending(files, content(3))  # the batch the crash interrupted
    with path.open("ab") as out:
        out.write(tail(lost.to_json(), content(3)))
    assert path.stat().st_size > committed_size
    files.segments.close()  # the crashed process's descriptors

    again = SpoolFiles(files.directory)
    again.prepare()
    assert path.stat().st_size == committed_size
    assert again.records() == sorted(kept, key=lambda record: record.id)
    assert [again.read_message(record.id) for record in kept] == [content(1), content(2)]
    (newer,) = await commit_all(again, content(4))
    assert segments(again) == sorted([segment, f"{newer.id}.seg"])
    assert path.stat().st_size == committed_size  # the old segment took nothing more
    assert ids(again.records()) == sorted(ids([*kept, newer]))
    third = SpoolFiles(files.directory)
    third.prepare()  # nothing torn this time: nothing cut
    assert path.stat().st_size == committed_size
    assert third.read_message(newer.id) == content(4)


async def test_gateway_queue_reads_and_forgets_but_never_deletes_a_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gateway queue`` (no prepare) cannot know which segment the gateway appends to: it
    lists and forgets entries, and the gateway sees that and deletes what is left empty."""
    owner = spool_files(tmp_path)
    (first,) = await commit_all(owner, content(1))
    queue = SpoolFiles(owner.directory)
    assert queue.records() == [first]
    (second,) = await commit_all(owner, content(2))  # the same segment, grown
    old = f"{first.id}.seg"
    assert segments(owner) == [old]
    assert queue.records() == sorted([first, second], key=lambda record: record.id)
    assert queue.read_message(second.id) == content(2)
    monkeypatch.setattr(_segments, "SEGMENT_BYTES", 1)
    (third,) = await commit_all(owner, content(3))  # a new segment, the owner's current one
    current = f"{third.id}.seg"
    assert ids(queue.records()) == sorted(ids([first, second, third]))

    queue.forget_batch([(first, "deleted", "deleted by the admin")])
    assert owner.load(first.id) is None and queue.load(first.id) is None
    assert ids(owner.records()) == sorted(ids([second, third]))
    with pytest.raises(FileNotFoundError):
        owner.read_message(first.id)
    queue.forget_batch([(second, "deleted", "deleted by the admin")])
    queue.forget_batch([(third, "deleted", "deleted by the admin")])
    assert queue.records() == []
    assert segments(queue) == sorted([old, current])  # all done, yet not deleted by the tool
    assert owner.records() == []
    assert segments(owner) == [current]  # the owner deleted the old one, not its current one
    assert queue.records() == [] and owner.load(third.id) is None


async def test_a_failed_segment_fsync_fails_the_whole_batch_and_the_next_starts_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync error leaves the segment's pages untrustworthy: every message of the batch
    gets the error (no 250), none of them is ever delivered, and the next batch works."""
    files = spool_files(tmp_path)
    before = await commit_all(files, content(1))
    (segment,) = segments(files)
    failed = [await pending(files, content(n)) for n in (2, 3, 4)]
    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", failing_on_segments(os.fsync))
        results = files.commit_batch(failed)
    assert [isinstance(r, OSError) and r.errno == errno.EIO for r in results] == [True] * 3
    failed_ids = [record.id for record, _ in failed]
    assert files.records() == before
    for queue_id in failed_ids:
        assert files.load(queue_id) is None
        with pytest.raises(FileNotFoundError):
            files.read_message(queue_id)
    after = await commit_all(files, content(5))
    assert segments(files) == sorted([segment, f"{after[0].id}.seg"])
    assert ids(files.records()) == sorted(ids(before + after))
    files.segments.close()

    again = SpoolFiles(files.directory)
    again.prepare()
    assert ids(again.records()) == sorted(ids(before + after))
    assert all(again.load(queue_id) is None for queue_id in failed_ids)
    assert again.read_message(after[0].id) == content(5)


async def test_a_failed_fsync_of_a_new_segment_leaves_nothing_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch of a segment failing: its segment holds nothing live and is no longer
    appended to, so it goes; the next batch has a segment of its own."""
    files = spool_files(tmp_path)
    failed = [await pending(files, content(n)) for n in (1, 2)]
    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", failing_on_segments(os.fsync))
        results = files.commit_batch(failed)
    assert [isinstance(r, OSError) for r in results] == [True, True]
    assert files.records() == [] and segments(files) == []
    (after,) = await commit_all(files, content(3))
    assert segments(files) == [f"{after.id}.seg"] and files.records() == [after]


async def test_large_messages_and_large_records_stay_one_file_each(tmp_path: Path) -> None:
    """A message written out while it arrived, or a record too large for the head (many
    recipients), keeps its own .eml (and .json): only the rest share the segment."""
    files = spool_files(tmp_path)
    large_raw = content(1, size=LARGE)
    assert len(large_raw) > _FLUSH_AT
    large = await pending(files, large_raw)
    crowded = await pending(files, content(2), recipients=200)
    small = await pending(files, content(3))
    assert not large[1].in_memory and crowded[1].in_memory
    assert not _prefix.fits(crowded[0].to_json())
    assert files.commit_batch([large, crowded, small]) == [None, None, None]
    (large_record, _), (crowded_record, _), (small_record, _) = large, crowded, small
    assert names(files) == sorted(
        [
            f"{large_record.id}.eml",
            f"{crowded_record.id}.eml",
            f"{crowded_record.id}.json",
            f"{small_record.id}.seg",
        ]
    )
    assert files.segments.find(large_record.id) is None
    assert files.segments.find(crowded_record.id) is None
    assert files.read_message(large_record.id) == large_raw
    assert files.read_message(crowded_record.id) == content(2)
    assert files.load(crowded_record.id) == crowded_record
    every = [large_record, crowded_record, small_record]
    assert files.records() == sorted(every, key=lambda record: record.id)


async def test_the_worker_delivers_segment_messages_once_and_a_restart_finds_none(
    tmp_path: Path,
) -> None:
    """End to end: messages committed together into a segment are each sent exactly once with
    their bytes, and once all are done a restart finds nothing left to deliver."""
    sender = Scripted()
    spool = make(tmp_path, sender)
    raws = [content(n) + RAW for n in range(1, 7)]
    await spool.start()
    try:
        results = await asyncio.gather(*(spool.submit(spool_envelope(), raw) for raw in raws))
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert all(result.reply.startswith("250 ") for result in results)
    assert sorted(bytes(raw) for _, raw in sender.calls) == sorted(raws)
    assert len(names(spool.files)) == 1 == len(segments(spool.files))  # kept: still current
    logged = await spool.recent_deliveries()
    assert sorted(line["queue_id"] for line in logged) == sorted(str(r.queue_id) for r in results)

    again = make(tmp_path, Scripted())  # prepares the directory
    assert names(again.files) == []  # the old process's segment, all done, is gone
    assert again.files.records() == []


async def test_loading_a_message_being_forgotten_meanwhile_is_none_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments are used from several worker threads: a forget that comes between load()'s
    look-up of the entry and its read of the first state waits for load() to finish (one lock
    over both), so load() returns the record, never a KeyError, and the forget still lands."""
    files = spool_files(tmp_path)
    (record,) = await commit_all(files, content(1))
    real_find = files.segments.find
    others: list[threading.Thread] = []

    def find_then_forgotten(queue_id: str) -> _segments.Entry | None:
        found = real_find(queue_id)
        other = threading.Thread(target=files.segments.collect, args=([queue_id],))
        other.start()
        other.join(timeout=0.2)  # it cannot get in while load() holds the lock
        others.append(other)
        return found

    monkeypatch.setattr(files.segments, "find", find_then_forgotten)
    loaded = files.load(record.id)
    assert loaded == record
    others[0].join(timeout=10)
    assert not others[0].is_alive()
    monkeypatch.undo()
    assert files.segments.first_state(record.id) is None  # the forget happened after


async def test_a_failed_segment_write_fails_its_messages_and_stores_none_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while a batch is appended: every message of the segment part gets the
    error (the client gets a 4xx and sends again), and none is stored another way, where it
    would be delivered although its client was told it was not taken."""
    files = spool_files(tmp_path)

    def full(fd: int, pieces: list[bytes], offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_segments, "_writev_all", full)
    batch = [await pending(files, content(n)) for n in range(3)]
    results = files.commit_batch(batch)
    assert [getattr(r, "errno", None) for r in results] == [errno.ENOSPC] * 3
    assert files.records() == [] and not [n for n in names(files) if n.endswith(".eml")]
    monkeypatch.undo()
    (later,) = await commit_all(files, content(9))
    assert files.records() == [later]
