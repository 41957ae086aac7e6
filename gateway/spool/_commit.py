"""Group commit: concurrent submissions share the directory fsync, and one worker thread.

Every message answered 250 is on disk and fsynced first. A single committer task takes every
message waiting when it becomes free, commits them as one batch in a worker thread
(:meth:`SpoolFiles.commit_batch`), and only then releases all their replies. While one batch is
being fsynced the next one gathers, so under load a batch holds what arrived within one
commit's time, and at rest a lone message is committed at once. The log lines for a batch are
written afterwards, in a worker thread, so no reply waits for logging I/O.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..logs import get_logger
from ._files import Record, SpoolFiles
from ._incoming import IncomingMessage

log = get_logger(__name__)

_Waiting = tuple[Record, IncomingMessage, "asyncio.Future[None]"]


class GroupCommitter:
    """``await commit(record, incoming)`` returns once the message is durable, or raises
    the OSError that kept it from being stored."""

    def __init__(self, files: SpoolFiles, on_batch: Callable[[int], None] | None = None) -> None:
        self.files = files
        self.on_batch = on_batch  # told each batch's size (tests and benches)
        self._waiting: list[_Waiting] = []
        self._runner: asyncio.Task[None] | None = None

    async def commit(self, record: Record, incoming: IncomingMessage) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((record, incoming, done))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="spool-committer")
        await asyncio.shield(done)  # a client that leaves does not stop the commit

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                try:
                    results = await asyncio.to_thread(
                        self.files.commit_batch, [(r, i) for r, i, _ in batch]
                    )
                except Exception as error:  # a bug: no reply may claim the message is safe
                    results = [OSError(f"commit failed: {error!r}")] * len(batch)
                for (_, _, done), error in zip(batch, results, strict=True):
                    if done.done():
                        continue
                    if error is None:
                        done.set_result(None)
                    else:
                        done.set_exception(error)
                # Not awaited: the next batch need not wait for the log either.
                asyncio.get_running_loop().run_in_executor(None, _log_batch, batch, results)
        finally:
            self._runner = None


def _log_batch(batch: list[_Waiting], results: list[OSError | None]) -> None:
    for (record, _, _), error in zip(batch, results, strict=True):
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
