"""Issue 10 point 4: a burst of mail into one mailbox that the provider limits per period.

    .venv/bin/python bench/throttle_burst.py [--messages 8000] [--limit 10000] [--period 600]
                                             [--time-scale 1] [--clients 16] [--timeout 900]

The sandbox's Graph allows the mailbox ``--limit`` requests per ``--period`` seconds (Outlook's
"10,000 API requests in a 10 minute period" per app per mailbox by default), divided by
``--time-scale`` to shorten the period, and answers the rest 429 ``ApplicationThrottled`` with
a Retry-After. The gateway (a child ``python -m gateway run``, app-only Microsoft account) takes
the burst through SMTP from ``--clients`` connections (the clients of smtp_throughput.py) and
delivers it. Printed: messages delivered, duplicates in Sent, requests the mailbox got,
requests answered 429, requests that arrived while a Retry-After was running (beyond the up to
3 already on the wire at each 429), the time until all were delivered, and how many stayed
queued. Everything is on 127.0.0.1; the run is bounded by --messages and --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
from smtp_throughput import build_message, run_clients


async def main(args: argparse.Namespace) -> int:
    run_id = f"{int(time.time())}"
    messages = [build_message(i, args.size, run_id) for i in range(args.messages)]
    work_dir = Path(tempfile.mkdtemp(prefix="bench-throttle-"))
    sandbox, app, user = await c.start_sandbox(work_dir / "sandbox")
    period = args.period / args.time_scale
    sandbox.throttle.configure("microsoft", args.limit, period)
    port = c.free_port()
    config = c.write_yaml(
        work_dir / "gateway.yaml", c.gateway_config(sandbox, app, work_dir / "state", port)
    )
    log_path = work_dir / "gateway.log"
    ops = sandbox.ops(user)
    try:
        with open(log_path, "wb") as log_file:
            process = await c.start_gateway(config, log_file)
            try:
                await c.wait_for_banner(port, process, 60)
                submitted = await run_clients(
                    "gateway → Graph", port, messages, args.clients, args.timeout, process.pid
                )
                accepted = len(submitted.latencies)
                deadline = time.perf_counter() + args.timeout
                delivered_at = None
                while time.perf_counter() < deadline:
                    if len(ops.sent(user)) >= accepted:
                        delivered_at = time.perf_counter()
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)  # stragglers (duplicates, if any) show up now
                sent = ops.sent(user)
                counts = sandbox.throttle.stats().get(c.SENDER.casefold(), {})
            finally:
                await c.stop_child(process)
        log_text = log_path.read_text(errors="replace")
    finally:
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)

    ids = [m.raw.split(b"Message-ID: <", 1)[-1].split(b">", 1)[0] for m in sent]
    print(
        f"\nThrottled burst: {args.messages} messages of {len(messages[0])} bytes, "
        f"{args.clients} SMTP clients; Graph limit {args.limit} requests per "
        f"{period:g} s per app per mailbox ({args.period:g} s / time scale {args.time_scale:g})"
    )
    print(f"accepted (250): {accepted}, refused: {len(submitted.errors)}")
    print(f"delivered (unique in Sent): {len(set(ids))}, duplicates: {len(ids) - len(set(ids))}")
    print(
        f"provider requests to the mailbox: {counts.get('requests', 0)} "
        f"({counts.get('requests', 0) / max(1, accepted):.3f} per message), answered 429: "
        f"{counts.get('throttled', 0)}"
    )
    print(
        f"requests during pauses (after a 429, before its Retry-After): "
        f"{counts.get('during_pause', 0)} (+ {counts.get('in_flight_at_pause', 0)} already "
        "on the wire when a 429 came)"
    )
    if delivered_at is None:
        print(f"NOT all delivered within {args.timeout:.0f} s: {accepted - len(set(ids))} queued")
    else:
        total = delivered_at - submitted.started
        print(
            f"time: first submission → all delivered {total:.1f} s "
            f"(submission {submitted.wall:.1f} s); still queued: 0"
        )
    print(
        f"gateway log: {log_text.count('spool.paused')} spool.paused, "
        f"{log_text.count('spool.retry')} spool.retry, {log_text.count('spool.dead')} spool.dead"
    )
    if args.keep:
        print(f"work directory kept: {work_dir}")
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--limit", type=int, default=10_000, help="requests per period")
    parser.add_argument("--period", type=float, default=600.0, help="seconds, before scaling")
    parser.add_argument("--time-scale", type=float, default=1.0, help="divides the period")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048, help="bytes per message")
    parser.add_argument("--timeout", type=float, default=900, help="seconds, per phase")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args()


if __name__ == "__main__":
    c.run(main, _arguments())
