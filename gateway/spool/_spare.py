"""Files the spool is done with, kept empty for reuse instead of deleted and created anew.

The spool writes one new file per message (its head holds the first state, ``_prefix``), one
more at every state change, and deletes them when the message is delivered. On ext4 without a
journal, which is what this project's test machine runs, every file creation skips, one by one,
the free inodes of its block group that were freed recently (fs/ext4/ialloc.c,
``find_inode_bit`` and ``recently_deleted``: freed within 5 s, or 300 s while their inode table
block is dirty, so that a crash cannot hand out an inode whose deletion never reached the disk).
A spool that deletes hundreds of files a second makes its own creations slower and slower:
``perf`` put 36 % of the gateway's CPU in an 800-message burst in that scan, 0.44 ms per created
file (issue 13; bench/README.md). A file renamed into ``spare/`` and emptied frees no inode, and
the next file the spool needs is a spare renamed into place. Where creating is cheap this costs
a little more (two renames and a truncate instead of a create and an unlink, tens of
microseconds); at most ``LIMIT`` spares are kept, the rest are deleted as before.

A spare is only ever a whole file nobody needs any more: a delivered message's files (its
message file first, so it no longer exists), a replaced state file, a refused message.
Several processes may share the directory (``gateway queue`` beside a running gateway): each
takes a spare by renaming it, so a spare another took first is simply not there, and a new
file is created instead.
"""

from __future__ import annotations

import collections
import os
import secrets
import threading
from pathlib import Path

LIMIT = 4096

_pools: dict[Path, SpareFiles] = {}
_pools_lock = threading.Lock()


def spare_files(tmp: Path) -> SpareFiles:
    """The spares of the spool whose temporary directory is ``tmp`` (``spare/`` beside it),
    one pool per directory in the process; its first use adopts a previous run's spares."""
    with _pools_lock:
        pool = _pools.get(tmp)
        if pool is None:
            pool = _pools[tmp] = SpareFiles(tmp.with_name("spare"))
    return pool


class SpareFiles:
    """Empty files in one directory, taken by :meth:`create` and given by :meth:`give` and
    :meth:`replace`; safe to call from several threads (the spool's worker threads)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._names: collections.deque[str] = collections.deque()
        self._adopted = False
        self._lock = threading.Lock()

    def _adopt(self) -> None:
        """Make the directory, and take what a previous run left in it as spares (a crash
        may have left one unemptied: :meth:`create` empties what it takes). Without the
        directory there are no spares, and files are created and deleted as usual."""
        with self._lock:
            if self._adopted:
                return
            self._adopted = True
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._names.extend(entry.name for entry in os.scandir(self.directory))
            except OSError:
                self._names.clear()

    def create(self, path: Path) -> int:
        """A descriptor open for writing on a new empty file at ``path`` (a fresh name in the
        same file system): a spare renamed there, or else a newly created file."""
        if not self._adopted:
            self._adopt()
        try:
            name = self._names.pop()
        except IndexError:
            name = None
        if name is not None:
            try:
                os.rename(self.directory / name, path)
            except OSError:
                pass  # another process took it: create one below
            else:
                return os.open(path, os.O_WRONLY | os.O_TRUNC)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def give(self, path: Path) -> None:
        """The file at ``path`` is not needed any more: it leaves its directory at once (as
        with an unlink, whose errors this raises), and is kept emptied, or deleted when there
        are enough spares."""
        spare = self._spare_name()
        if spare is not None:
            try:
                os.rename(path, spare)
            except OSError:
                spare = None
        if spare is None:
            path.unlink(missing_ok=True)
            return
        self._keep(spare)

    def replace(self, source: Path, target: Path) -> None:
        """``os.replace(source, target)``, keeping ``target``'s previous file as a spare."""
        spare = self._spare_name()
        if spare is not None:
            try:
                os.link(target, spare)
            except OSError:  # no previous file, or no links on this file system
                spare = None
        try:
            os.replace(source, target)
        except BaseException:
            if spare is not None:
                spare.unlink(missing_ok=True)  # still the live file's second name
            raise
        if spare is not None:
            self._keep(spare)

    def _spare_name(self) -> Path | None:
        """A new name for a spare, or None when there are enough of them."""
        if not self._adopted:
            self._adopt()
        if len(self._names) >= LIMIT:
            return None
        return self.directory / secrets.token_hex(8)

    def _keep(self, spare: Path) -> None:
        try:
            os.truncate(spare, 0)
        except OSError:
            spare.unlink(missing_ok=True)
            return
        self._names.append(spare.name)
