"""The spool's on-disk form: a message in a segment or a file of its own, and a state file once
its state changed.

A message still in memory when it is committed (up to ``_incoming._FLUSH_AT``) is an entry of a
segment, ``queue/<id>.seg``, shared with the others of its batch and the batches after it
(``_segments``); what follows describes a message of its own file, and the crash rules of both
are alike: the state file wins over what was committed, a forget removes the message first.

``queue/<id>.eml`` holds the message, after a head (``_prefix``) with the envelope and initial
state: a message exists once that file has been renamed into ``queue/`` and the directory
fsynced, one file created per message at intake. ``queue/<id>.json`` appears at the first state
change (an attempt begins, a retry, held, dead) and from then on wins over the head. Every state
change rewrites the JSON to a temporary name, fsyncs, renames, and fsyncs the directory, so a
crash leaves either the old state or the new one. A message is forgotten by removing its
``.eml`` first (it is gone), then its ``.json``.

At start, what a crash may have left is removed: temporary files, an ``.eml`` with neither a
state in its head nor a ``.json`` (an interrupted submit: the client got no 250), a ``.json``
without its ``.eml`` (an interrupted forget). A spool written before the head existed (an
``.eml`` of bare message bytes beside its ``.json``) is read and delivered as it is.

Files the spool is done with (a delivered message's, a replaced state) are kept emptied in
``spare/`` and renamed into place for new ones instead of being deleted and created anew
(``_spare``). These functions block (fsync); the spool calls them through ``asyncio.to_thread``.
They are also what ``gateway queue`` uses directly, with or without a running gateway.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..logs import get_logger
from . import _prefix
from ._segments import Segments
from ._spare import spare_files
from ._types import Envelope

if TYPE_CHECKING:
    from ._incoming import IncomingMessage

log = get_logger(__name__)
State = Literal["queued", "held", "dead"]
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.I | re.M)
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
DELIVERY_LOG = "deliveries.jsonl"
PAUSES = "pauses.json"  # account → epoch seconds until which its provider asked us to wait
_LOG_ROTATE_BYTES = 8 * 1024 * 1024


@dataclass
class Record:
    """One spooled message's envelope and delivery state (its file's head, or its JSON file)."""

    id: str
    envelope: Envelope
    message_id: str
    size: int
    state: State = "queued"
    created: float = field(default_factory=time.time)
    retry_since: float = field(default_factory=time.time)  # start of the retry window
    attempts: int = 0
    attempt_started: bool = False  # an attempt began and may have reached the provider
    next_attempt: float = 0.0  # epoch seconds
    reason: str = ""  # last temporary error, why held, or why dead

    def to_json(self) -> bytes:
        data = asdict(self)
        data["envelope"] = envelope_data(self.envelope)
        return json.dumps(data, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, text: bytes) -> Record:
        data: dict[str, Any] = json.loads(text)
        envelope = envelope_from(data.pop("envelope"))
        return cls(envelope=envelope, **data)


def envelope_data(envelope: Envelope) -> dict[str, Any]:
    """The envelope as JSON-ready data (the state file's and the database row's form)."""
    data = asdict(envelope)
    data["received_at"] = envelope.received_at.isoformat()
    data["rcpt_tos"] = list(envelope.rcpt_tos)
    return data


def envelope_from(env: dict[str, Any]) -> Envelope:
    return Envelope(
        account=env["account"],
        mail_from=env["mail_from"],
        rcpt_tos=tuple(env["rcpt_tos"]),
        smtputf8=env["smtputf8"],
        received_at=datetime.fromisoformat(env["received_at"]),
        client=env["client"],
    )


def new_id() -> str:
    """Sortable by submission time, unguessable enough to name a file."""
    return f"{time.time_ns() // 1_000_000:012X}{secrets.token_hex(4).upper()}"


def message_id_header(raw: bytes, hostname: str) -> tuple[bytes, str]:
    """(bytes to prepend, Message-ID): an existing Message-ID, or a new header to add.

    Dedupe after a crash finds the message in the provider's sent mail by this id, so a message
    without one gets one before it is stored.
    """
    blank = _BLANK_LINE.search(raw)
    head = raw[: blank.start()] if blank else raw
    found = _MESSAGE_ID.search(head)
    if found:
        value = b" ".join(found.group(1).split()).decode("utf-8", "replace")
        bracketed = re.search(r"<[^<>\s]+>", value)
        if bracketed:
            return b"", bracketed.group(0)
    newline = b"\r\n" if b"\r\n" in raw[:1000] else b"\n"
    created = f"<{uuid.uuid4().hex}@{hostname}>"
    return b"Message-ID: " + created.encode() + newline, created


class SpoolFiles:
    """The directory layout and its durable operations."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.queue = directory / "queue"
        self.tmp = directory / "tmp"
        self.log = directory / DELIVERY_LOG
        self.pauses = directory / PAUSES
        self.spares = spare_files(self.tmp)  # files done with, reused (see ``_spare``)
        self.segments = Segments(self.queue)  # small messages, many to a file (``_segments``)
        self._moving = threading.Lock()  # compact() vs forget_batch(): see compact

    def prepare(self) -> None:
        """Create the directories; drop what a crash left (see the module docstring)."""
        for path in (self.queue, self.tmp):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        for segment, cut in self.segments.repair():
            log.info("spool.segment_tail_cut", segment=segment, bytes=cut)
        messages, states = self._listing()
        for queue_id in messages:
            if self._load(queue_id, queue_id in states) is None:
                self.message_path(queue_id).unlink(missing_ok=True)
        in_segments = {queue_id for queue_id, _ in self.segments.live()}
        for queue_id in states - set(messages) - in_segments:
            self.state_path(queue_id).unlink(missing_ok=True)

    def _listing(self) -> tuple[list[str], set[str]]:
        """The ids of the message files in ``queue/``, sorted (oldest first), and of the state
        files."""
        messages: list[str] = []
        states: set[str] = set()
        with os.scandir(self.queue) as entries:
            for entry in entries:
                stem, _, suffix = entry.name.rpartition(".")
                if suffix == "eml":
                    messages.append(stem)
                elif suffix == "json":
                    states.add(stem)
        return sorted(messages), states

    def message_path(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.eml"

    def state_path(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.json"

    def commit_batch(self, batch: list[tuple[Record, IncomingMessage]]) -> list[OSError | None]:
        """Store new messages durably, sharing their fsyncs (group commit).

        A message still in memory whose record fits in a head is appended to the current
        segment (``_segments``: one write and one fsync for all of them); any other gets its
        message file's head (``_prefix``) and is renamed into ``queue/`` after its fsync. All
        fsyncs run at once (see :func:`_fsync_all`), then the directory is fsynced once: after
        this returns, every message with ``None`` in the result survives a crash; one that
        could not be written is dropped alone (the segment's, all together). A record too
        large for the head (many recipients) gets its state file in the same commit.
        """
        results: list[OSError | None] = [None] * len(batch)
        states = [record.to_json() for record, _ in batch]
        segment = [i for i, (_, m) in enumerate(batch) if m.in_memory and _prefix.fits(states[i])]
        segment_fd, new_segment = self._append_segment(batch, states, segment, results)
        appended = set(segment)  # (emptied by a failed append: those already have their error)
        written: list[tuple[int, list[int], Path | None]] = []  # (index, fds, state tmp)
        for index, (record, incoming) in enumerate(batch):
            if index in appended or results[index] is not None:
                continue
            try:
                written.append((index, *self._write_head(record, states[index], incoming)))
            except OSError as error:
                incoming.discard()
                results[index] = error
        fds = [fd for _, fds, _ in written for fd in fds]
        errors = _fsync_all(fds + ([segment_fd] if segment_fd is not None else []))
        if segment_fd is not None and errors[-1] is not None:
            self.segments.abandon()
            for index in segment:
                results[index] = errors[-1]
            segment, new_segment = [], False
        ready = self._close_written(batch, written, iter(errors), results)
        try:
            for record, message_tmp, state_tmp in ready:
                os.replace(message_tmp, self.message_path(record.id))
                if state_tmp is not None:
                    os.replace(state_tmp, self.state_path(record.id))
            if ready or new_segment:
                _fsync_dir(self.queue)
        except OSError as error:
            for record, message_tmp, state_tmp in ready:  # no 250 for any: leave no trace
                for path in (self.message_path(record.id), message_tmp, state_tmp):
                    if path is not None:
                        path.unlink(missing_ok=True)
                self.state_path(record.id).unlink(missing_ok=True)
            if segment:
                self.segments.abandon()
            return [error if result is None else result for result in results]
        if segment:
            self.segments.committed()
        return results

    def _append_segment(
        self,
        batch: list[tuple[Record, IncomingMessage]],
        states: list[bytes],
        chosen: list[int],
        results: list[OSError | None],
    ) -> tuple[int | None, bool]:
        """Append the ``chosen`` messages to the current segment: its descriptor to fsync and
        whether it is new; (None, False) when there are none, or the write failed (their
        ``results`` then say why)."""
        if not chosen:
            return None, False
        entries = [(batch[i][0].id, states[i], batch[i][1].take_content()) for i in chosen]
        try:
            return self.segments.append(entries)
        except OSError as error:
            for index in chosen:
                results[index] = error
            chosen.clear()
            return None, False

    def _close_written(
        self,
        batch: list[tuple[Record, IncomingMessage]],
        written: list[tuple[int, list[int], Path | None]],
        errors: Iterator[OSError | None],
        results: list[OSError | None],
    ) -> list[tuple[Record, Path, Path | None]]:
        """Close the fsynced message files; those whose fsync failed are dropped (their
        ``results`` say why), the others are ready to be renamed into ``queue/``."""
        ready: list[tuple[Record, Path, Path | None]] = []
        for index, fds, state_tmp in written:
            record, incoming = batch[index]
            failed = next((e for e in [next(errors) for _ in fds] if e is not None), None)
            incoming.close_file()
            if state_tmp is not None:
                os.close(fds[1])
            if failed is not None:
                incoming.discard()
                if state_tmp is not None:
                    state_tmp.unlink(missing_ok=True)
                results[index] = failed
                continue
            ready.append((record, incoming.path, state_tmp))
        return ready

    def _write_head(
        self, record: Record, state: bytes, incoming: IncomingMessage
    ) -> tuple[list[int], Path | None]:
        """Finish the message file and write its head (``state``, the record's JSON), unsynced:
        the descriptors to fsync (the message's, and a state file's when the record did not
        fit in the head) and that state file's temporary path."""
        message_fd = incoming.write_rest()
        in_head = _prefix.fits(state)
        _write_all(message_fd, _prefix.encode(state if in_head else None), offset=0)
        if in_head:
            return [message_fd], None
        state_tmp, state_fd = self._write_unsynced(record.id + ".json", [state])
        return [message_fd, state_fd], state_tmp

    def save(self, record: Record) -> bool:
        """Replace a record's state; False (and nothing written) if it was deleted meanwhile."""
        return self.save_batch([record])[0]

    def save_batch(self, records: list[Record]) -> list[bool]:
        """Replace several records' states, their fsyncs at once and one directory fsync; per
        record, False (and nothing written) if it was deleted meanwhile."""
        written: list[tuple[Record, Path, int]] = []
        try:
            for record in records:
                if self._exists(record.id):
                    path, fd = self._write_unsynced(record.id + ".json", [record.to_json()])
                    written.append((record, path, fd))
            error = next((e for e in _fsync_all([fd for _, _, fd in written]) if e), None)
            if error is not None:
                raise error
        except OSError:
            for _, path, _ in written:
                path.unlink(missing_ok=True)
            raise
        finally:
            for _, _, fd in written:
                os.close(fd)
        for record, state_tmp, _ in written:
            self.spares.replace(state_tmp, self.state_path(record.id))
        if written:
            _fsync_dir(self.queue)
        saved = {record.id for record, _, _ in written}
        return [record.id in saved for record in records]

    def forget_batch(self, done: list[tuple[Record, str, str]]) -> list[None]:
        """Remove messages done with, then log each (record, result, detail): one directory
        fsync and one delivery-log fsync for all (a crash in between repeats no delivery)."""
        ids = [record.id for record, _, _ in done]
        with self._moving:  # not while compact() gives one of them a file (it would stay)
            error = next((e for e in _fsync_all(self.segments.mark_done(ids)) if e), None)
            if error is not None:
                raise error
            for record, _, _ in done:
                self.spares.give(self.message_path(record.id))  # first: the message is gone
                self.spares.give(self.state_path(record.id))
        _fsync_dir(self.queue)
        self.segments.collect(ids)
        self._log_lines([log_line(*item) for item in done])
        return [None] * len(done)

    def _exists(self, queue_id: str) -> bool:
        return self.message_path(queue_id).exists() or self.segments.find(queue_id) is not None

    def read_message(self, queue_id: str) -> bytes:
        try:
            with self.message_path(queue_id).open("rb") as file:
                file.seek(_content_offset(file.fileno()))
                return file.read()
        except FileNotFoundError:
            return self.segments.content(queue_id)

    def map_message(self, queue_id: str) -> mmap.mmap | bytes:
        """The message file mapped read-only, from where the message begins (page-aligned):
        its pages are the page cache's, not ours, so a large message costs no heap memory and
        its RSS goes with ``close()``. A segment's message is small: its bytes are read."""
        try:
            with self.message_path(queue_id).open("rb") as file:
                offset = _content_offset(file.fileno())
                return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ, offset=offset)
        except FileNotFoundError:
            return self.segments.content(queue_id)

    def load(self, queue_id: str) -> Record | None:
        """The message's state: its state file, or else its file's head; None if it is gone
        (or was never committed)."""
        return self._load(queue_id, has_state_file=True)

    def _load(self, queue_id: str, has_state_file: bool) -> Record | None:
        """The state file wins over the head; ``has_state_file`` says whether a listing saw
        one (without, the head is read first, and the state file only if the head has no
        state: one written since the listing)."""
        if has_state_file:
            record = self._load_state_file(queue_id)
            if record is not None:
                return record
        try:
            with self.message_path(queue_id).open("rb") as file:
                state = _prefix.parse(os.pread(file.fileno(), _prefix.HEAD_BYTES, 0)).state
        except FileNotFoundError:
            state = self.segments.first_state(queue_id)
            if state is None:
                return None
        if state is not None:
            return Record.from_json(state)
        return None if has_state_file else self._load_state_file(queue_id)

    def _load_state_file(self, queue_id: str) -> Record | None:
        try:
            return Record.from_json(self.state_path(queue_id).read_bytes())
        except FileNotFoundError:
            return None

    def records(self) -> list[Record]:
        """Every committed message, oldest first."""
        messages, states = self._listing()
        found = []
        for queue_id in messages:
            record = self._load(queue_id, queue_id in states)
            if record is not None:
                found.append(record)
        in_files = set(messages)
        for queue_id, first_state in self.segments.live():
            if queue_id in in_files:
                continue  # moved to a file of its own by compact(), which was cut short
            state_file = self._load_state_file(queue_id) if queue_id in states else None
            found.append(state_file or Record.from_json(first_state))
        return sorted(found, key=lambda record: record.id)

    def compact(self) -> int:
        """Move the messages that pin mostly-done segments to files of their own (see
        ``Segments.sparse``), then drop them from their segments; how many moved. Each is
        written, fsynced and renamed into ``queue/`` before its entry is marked done, so a
        crash in between leaves it twice, and the file wins (``records``, ``_load``)."""
        moved: list[str] = []
        for queue_id in self.segments.sparse():
            with self._moving:  # a forget cannot come between the check and the rename
                state = self.segments.first_state(queue_id)
                if state is None:
                    continue  # forgotten meanwhile
                content = self.segments.content(queue_id)
                head = _prefix.encode(state)
                padding = bytes(_prefix.CONTENT_OFFSET - len(head))
                temporary = self._write_temp(f"{queue_id}.eml", [head, padding, content])
                os.replace(temporary, self.message_path(queue_id))
            moved.append(queue_id)
        if not moved:
            return 0
        _fsync_dir(self.queue)
        error = next((e for e in _fsync_all(self.segments.mark_done(moved)) if e), None)
        if error is not None:
            raise error
        self.segments.collect(moved)
        return len(moved)

    def save_pauses(self, pauses: dict[str, float]) -> None:
        """Replace the accounts' pauses (for ``gateway queue`` and the next start)."""
        state_tmp = self._write_temp(PAUSES, [json.dumps(pauses).encode()])
        os.replace(state_tmp, self.pauses)

    def load_pauses(self, now: float) -> dict[str, float]:
        """The pauses that still last at ``now``; none if the file is missing or unreadable
        (a pause is an optimisation: without it the provider just says 429 again)."""
        try:
            data = json.loads(self.pauses.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            str(account): float(until)
            for account, until in data.items()
            if isinstance(until, int | float) and until > now
        }

    def log_delivery(self, record: Record, result: str, detail: str) -> None:
        self._log_lines([log_line(record, result, detail)])

    def _log_lines(self, lines: list[dict[str, Any]]) -> None:
        if self.log.exists() and self.log.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(self.log, self.log.with_suffix(".jsonl.1"))
        with self.log.open("a", encoding="utf-8") as out:
            out.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())

    def recent_deliveries(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` delivery-log lines, newest first."""
        if not self.log.exists():
            return []
        lines = self.log.read_text(encoding="utf-8").splitlines()[-limit:]
        return [json.loads(line) for line in reversed(lines) if line.strip()]

    def _write_temp(self, name: str, pieces: Iterable[bytes]) -> Path:
        path, fd = self._write_unsynced(name, pieces)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def _write_unsynced(self, name: str, pieces: Iterable[bytes]) -> tuple[Path, int]:
        """A new temporary file with ``pieces`` written, not yet fsynced; its path and open fd."""
        path = self.tmp / f"{name}.{secrets.token_hex(4)}"
        fd = self.spares.create(path)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return path, fd


# fsyncs of one batch run side by side: ext4 (jbd2) and XFS commit the fsyncs that wait at the
# same time in one journal transaction, so a batch costs about one journal commit, where one
# thread fsyncing its files in turn pays one commit per file (issue 13: that was the intake's
# and the delivery's bottleneck).
_SYNC_THREADS = 16
_syncer = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="spool-fsync")


def _fsync_all(fds: list[int]) -> list[OSError | None]:
    """fsync every descriptor, concurrently; per descriptor, the error or None."""

    def sync(fd: int) -> OSError | None:
        try:
            os.fsync(fd)
        except OSError as error:
            return error
        return None

    if len(fds) <= 1:
        return [sync(fd) for fd in fds]
    return list(_syncer.map(sync, fds))


def log_line(record: Record, result: str, detail: str) -> dict[str, Any]:
    """One delivery-log entry."""
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "queue_id": record.id,
        "message_id": record.message_id,
        "account": record.envelope.account,
        "recipients": len(record.envelope.rcpt_tos),
        "result": result,
        "detail": detail,
    }


def retry_files(files: SpoolFiles, queue_id: str | None, held_for: str | None = None) -> int:
    """Make messages due now on disk (the running worker picks this up on its next rescan):
    one message, the held mail of account ``held_for``, or every message."""
    changed = 0
    for record in files.records():
        if queue_id is not None and record.id != queue_id:
            continue
        if held_for is not None and (record.envelope.account, record.state) != (held_for, "held"):
            continue
        record.state, record.next_attempt = "queued", 0.0
        record.retry_since = time.time()
        if files.save(record):
            changed += 1
    return changed


def _content_offset(fd: int) -> int:
    """Where the message begins in an open message file (0 in a file of the old format)."""
    return _prefix.parse(os.pread(fd, _prefix.HEAD_BYTES, 0)).offset


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
