"""Group commit: concurrent spool writes share their fsyncs, and one worker thread.

Every message answered 250 is on disk and fsynced first. A :class:`Batched` operation runs one
task that takes every request waiting when it becomes free, does them as one batch in a worker
thread, and only then answers them all. While one batch is being fsynced the next one gathers,
so under load a batch holds what arrived within one batch's time, and at rest a lone request
goes at once. Three operations are batched this way (issue 13: each cost its own fsyncs and
thread hop per message, and the spool's threads spent their time in fsync):

* new messages (the store's ``commit_batch``): one directory fsync (or one database commit)
  per batch; the log lines are written afterwards, in a worker thread, so no reply waits for
  logging I/O;
* state changes before and after an attempt (``mark_batch``, ``save_batch``), and claims;
* messages done with (``forget_batch``): one directory fsync, and the delivery log's lines
  appended with one fsync (or one transaction).

The operations are the spool store's (``_store``): the file store runs its blocking work in a
worker thread, the database store on its connection pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ..logs import get_logger
from ._files import Record
from ._incoming import IncomingMessage

log = get_logger(__name__)

Item = TypeVar("Item")
CommitBatch = Callable[[list[tuple[Record, IncomingMessage]]], Awaitable[list[Exception | None]]]
Result = TypeVar("Result")


class Batched(Generic[Item, Result]):
    """``await run(item)``: ``operation`` (one result per item) runs on batches of the items
    that came while the previous batch ran. An exception of ``operation`` reaches every caller
    of its batch."""

    def __init__(
        self,
        operation: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        name: str,
        after: Callable[[list[Item], Sequence[Result]], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.operation = operation
        self.name = name
        self.after = after  # run in a worker thread after each batch, not awaited
        self.on_batch = on_batch  # told each batch's size (tests and benches)
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._runner: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Items that came while a batch ran: the next batch takes them all."""
        return len(self._waiting)

    async def run(self, item: Item) -> Result:
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name=self.name)
        return await asyncio.shield(done)  # a caller that leaves does not stop the batch

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                items = [item for item, _ in batch]
                try:
                    results = await self.operation(items)
                except Exception as error:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(error)
                    continue
                for (_, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(result)
                if self.after is not None:  # not awaited: the next batch need not wait
                    asyncio.get_running_loop().run_in_executor(None, self.after, items, results)
        finally:
            self._runner = None


class GroupCommitter:
    """``await commit(record, incoming)`` returns once the message is durable, or raises
    the error (OSError, SpoolError) that kept it from being stored."""

    def __init__(self, commit: CommitBatch, on_batch: Callable[[int], None] | None = None) -> None:
        self._batched: Batched[tuple[Record, IncomingMessage], Exception | None] = Batched(
            _commit_or_fail(commit), "spool-committer", after=_log_batch, on_batch=on_batch
        )

    @property
    def waiting(self) -> int:
        """Messages waiting for the next batch (see :attr:`Batched.waiting`)."""
        return self._batched.waiting

    async def commit(self, record: Record, incoming: IncomingMessage) -> None:
        error = await self._batched.run((record, incoming))
        if error is not None:
            raise error


def _commit_or_fail(commit: CommitBatch) -> CommitBatch:
    async def commit_all(batch: list[tuple[Record, IncomingMessage]]) -> list[Exception | None]:
        try:
            return await commit(batch)
        except Exception as error:  # a bug: no reply may claim the message is safe
            return [OSError(f"commit failed: {error!r}")] * len(batch)

    return commit_all


def _log_batch(
    batch: list[tuple[Record, IncomingMessage]], results: Sequence[Exception | None]
) -> None:
    for (record, _), error in zip(batch, results, strict=True):
        if error is None:
            env = record.envelope
            log.info(
                "spool.queued",
                queue_id=record.id,
                account=env.account,
                recipients=len(env.rcpt_tos),
                size=record.size,
                client=env.client,
            )
        else:
            log.error("spool.submit_failed", queue_id=record.id, error=str(error))
