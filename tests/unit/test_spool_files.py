"""The file spool's on-disk format for a message of its own file (one too large to be held in
memory until its commit; smaller ones go to segments, ``test_spool_segments``): one file per
message at intake (its head holds the first state), a state file only after a change, the crash
rules, and spools written the old way (a bare ``.eml`` beside its ``.json``) still read and
delivered."""

from __future__ import annotations

import json
import mmap
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.delivery import Envelope
from gateway.spool import _prefix
from gateway.spool._files import Record, SpoolFiles
from gateway.spool._incoming import IncomingMessage
from tests.unit.test_spool import RAW, Scripted, make, until

# larger than _incoming._FLUSH_AT, so it is written out as it arrives: a file of its own
CONTENT = b"Message-ID: <1@example.com>\r\nSubject: hi\r\n\r\n" + b"a body line\r\n" * 30000


def envelope(recipients: int = 1) -> Envelope:
    rcpts = tuple(f"someone-{n}@example.org" for n in range(recipients))
    return Envelope("crm", "a@example.com", rcpts, False, datetime.now(UTC), "::1")


async def commit(files: SpoolFiles, content: bytes = CONTENT, recipients: int = 1) -> Record:
    incoming = IncomingMessage(files.tmp, "gw.test")
    await incoming.write(content)
    incoming.finish()
    record = Record(incoming.id, envelope(recipients), incoming.message_id, incoming.size)
    assert files.commit_batch([(record, incoming)]) == [None]
    return record


def spool_files(tmp_path: Path) -> SpoolFiles:
    files = SpoolFiles(tmp_path / "spool")
    files.prepare()
    return files


def names(files: SpoolFiles) -> list[str]:
    return sorted(path.name for path in files.queue.iterdir())


def write_old_format(files: SpoolFiles, record: Record, content: bytes) -> None:
    """A message as the spool stored it before the head existed: bare bytes and a .json."""
    files.message_path(record.id).write_bytes(content)
    files.state_path(record.id).write_bytes(record.to_json())


async def test_a_commit_is_one_file_whose_head_holds_the_state(tmp_path: Path) -> None:
    files = spool_files(tmp_path)
    record = await commit(files)
    assert names(files) == [f"{record.id}.eml"]
    raw = files.message_path(record.id).read_bytes()
    assert raw.startswith(_prefix.MAGIC) and raw[_prefix.CONTENT_OFFSET :] == CONTENT
    assert _prefix.CONTENT_OFFSET % mmap.ALLOCATIONGRANULARITY == 0
    assert files.load(record.id) == record and files.records() == [record]
    assert files.read_message(record.id) == CONTENT
    mapping = files.map_message(record.id)
    try:
        assert mapping[:] == CONTENT
    finally:
        mapping.close()


async def test_a_state_change_writes_a_state_file_that_wins_over_the_head(
    tmp_path: Path,
) -> None:
    files = spool_files(tmp_path)
    record = await commit(files)
    record.attempt_started, record.attempts = True, 1
    assert files.save(record)
    assert names(files) == [f"{record.id}.eml", f"{record.id}.json"]
    assert files.load(record.id) == record and files.records() == [record]
    again = SpoolFiles(files.directory)
    again.prepare()  # a restart keeps both and still reads the saved state
    assert again.records() == [record]
    files.forget_batch([(record, "sent", "ok")])
    assert names(files) == [] and files.load(record.id) is None


async def test_a_record_too_large_for_the_head_gets_its_state_file_in_the_commit(
    tmp_path: Path,
) -> None:
    files = spool_files(tmp_path)
    record = await commit(files, recipients=200)
    assert not _prefix.fits(record.to_json())
    assert names(files) == [f"{record.id}.eml", f"{record.id}.json"]
    assert files.load(record.id) == record and files.read_message(record.id) == CONTENT
    files.prepare()
    assert files.records() == [record]


async def test_crash_debris_is_removed_at_start_and_committed_messages_kept(
    tmp_path: Path,
) -> None:
    files = spool_files(tmp_path)
    kept = await commit(files)
    queue = files.queue
    head = _prefix.encode(None)  # the head of a message whose state file never came
    (queue / "no-state.eml").write_bytes(head + bytes(_prefix.CONTENT_OFFSET - len(head)) + RAW)
    truncated = _prefix.encode(kept.to_json())[:-40]  # no newline: an incomplete state line
    (queue / "half-a-head.eml").write_bytes(truncated)
    (queue / "old-half-a-submit.eml").write_bytes(RAW)  # the old format, without its .json
    (queue / "forgotten.json").write_bytes(kept.to_json())  # a forget cut short
    (files.tmp / "leftover.eml.1234").write_bytes(RAW)
    files.prepare()
    assert names(files) == [f"{kept.id}.eml"]
    assert list(files.tmp.iterdir()) == []
    assert files.records() == [kept]


async def test_a_spool_written_the_old_way_is_read_and_delivered(tmp_path: Path) -> None:
    """An upgrade: messages stored as bare bytes beside their state file are listed, read
    (mapped too, from offset 0) and delivered; the queue command sees them."""
    files = spool_files(tmp_path)
    content = b"Received: from old\r\n" + CONTENT
    old = Record("0000000000000OLD", envelope(), "<1@example.com>", len(content))
    write_old_format(files, old, content)
    assert files.records() == [old] and files.read_message(old.id) == content
    mapping = files.map_message(old.id)
    try:
        assert mapping[:] == content
    finally:
        mapping.close()
    sender = Scripted()
    spool = make(tmp_path, sender)
    await spool.start()
    try:
        await until(lambda: spool.messages() == [])
    finally:
        await spool.stop()
    assert [raw for _, raw in sender.calls] == [content]
    assert names(files) == []
    assert (await spool.recent_deliveries())[0]["queue_id"] == old.id


async def test_the_database_store_gets_the_content_without_the_room_for_the_head(
    tmp_path: Path,
) -> None:
    files = spool_files(tmp_path)
    incoming = IncomingMessage(files.tmp, "gw.test", b"Received: x\r\n")
    await incoming.write(CONTENT)
    incoming.finish()
    assert incoming.content() == b"Received: x\r\n" + CONTENT
    incoming.discard()
    assert os.listdir(files.tmp) == []


def test_a_damaged_head_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="damaged head"):
        _prefix.parse(_prefix.MAGIC + b"x\n{}\n")
    assert _prefix.parse(b"Received: from x\r\n") == _prefix.Prefix(0, None)
    state = json.dumps({"id": "x"}).encode()
    assert _prefix.parse(_prefix.encode(state)) == _prefix.Prefix(_prefix.CONTENT_OFFSET, state)


def test_a_file_without_its_message_is_not_listed(tmp_path: Path) -> None:
    files = spool_files(tmp_path)
    (files.queue / "gone.json").write_bytes(b"{}")
    assert files.records() == [] and files.load("absent") is None
    assert os.path.exists(files.queue / "gone.json")  # removed only at start, by prepare
