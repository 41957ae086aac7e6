"""CPU per message of the file spool alone, in steady state: submit and deliver, round after
round, in one directory (issue 13's spare files).

    .venv/bin/python bench/spool_cpu.py [--rounds 8] [--messages 500] [--dir /var/tmp]
                                        [--no-spares]

A ``FileSpool`` in a new directory under ``--dir`` with a sender that answers at once; each
round submits ``--messages`` 10 KB messages (16 at a time) and waits until all are delivered,
and the line shows the process's CPU per message of each round. ``--no-spares`` keeps no spare
files (``gateway.spool._spare.LIMIT = 0``): files are created and deleted as before them, for
alternating runs.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.config import AccountSettings
from gateway.delivery import DeliveryResult, Envelope
from gateway.passwords import hash_password
from gateway.spool import FileSpool, _spare

BODY = b"From: crm@example.com\r\nTo: b@example.org\r\nSubject: x\r\n\r\n" + b"x" * 10_000 + b"\r\n"


class InstantSender:
    """Delivers every message at once (the spool's own work is what is measured)."""

    def concurrency(self, account: AccountSettings) -> int:
        return 16

    async def send(
        self, account: AccountSettings, envelope: Envelope, raw: bytes
    ) -> DeliveryResult:
        return DeliveryResult("ok")

    async def already_sent(self, account: AccountSettings, message_id: str) -> bool | None:
        return False


async def main(args: argparse.Namespace) -> None:
    if args.no_spares:
        _spare.LIMIT = 0
    directory = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
    account = AccountSettings(
        username="crm", password_hash=hash_password("x" * 12), provider="microsoft",
        address="crm@example.com",
    )  # fmt: skip
    spool = FileSpool(
        directory / "spool", [account], {"microsoft": InstantSender()},  # type: ignore[dict-item]
        intake_quiet=0.0, max_defer=0.0,
    )  # fmt: skip
    envelope = Envelope("crm", "crm@example.com", ("b@example.org",), False, datetime.now(UTC), "")
    await spool.start()
    slots = asyncio.Semaphore(16)

    async def submit() -> None:
        async with slots:
            await spool.submit(envelope, BODY)

    per_message = []
    try:
        for _ in range(args.rounds):
            start = time.process_time()
            await asyncio.gather(*(submit() for _ in range(args.messages)))
            while spool.messages():  # noqa: ASYNC110 (the spool announces no "all delivered")
                await asyncio.sleep(0.005)
            per_message.append((time.process_time() - start) / args.messages * 1000)
    finally:
        await spool.stop()
        shutil.rmtree(directory, ignore_errors=True)
    spares = "no spares" if args.no_spares else f"up to {_spare.LIMIT} spares"
    rounds = " ".join(f"{ms:.2f}" for ms in per_message)
    print(f"{spares}, {args.dir}: ms of CPU per message (submit + deliver) by round: {rounds}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where its directory goes")
    parser.add_argument("--no-spares", action="store_true")
    asyncio.run(main(parser.parse_args()))
