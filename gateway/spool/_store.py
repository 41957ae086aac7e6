"""Where the spool keeps its messages: the persistence seam under the one delivery worker.

The worker (``_spool.SpoolWorker``) decides what to send when; a :class:`SpoolStore` keeps
the messages, their delivery state, the providers' pauses and the delivery log. Two exist:

* :class:`FileStore`, the single-instance spool: files in ``<state_dir>/spool`` (``_files``);
* ``_database.DatabaseStore``: rows in the shared database, so that any of several instances
  may deliver any message (issue 16). Only it has real *claims*: an instance leases a message
  before it tries it, and a message another instance holds is not tried here.

Every method may fail with :class:`~._types.SpoolError` (or ``OSError`` for files) when the
storage cannot be used; the worker keeps what it knows in memory and tries again later.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from ._files import Record, SpoolFiles, retry_files
from ._incoming import IncomingMessage

Claim = tuple[bool, Record | None]  # (claimed for this instance, the record as stored or None)
Arrivals = Callable[[list[Record] | None], None]  # None: notices may be lost, rescan
PausesSeen = Callable[[dict[str, float]], None]


class SpoolStore(Protocol):
    """What the delivery worker does with its storage (see the module docstring)."""

    tmp: Path  # where messages being received are written before their commit

    def prepare(self) -> None:
        """Create what is missing and drop the debris of interrupted submissions."""

    async def start(self, arrivals: Arrivals, pauses: PausesSeen) -> None:
        """Begin telling the worker about messages and pauses other instances stored."""

    async def stop(self) -> None: ...

    async def commit_batch(
        self, batch: list[tuple[Record, IncomingMessage]]
    ) -> list[Exception | None]:
        """Store new messages durably (one commit for the batch); per message, why not."""

    async def claim_batch(self, records: list[Record]) -> list[Claim]:
        """Take the messages for this instance's attempt; per message, whether it was taken
        and its stored state (None: gone). A message another instance is trying, or that is
        no longer due, is not taken."""

    async def release_claim(self, record: Record) -> None:
        """The attempt ended without a state change (paused, gone): give the message back."""

    async def mark_batch(self, records: list[Record]) -> list[bool]:
        """An attempt begins (``attempt_started``, ``attempts``): saved, the claim kept; per
        record, False if it is gone or no longer ours, and then it must not be sent."""

    async def save_batch(self, records: list[Record]) -> list[bool]:
        """New states after an attempt (or a release): saved, claims given back; per record,
        False if it was deleted meanwhile (or another instance holds it)."""

    async def forget_batch(self, done: list[tuple[Record, str, str]]) -> list[None]:
        """Remove messages done with and log each (record, result, detail)."""

    async def log_delivery(self, record: Record, result: str, detail: str) -> None: ...

    def message(
        self, queue_id: str, mapped: bool
    ) -> AbstractAsyncContextManager[bytes | mmap.mmap]:
        """The message's bytes (mapped read-only when ``mapped`` and the store can);
        FileNotFoundError if it is gone."""

    async def records(self) -> list[Record]:
        """Every stored message, oldest first."""

    async def tidy(self) -> None:
        """Housekeeping the worker does before each rescan (the file spool compacts its
        segments, ``SpoolFiles.compact``); only the gateway's worker calls it."""

    async def load(self, queue_id: str) -> Record | None: ...

    async def load_pauses(self, now: float) -> dict[str, float]:
        """Accounts' pauses still lasting at ``now`` (epoch seconds until which they wait)."""

    async def save_pause(self, account: str, until: float, current: dict[str, float]) -> None:
        """``account`` waits until ``until``; ``current`` is every pause this instance knows."""

    async def retry(self, queue_id: str | None, held_for: str | None = None) -> int:
        """Make one message, an account's held mail or every message due now; how many."""

    async def recent_deliveries(self, limit: int) -> list[dict[str, Any]]:
        """The delivery log, newest first."""


class FileStore:
    """The single-instance spool's files (``_files.SpoolFiles``); claims always succeed, as
    one process owns the directory. Blocking file work runs in worker threads."""

    def __init__(self, directory: Path) -> None:
        self.files = SpoolFiles(directory)
        self.tmp = self.files.tmp

    def prepare(self) -> None:
        self.files.prepare()

    async def start(self, arrivals: Arrivals, pauses: PausesSeen) -> None:
        return None  # nobody else writes this directory but ``gateway queue`` (rescans)

    async def stop(self) -> None:
        return None

    async def commit_batch(
        self, batch: list[tuple[Record, IncomingMessage]]
    ) -> list[Exception | None]:
        return list(await asyncio.to_thread(self.files.commit_batch, batch))

    async def claim_batch(self, records: list[Record]) -> list[Claim]:
        return [(True, record) for record in records]

    async def release_claim(self, record: Record) -> None:
        return None

    async def mark_batch(self, records: list[Record]) -> list[bool]:
        return await asyncio.to_thread(self.files.save_batch, records)

    async def save_batch(self, records: list[Record]) -> list[bool]:
        return await asyncio.to_thread(self.files.save_batch, records)

    async def forget_batch(self, done: list[tuple[Record, str, str]]) -> list[None]:
        return await asyncio.to_thread(self.files.forget_batch, done)

    async def log_delivery(self, record: Record, result: str, detail: str) -> None:
        await asyncio.to_thread(self.files.log_delivery, record, result, detail)

    @contextlib.asynccontextmanager
    async def message(self, queue_id: str, mapped: bool) -> AsyncIterator[bytes | mmap.mmap]:
        """Mapped, the API senders stream their request bodies from the page cache, so a large
        message is never copied into the heap."""
        if not mapped:
            yield await asyncio.to_thread(self.files.read_message, queue_id)
            return
        mapping = await asyncio.to_thread(self.files.map_message, queue_id)
        try:
            yield mapping
        finally:
            if isinstance(mapping, mmap.mmap):
                with contextlib.suppress(BufferError):  # a view still alive: unmapped when freed
                    mapping.close()

    async def records(self) -> list[Record]:
        return await asyncio.to_thread(self.files.records)

    async def tidy(self) -> None:
        await asyncio.to_thread(self.files.compact)

    async def load(self, queue_id: str) -> Record | None:
        return await asyncio.to_thread(self.files.load, queue_id)

    async def load_pauses(self, now: float) -> dict[str, float]:
        return await asyncio.to_thread(self.files.load_pauses, now)

    async def save_pause(self, account: str, until: float, current: dict[str, float]) -> None:
        await asyncio.to_thread(self.files.save_pauses, current)

    async def retry(self, queue_id: str | None, held_for: str | None = None) -> int:
        return await asyncio.to_thread(retry_files, self.files, queue_id, held_for)

    async def recent_deliveries(self, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.files.recent_deliveries, limit)
