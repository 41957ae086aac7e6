"""Segments pinned by a few messages (held, retried, dead) are compacted: those messages move to
files of their own and the segment goes, so that undelivered mail cannot keep megabytes of
delivered mail on disk; a compaction cut short by a crash leaves each message once."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.delivery import Permanent
from gateway.spool import _segments
from gateway.spool._files import SpoolFiles
from tests.unit.test_spool import Scripted, make, until
from tests.unit.test_spool import envelope as spool_envelope
from tests.unit.test_spool_files import names, spool_files
from tests.unit.test_spool_segments import commit_all, content, segments


async def test_a_mostly_done_segment_gives_its_last_message_a_file_and_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight messages in one segment, seven delivered, one held back: compact() writes the
    eighth to ``<id>.eml`` with its state and bytes, and deletes the segment."""
    files = spool_files(tmp_path)
    records = await commit_all(files, *(content(n, 2000) for n in range(8)))
    (old,) = segments(files)
    monkeypatch.setattr(_segments, "SEGMENT_BYTES", 1)  # the next commit starts a new one
    (later,) = await commit_all(files, content(99))
    kept, delivered = records[3], [r for r in records if r is not records[3]]
    files.forget_batch([(record, "sent", "ok") for record in delivered])
    assert files.compact() == 1
    assert old not in names(files) and f"{kept.id}.eml" in names(files)
    assert files.read_message(kept.id) == content(3, 2000)
    assert files.load(kept.id) == kept
    assert [r.id for r in files.records()] == [kept.id, later.id]
    assert files.compact() == 0  # the current segment is never compacted
    files.forget_batch([(kept, "sent", "ok")])
    assert files.records() == [later] and f"{kept.id}.eml" not in names(files)


async def test_a_segment_still_mostly_live_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compaction copies bytes: only a segment whose live part is under a quarter is worth it."""
    files = spool_files(tmp_path)
    records = await commit_all(files, *(content(n, 2000) for n in range(8)))
    monkeypatch.setattr(_segments, "SEGMENT_BYTES", 1)
    await commit_all(files, content(99))
    files.forget_batch([(record, "sent", "ok") for record in records[:5]])  # 3 of 8 live
    assert files.compact() == 0
    assert len(segments(files)) == 2


async def test_a_compaction_cut_short_leaves_each_message_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the file was renamed into place but before the entry was marked done:
    after a restart the message is listed once, read from its file, and one forget removes
    both copies (no second delivery)."""
    files = spool_files(tmp_path)
    records = await commit_all(files, *(content(n, 2000) for n in range(8)))
    monkeypatch.setattr(_segments, "SEGMENT_BYTES", 1)
    await commit_all(files, content(99))
    kept = records[0]
    files.forget_batch([(record, "sent", "ok") for record in records[1:]])

    def crash(queue_ids: list[str]) -> list[int]:
        raise SystemExit("the process died here")

    monkeypatch.setattr(files.segments, "mark_done", crash)
    with pytest.raises(SystemExit):
        files.compact()
    monkeypatch.undo()
    again = SpoolFiles(files.directory)
    again.prepare()
    assert [r.id for r in again.records()].count(kept.id) == 1
    assert again.read_message(kept.id) == content(0, 2000)
    again.forget_batch([(kept, "sent", "ok")])
    assert kept.id not in [r.id for r in again.records()]
    restarted = SpoolFiles(files.directory)
    restarted.prepare()
    assert kept.id not in [r.id for r in restarted.records()]


async def test_the_worker_compacts_at_its_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the spool: a message whose delivery keeps failing stays behind in a segment of
    delivered ones; the worker's rescan moves it to a file, and the segment goes."""
    monkeypatch.setattr(_segments, "SEGMENT_BYTES", 20_000)
    refused = Permanent("HTTP 403 ErrorSendAsDenied: no", 553, "5.7.1")
    spool = make(tmp_path, Scripted(refused, concurrency=1), rescan_interval=0.1)
    stuck = await spool.submit(spool_envelope(), content(0, 2000))  # the first sent: refused
    for n in range(1, 12):
        await spool.submit(spool_envelope(), content(n, 2000))
    first_segment = sorted(segments(spool.files))[0]
    await spool.start()
    try:
        await until(lambda: [r.state for r in spool.messages()] == ["dead"])
        assert spool.messages()[0].id == stuck.queue_id
        await until(lambda: first_segment not in names(spool.files))
    finally:
        await spool.stop()
    assert f"{stuck.queue_id}.eml" in names(spool.files)
    assert spool.files.read_message(stuck.queue_id).endswith(content(0, 2000))
    assert spool.files.load(stuck.queue_id).state == "dead"  # type: ignore[union-attr]
