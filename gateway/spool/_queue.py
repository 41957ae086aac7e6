"""``gateway queue``: list, retry, delete and release spooled messages, beside a running gateway
or not.

The commands change the spool's storage directly, as the worker does: the files of a
single-instance spool (atomically), or the database rows of a shared one. A running worker
takes the storage's word for every message not in flight at its next rescan (30 s), so a retry
or delete takes effect then without any connection to the gateway process.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TextIO

from ._files import Record
from ._store import SpoolStore
from ._types import held_hint


def _when(epoch: float) -> str:
    if epoch <= 0:
        return "now"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def queue_main(store: SpoolStore, action: str, target: str | None, out: TextIO) -> int:
    """Run one queue command; the exit status (0 done, 1 nothing matched, 2 misuse).

    Actions: ``list``; ``retry`` [id] (all when no id); ``delete`` id; ``release`` account
    (its held mail, after ``gateway connect`` reconnected it from another process). A message
    of an account its provider paused (429 with Retry-After) waits for the pause's end even
    after ``retry``: the provider would refuse it before then.
    """
    if action == "list":
        await _list(store, out)
        return 0
    if action == "retry":
        changed = await store.retry(target)
        print(f"{changed} message(s) will be retried", file=out)
        return 0 if changed else 1
    if action == "release":  # ``target`` is an account name here
        changed = await store.retry(None, held_for=target)
        print(f"{changed} held message(s) of {target} released", file=out)
        return 0
    if action == "delete":
        doomed = await store.load(target) if target else None
        if doomed is None:
            print(f"no message {target!r} in the queue", file=out)
            return 1
        await store.forget_batch([(doomed, "deleted", "deleted with gateway queue delete")])
        print(f"deleted {doomed.id}", file=out)
        return 0
    print(f"unknown queue action {action!r}: use list, retry, delete or release", file=out)
    return 2


async def _list(store: SpoolStore, out: TextIO) -> None:
    records = await store.records()
    pauses = await store.load_pauses(time.time())
    if not records:
        print("the queue is empty", file=out)
    for record in records:
        _print_record(record, pauses, out)


def _print_record(record: Record, pauses: dict[str, float], out: TextIO) -> None:
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
