"""Group commit: concurrent spool writes share their fsyncs, and one worker thread.

Every message answered 250 is on disk and fsynced first. A :class:`Batched` operation runs one
task that takes every request waiting when it becomes free, does them as one batch in a worker
thread, and only then answers them all. While one batch is being fsynced the next one gathers,
so under load a batch holds what arrived within one batch's time, and at rest a lone request
goes at once. Three operations are batched this way (issue 13: each cost its own fsyncs and
thread hop per message, and the spool's threads spent their time in fsync):

* new messages (:meth:`SpoolFiles.commit_batch`): one directory fsync per batch; the log lines
  are written afterwards, in a worker thread, so no reply waits for logging I/O;
* state changes before an attempt (:meth:`SpoolFiles.save_batch`): one directory fsync;
* messages done with (:meth:`SpoolFiles.forget_batch`): one directory fsync, and the delivery
  log's lines appended with one fsync.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ..logs import get_logger
from ._files import Record, SpoolFiles
from ._incoming import IncomingMessage

log = get_logger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batched(Generic[Item, Result]):
    """``await run(item)``: ``operation`` (blocking, one result per item) runs on batches of
    the items that came while the previous batch ran. An exception of ``operation`` reaches
    every caller of its batch."""

    def __init__(
        self,
        operation: Callable[[list[Item]], Sequence[Result]],
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
                    results = await asyncio.to_thread(self.operation, items)
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
    the OSError that kept it from being stored."""

    def __init__(self, files: SpoolFiles, on_batch: Callable[[int], None] | None = None) -> None:
        self._batched: Batched[tuple[Record, IncomingMessage], OSError | None] = Batched(
            _commit_or_fail(files), "spool-committer", after=_log_batch, on_batch=on_batch
        )

    @property
    def waiting(self) -> int:
        """Messages waiting for the next batch (see :attr:`Batched.waiting`)."""
        return self._batched.waiting

    async def commit(self, record: Record, incoming: IncomingMessage) -> None:
        error = await self._batched.run((record, incoming))
        if error is not None:
            raise error


def _commit_or_fail(
    files: SpoolFiles,
) -> Callable[[list[tuple[Record, IncomingMessage]]], list[OSError | None]]:
    def commit(batch: list[tuple[Record, IncomingMessage]]) -> list[OSError | None]:
        try:
            return files.commit_batch(batch)
        except Exception as error:  # a bug: no reply may claim the message is safe
            return [OSError(f"commit failed: {error!r}")] * len(batch)

    return commit


def _log_batch(
    batch: list[tuple[Record, IncomingMessage]], results: Sequence[OSError | None]
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
