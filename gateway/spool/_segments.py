"""Segments: small messages committed together in one append-only file instead of one file each.

Why: on ext4 without a journal (this project's test machine) creating a file costs 0.15-0.8 ms
of kernel CPU once files have been deleted nearby (``_spare`` explains the inode search), and
``perf`` put a third of the gateway's CPU in an intake burst there (issue 13). A message whose
bytes are still in memory when it is committed (under ``_incoming._FLUSH_AT``, the usual
10-100 KB mail) is appended to the current segment ``queue/<id of its first entry>.seg``; the
batch costs one ``writev`` and one ``fsync`` however many messages it holds, and a new
segment (one file creation) only every ``SEGMENT_BYTES``. Larger messages stay one file each
(``_files``): they were streamed to disk while they arrived, and one creation per megabyte
costs nothing that matters.

An entry is a fixed header, the record's JSON (envelope and first state, as in a message
file's head) and the message's bytes::

    magic (8) | status (1) | 3 zero bytes | state length (4) | content length (8) | CRC-32 (4)

The CRC covers the lengths, the state and the content, not the status: a crash while a batch
was being written (no client got its 250) leaves a torn tail that fails the check, and reading
stops there. ``status`` is ``L`` (live) until the message is done with, then ``D``, written in
place and fsynced: that is how a segment message is forgotten. A segment whose entries are
all done is deleted by the process that commits (the gateway), never while it is still being
appended to; one whose live entries take under a quarter of it has them moved to files of their
own at the worker's rescan (``SpoolFiles.compact``), so that a few held messages cannot pin
megabytes of delivered ones. Later state changes go to ``<id>.json`` exactly as for a message
file.

A process only ever appends to a segment it created itself, so a torn tail is never followed by
new entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SUFFIX = "seg"
SEGMENT_BYTES = 1024 * 1024  # a segment takes no new entries once it is this large
SPARSE_FRACTION = 4  # a segment whose live entries are under 1/4 of it is compacted
MAGIC = b"\x00gwseg1\n"
LIVE, DONE = b"L", b"D"
_HEADER = struct.Struct(">8sc3xIQI")
_STATUS_AT = len(MAGIC)  # the status byte's offset within an entry
_LENGTHS = struct.Struct(">IQ")


@dataclass(frozen=True)
class Entry:
    """Where one message lies in its segment."""

    segment: str  # the segment's file name in ``queue/``
    offset: int  # where the entry's header begins
    state_length: int
    content_length: int

    @property
    def state_at(self) -> int:
        return self.offset + _HEADER.size

    @property
    def content_at(self) -> int:
        return self.state_at + self.state_length

    @property
    def status_at(self) -> int:
        return self.offset + _STATUS_AT

    @property
    def end(self) -> int:
        return self.content_at + self.content_length


def encode(state: bytes, content: Sequence[bytes]) -> list[bytes]:
    """An entry's pieces, ready for ``writev``: header, state, content."""
    content_length = sum(len(piece) for piece in content)
    crc = _checksum(state, content_length, content)
    header = _HEADER.pack(MAGIC, LIVE, len(state), content_length, crc)
    return [header, state, *content]


def _checksum(state: bytes, content_length: int, content: Iterable[bytes]) -> int:
    """The CRC-32 of the lengths, the state and the content (not the status: it changes)."""
    crc = zlib.crc32(state, zlib.crc32(_LENGTHS.pack(len(state), content_length)))
    for piece in content:
        crc = zlib.crc32(piece, crc)
    return crc


def read_entries(fd: int, name: str, start: int = 0) -> Iterator[tuple[Entry, bool, bytes]]:
    """(entry, live, state JSON) for each whole entry from ``start``, in order; stops at the
    end of the file or at the first entry that is torn or damaged (see the module docstring)."""
    offset = start
    size = os.fstat(fd).st_size
    while offset + _HEADER.size <= size:
        header = os.pread(fd, _HEADER.size, offset)
        magic, status, state_length, content_length, crc = _HEADER.unpack(header)
        entry = Entry(name, offset, state_length, content_length)
        if magic != MAGIC or status not in (LIVE, DONE) or entry.end > size:
            return
        state = os.pread(fd, state_length, entry.state_at)
        if _checksum(state, content_length, _content_pieces(fd, entry)) != crc:
            return
        yield entry, status == LIVE, state
        offset = entry.end


def _content_pieces(fd: int, entry: Entry) -> Iterator[bytes]:
    """An entry's content read in pieces of at most 1 MiB (it may be up to 256 KiB, or more
    in a segment written with another limit)."""
    at, left = entry.content_at, entry.content_length
    while left > 0:
        piece = os.pread(fd, min(left, 1024 * 1024), at)
        if not piece:
            return
        yield piece
        at, left = at + len(piece), left - len(piece)


def is_live(fd: int, entry: Entry) -> bool:
    return os.pread(fd, 1, entry.status_at) == LIVE


def mark_done(fd: int, entry: Entry) -> None:
    """Set the entry's status to done (unsynced: the caller fsyncs the segment)."""
    os.pwrite(fd, DONE, entry.status_at)


def read_content(fd: int, entry: Entry) -> bytes:
    return os.pread(fd, entry.content_length, entry.content_at)


class Segments:
    """The segments of one spool directory: appending, finding, reading and forgetting their
    entries. Safe to call from several threads (the spool's worker threads); only the process
    that commits (the gateway) appends or deletes segments, ``gateway queue`` beside it reads
    them and marks entries done.
    """

    def __init__(self, queue: Path) -> None:
        self.queue = queue
        self._lock = threading.RLock()
        self._fds: dict[str, int] = {}  # open descriptors, read-write
        self._parsed: dict[str, int] = {}  # segment → offset read up to
        self._entries: dict[str, tuple[Entry, bytes]] = {}  # live id → (entry, first state)
        self._live: dict[str, set[str]] = {}  # segment → its live ids
        self._current: str | None = None  # the segment this process appends to
        self._size = 0
        self._pending: list[tuple[str, Entry, bytes]] = []  # the last append, until committed
        self._owner = False  # this process prepared the directory: it may delete segments

    # -- committing ---------------------------------------------------------------------------

    def append(self, entries: Sequence[tuple[str, bytes, Sequence[bytes]]]) -> tuple[int, bool]:
        """Write (id, state JSON, content pieces) entries at the end of the current segment
        (a new one when it is full): the descriptor to fsync before :meth:`committed`, and
        whether the segment is new (the directory then needs an fsync too). Nobody finds the
        entries before :meth:`committed`."""
        with self._lock:
            created = self._current is None or self._size >= SEGMENT_BYTES
            if created:
                self._start(entries[0][0])
            assert self._current is not None
            name, fd, offset = self._current, self._fds[self._current], self._size
            pieces: list[bytes] = []
            self._pending = []
            for queue_id, state, content in entries:
                encoded = encode(state, content)
                entry = Entry(name, offset, len(state), sum(len(p) for p in content))
                self._pending.append((queue_id, entry, state))
                pieces += encoded
                offset = entry.end
            try:
                _writev_all(fd, pieces, self._size)
            except OSError:
                self.abandon()
                raise
            self._size = offset
            return fd, created

    def committed(self) -> None:
        """The last :meth:`append` is durable: its entries exist from now on."""
        with self._lock:
            for queue_id, entry, state in self._pending:
                self._entries[queue_id] = (entry, state)
                self._live.setdefault(entry.segment, set()).add(queue_id)
            if self._current is not None:
                self._parsed[self._current] = self._size
            self._pending = []

    def abandon(self) -> None:
        """The last :meth:`append` failed (a write or the fsync): its entries are marked
        done, in case their bytes reach the disk after all, and the next batch starts a new
        segment, as this one's pages can no longer be trusted."""
        with self._lock:
            with contextlib.suppress(OSError):
                for _, entry, _ in self._pending:
                    mark_done(self._fds[entry.segment], entry)
                if self._pending:
                    os.fsync(self._fds[self._pending[0][1].segment])
            self._pending = []
            if self._current is not None:
                self._parsed[self._current] = self._size
            self._current, self._size = None, 0

    def _start(self, first_id: str) -> None:
        name = f"{first_id}.{SUFFIX}"
        fd = os.open(self.queue / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._fds[name], self._parsed[name] = fd, 0
        self._current, self._size = name, 0

    # -- finding and reading --------------------------------------------------------------------

    def find(self, queue_id: str) -> Entry | None:
        """Where a live message lies, or None (not in a segment, or done with)."""
        with self._lock:
            found = self._entries.get(queue_id)
            if found is None and not self._owner:  # the owner knows all it committed
                self._refresh()
                found = self._entries.get(queue_id)
            if found is None:
                return None
            if not is_live(self._fds[found[0].segment], found[0]):  # done by another process
                self._drop(queue_id)
                return None
            return found[0]

    def first_state(self, queue_id: str) -> bytes | None:
        """The record JSON the message was committed with, if it is a live segment entry."""
        with self._lock:
            entry = self.find(queue_id)
            return self._entries[queue_id][1] if entry is not None else None

    def content(self, queue_id: str) -> bytes:
        with self._lock:
            entry = self.find(queue_id)
            if entry is None:
                raise FileNotFoundError(f"no message {queue_id} in the spool")
            return read_content(self._fds[entry.segment], entry)

    def live(self) -> list[tuple[str, bytes]]:
        """(id, first state) of every live entry, re-reading the status of each (``gateway
        queue`` may have deleted one) and reading segments that are new or have grown."""
        with self._lock:
            self._refresh()
            for queue_id, (entry, _) in list(self._entries.items()):
                if not is_live(self._fds[entry.segment], entry):
                    self._drop(queue_id)
            self._delete_empty()
            return [(queue_id, state) for queue_id, (_, state) in self._entries.items()]

    def _refresh(self) -> None:
        """Read what this process has not read yet: new segments, and entries appended to a
        segment another process writes (its size grew)."""
        names = {p.name for p in self.queue.glob(f"*.{SUFFIX}")}
        for name in list(self._fds):
            if name not in names and name != self._current:
                self._close(name)
        for name in sorted(names):
            if name == self._current:
                continue
            fd = self._fds.get(name)
            if fd is None:
                try:
                    fd = self._fds[name] = os.open(self.queue / name, os.O_RDWR)
                except FileNotFoundError:
                    continue
            start = self._parsed.get(name, 0)
            if os.fstat(fd).st_size <= start:
                continue
            end = start
            for entry, live, state in read_entries(fd, name, start):
                end = entry.end
                if live:
                    queue_id = _id_of(state)
                    self._entries[queue_id] = (entry, state)
                    self._live.setdefault(name, set()).add(queue_id)
            self._parsed[name] = max(end, start)

    def sparse(self) -> list[str]:
        """The live messages of the segments that are mostly done with (live entries under a
        quarter of the file) and no longer appended to: what pins their space. The spool moves
        them to files of their own (``SpoolFiles.compact``), so that a few held or retried
        messages cannot keep megabytes of delivered ones on disk."""
        with self._lock:
            pinned: list[str] = []
            for name, ids in self._live.items():
                if name == self._current or not ids:
                    continue
                size = self._parsed.get(name, 0)
                live = sum(self._entries[i][0].end - self._entries[i][0].offset for i in ids)
                if live * SPARSE_FRACTION <= size:
                    pinned += sorted(ids)
            return pinned

    # -- forgetting -----------------------------------------------------------------------------

    def mark_done(self, queue_ids: list[str]) -> list[int]:
        """Mark these messages' entries done (those that are segment entries): the descriptors
        to fsync before :meth:`collect`."""
        touched: dict[str, int] = {}
        with self._lock:
            for queue_id in queue_ids:
                entry = self.find(queue_id)
                if entry is not None:
                    mark_done(self._fds[entry.segment], entry)
                    touched[entry.segment] = self._fds[entry.segment]
        return list(touched.values())

    def collect(self, queue_ids: list[str]) -> None:
        """Forget the marked entries, and delete the segments left with nothing live."""
        with self._lock:
            for queue_id in queue_ids:
                self._drop(queue_id)
            self._delete_empty()

    def _delete_empty(self) -> None:
        """Remove the segments read to their end whose entries are all done, except the one
        being appended to (a torn tail keeps its segment until :meth:`repair`). Only the
        process that prepared the directory does: ``gateway queue`` cannot know which segment
        a running gateway appends to."""
        if not self._owner:
            return
        with self._lock:
            for name in [n for n in self._fds if n != self._current and not self._live.get(n)]:
                if self._parsed.get(name) == os.fstat(self._fds[name]).st_size:
                    (self.queue / name).unlink(missing_ok=True)
                    self._close(name)

    def repair(self) -> list[tuple[str, int]]:
        """At start, before anything is appended: cut every segment's torn tail (what a crash
        left of a batch nobody got a 250 for), then delete the segments with nothing live.
        Returns (segment, bytes cut) for each tail cut."""
        cut: list[tuple[str, int]] = []
        with self._lock:
            self._owner = True
            self._refresh()
            for name, fd in self._fds.items():
                size, end = os.fstat(fd).st_size, self._parsed.get(name, 0)
                if size > end:
                    os.ftruncate(fd, end)
                    os.fsync(fd)
                    cut.append((name, size - end))
            self._delete_empty()
        return cut

    def _drop(self, queue_id: str) -> None:
        found = self._entries.pop(queue_id, None)
        if found is not None:
            self._live.get(found[0].segment, set()).discard(queue_id)

    def _close(self, name: str) -> None:
        fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)
        self._parsed.pop(name, None)
        for queue_id in self._live.pop(name, set()):
            self._entries.pop(queue_id, None)

    def close(self) -> None:
        with self._lock:
            for name in list(self._fds):
                self._close(name)
            self._current, self._size = None, 0


def _id_of(state: bytes) -> str:
    return str(json.loads(state)["id"])


def _writev_all(fd: int, pieces: list[bytes], offset: int) -> None:
    views = [memoryview(piece) for piece in pieces if piece]
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + 1024], offset)  # IOV_MAX: 1024
        offset += written
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]
