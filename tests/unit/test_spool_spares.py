"""Spare files (gateway.spool._spare): files the spool is done with are emptied and reused.

What matters: a file given up leaves its directory at once (a delivered message's state file
must not linger), a reused file starts empty, a replaced state file's new content is in place,
and nothing breaks when another process takes a spare first or the spare directory is unusable.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.delivery import Envelope
from gateway.spool import _spare
from gateway.spool._files import Record, SpoolFiles
from gateway.spool._incoming import IncomingMessage
from gateway.spool._spare import SpareFiles


def test_a_given_file_leaves_at_once_and_comes_back_empty_under_a_new_name(
    tmp_path: Path,
) -> None:
    spares = SpareFiles(tmp_path / "spare")
    old = tmp_path / "old.eml"
    old.write_bytes(b"a delivered message\r\n")
    inode = old.stat().st_ino
    spares.give(old)
    assert not old.exists()
    (kept,) = (tmp_path / "spare").iterdir()
    assert kept.stat().st_size == 0  # nothing of the message is kept
    new = tmp_path / "new.eml"
    fd = spares.create(new)
    try:
        os.write(fd, b"next")
    finally:
        os.close(fd)
    assert new.read_bytes() == b"next"
    assert new.stat().st_ino == inode  # the same file: no inode freed, none allocated
    assert list((tmp_path / "spare").iterdir()) == []


def test_replace_puts_the_new_file_in_place_and_keeps_the_old_one(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    state, new_state = tmp_path / "q.json", tmp_path / "q.json.tmp"
    state.write_bytes(b'{"attempts": 0}')
    new_state.write_bytes(b'{"attempts": 1}')
    old_inode = state.stat().st_ino
    spares.replace(new_state, state)
    assert state.read_bytes() == b'{"attempts": 1}' and not new_state.exists()
    (kept,) = (tmp_path / "spare").iterdir()
    assert kept.stat().st_ino == old_inode and kept.stat().st_size == 0
    # No previous file: a plain rename.
    spares.replace(state, tmp_path / "elsewhere.json")
    assert (tmp_path / "elsewhere.json").read_bytes() == b'{"attempts": 1}'


def test_a_spare_taken_by_another_process_means_a_new_file(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path / "spare")
    old = tmp_path / "old"
    old.write_bytes(b"x")
    spares.give(old)
    for taken in (tmp_path / "spare").iterdir():
        taken.unlink()  # as ``gateway queue`` renaming it away would
    fd = spares.create(tmp_path / "new")
    os.close(fd)
    assert (tmp_path / "new").read_bytes() == b""


def test_a_previous_runs_spares_are_adopted_and_emptied_on_reuse(tmp_path: Path) -> None:
    (tmp_path / "spare").mkdir()
    (tmp_path / "spare" / "left-by-a-crash").write_bytes(b"not emptied before the crash")
    fd = SpareFiles(tmp_path / "spare").create(tmp_path / "new")
    os.close(fd)
    assert (tmp_path / "new").read_bytes() == b""
    assert list((tmp_path / "spare").iterdir()) == []


def test_beyond_the_limit_files_are_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spare, "LIMIT", 2)
    spares = SpareFiles(tmp_path / "spare")
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x")
        spares.give(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == ["spare"]
    assert len(list((tmp_path / "spare").iterdir())) == 2


def test_without_a_spare_directory_files_are_deleted_and_created(tmp_path: Path) -> None:
    (tmp_path / "spare").write_bytes(b"a file where the directory should be")
    spares = SpareFiles(tmp_path / "spare")
    (tmp_path / "old").write_bytes(b"x")
    spares.give(tmp_path / "old")
    assert not (tmp_path / "old").exists()
    os.close(spares.create(tmp_path / "new"))
    assert (tmp_path / "new").read_bytes() == b""


async def test_a_delivered_messages_files_are_reused_for_the_next_message(
    tmp_path: Path,
) -> None:
    """Through the spool's files: commit, forget, commit again: no new inode for the second
    message's file, and the second message's bytes and state are its own."""
    files = SpoolFiles(tmp_path / "spool")
    files.prepare()
    envelope = Envelope("crm", "a@example.com", ("b@example.org",), False, datetime.now(UTC), "")

    async def commit(message: bytes) -> Record:
        incoming = IncomingMessage(files.tmp, "gw.test")
        await incoming.write(message)
        incoming.finish()
        record = Record(incoming.id, envelope, incoming.message_id, incoming.size)
        assert files.commit_batch([(record, incoming)]) == [None]
        return record

    # messages large enough to be files of their own (smaller ones share a segment)
    first = await commit(b"Message-ID: <1@a>\r\n\r\n" + b"the first, a longer one\r\n" * 12000)

    used = files.message_path(first.id).stat().st_ino
    files.forget_batch([(first, "sent", "ok")])
    assert list(files.queue.iterdir()) == []
    assert len(list(files.spares.directory.iterdir())) == 1  # emptied, kept
    second_bytes = b"Message-ID: <2@a>\r\n\r\n" + b"second\r\n" * 40000
    second = await commit(second_bytes)
    assert files.read_message(second.id) == second_bytes
    assert files.load(second.id) == second
    assert files.message_path(second.id).stat().st_ino == used
    assert list(files.spares.directory.iterdir()) == []
