"""``gateway queue``: list, retry and delete spooled messages, with or without a running gateway.

The commands edit the spool's files directly (atomically, as the worker does); a running
worker takes the disk's word for every message not in flight at its next rescan (30 s), so a
retry or delete takes effect then without any connection to the gateway process.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from ._files import SpoolFiles
from ._spool import retry_files
from ._types import held_hint


def _when(epoch: float) -> str:
    if epoch <= 0:
        return "now"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def queue_main(
    spool_dir: Path, action: str, queue_id: str | None = None, out: TextIO = sys.stdout
) -> int:
    """Run one queue command; the exit status (0 done, 1 nothing matched, 2 misuse).

    Actions: ``list``; ``retry`` [id] (all when no id); ``delete`` id; ``release`` account
    (its held mail, after ``gateway connect`` reconnected it from another process). A message
    of an account its provider paused (429 with Retry-After) waits for the pause's end even
    after ``retry``: the provider would refuse it before then.
    """
    files = SpoolFiles(spool_dir)
    if not files.queue.is_dir():
        print(f"no spool at {spool_dir} (the gateway has not run with this state_dir)", file=out)
        return 1 if action != "list" else 0
    if action == "list":
        records = files.records()
        pauses = files.load_pauses(time.time())
        if not records:
            print("the queue is empty", file=out)
        for record in records:
            env = record.envelope
            paused = pauses.get(env.account) if record.state != "dead" else None
            due = max(record.next_attempt, paused or 0.0)
            print(
                f"{record.id}  {record.state:<6}  {env.account}  from <{env.mail_from}>  "
                f"{len(env.rcpt_tos)} rcpt  {record.size} B  attempts {record.attempts}  "
                f"next {_when(due) if record.state != 'dead' else '-'}",
                file=out,
            )
            print(f"    {record.message_id}", file=out)
            if paused:
                print(f"    paused by the provider until {_when(paused)}", file=out)
            if record.reason:
                print(f"    reason: {record.reason}", file=out)
            if record.state == "held":
                print(f"    {held_hint(env.account)}", file=out)
        return 0
    if action == "retry":
        changed = retry_files(files, queue_id)
        print(f"{changed} message(s) will be retried", file=out)
        return 0 if changed else 1
    if action == "release":  # ``queue_id`` is an account name here
        changed = retry_files(files, None, held_for=queue_id)
        print(f"{changed} held message(s) of {queue_id} released", file=out)
        return 0
    if action == "delete":
        doomed = files.load(queue_id) if queue_id else None
        if doomed is None:
            print(f"no message {queue_id!r} in the queue", file=out)
            return 1
        files.remove(doomed.id)
        files.log_delivery(doomed, "deleted", "deleted with gateway queue delete")
        print(f"deleted {doomed.id}", file=out)
        return 0
    print(f"unknown queue action {action!r}: use list, retry, delete or release", file=out)
    return 2
