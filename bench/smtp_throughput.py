"""SMTP → gateway → sandbox Graph: submission throughput, latency and end-to-end delivery time,
against a bare aiosmtpd sink measured in the same run with the same clients and messages.

    .venv/bin/python bench/smtp_throughput.py [--messages 800] [--clients 16] [--size 10240]

Layout: the sandbox (HTTPS Graph + sign-in) runs in this process on its event loop; the client
threads (smtplib) run here too; the gateway runs as a child ``python -m gateway run -c CFG``
(app-only Microsoft account, so nobody has to consent); the sink is a child
``bench/_sink.py``. Each client opens one connection, EHLO + AUTH PLAIN once, then sends
messages taken from a shared queue (MAIL/RCPT/DATA per message) until the queue is empty.
Everything is on 127.0.0.1; the run is bounded by --messages and --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c


def build_message(index: int, size: int, run_id: str) -> bytes:
    head = (
        f"From: CRM <{c.SENDER}>\r\nTo: Ann <{c.RECIPIENT}>\r\n"
        f"Subject: bench {index}\r\nMessage-ID: <bench-{run_id}-{index}@bench.invalid>\r\n"
        f"Date: Sun, 29 Nov 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, message body line padding.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


@dataclass
class Round:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connect_auth: list[float] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    server_cpu: float = 0.0  # CPU seconds of the server's process during submission
    bench_cpu: float = 0.0  # CPU seconds of this process (clients, sandbox) during submission

    @property
    def wall(self) -> float:
        return self.finished - self.started


def _client(
    port: int,
    work: queue.Queue,
    messages: list[bytes],
    result: Round,
    lock: threading.Lock,
    timeout: float,
    barrier: threading.Barrier,
) -> None:
    smtp, ready = None, False
    try:
        begin = time.perf_counter()
        smtp = smtplib.SMTP(c.HOST, port, local_hostname="bench.local", timeout=timeout)
        smtp.ehlo()
        smtp.login(c.USERNAME, c.PASSWORD)
        ready = True
        with lock:
            result.connect_auth.append(time.perf_counter() - begin)
    except (OSError, smtplib.SMTPException) as error:
        with lock:
            result.errors.append(f"connect/auth: {error!r}")
    finally:
        # Every client is connected and authenticated before the clock starts.
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout)
    if not ready:
        if smtp is not None:
            smtp.close()
        return
    try:
        while True:
            try:
                index = work.get_nowait()
            except queue.Empty:
                break
            start = time.perf_counter()
            try:
                smtp.sendmail(c.SENDER, [c.RECIPIENT], messages[index])
            except (OSError, smtplib.SMTPException) as error:
                with lock:
                    result.errors.append(f"message {index}: {error!r}")
                if isinstance(error, (OSError, smtplib.SMTPServerDisconnected)):
                    return
                continue
            elapsed = time.perf_counter() - start
            with lock:
                result.latencies.append(elapsed)
    finally:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.quit()


async def run_clients(
    name: str, port: int, messages: list[bytes], clients: int, timeout: float, server_pid: int
) -> Round:
    """Submit every message with ``clients`` threads; the loop keeps serving meanwhile."""
    result = Round(name)
    cpu_before = [0.0, 0.0]
    work: queue.Queue = queue.Queue()
    for index in range(len(messages)):
        work.put(index)
    lock = threading.Lock()
    loop = asyncio.get_running_loop()

    def go() -> None:
        cpu_before[:] = c.cpu_seconds(server_pid), c.cpu_seconds(os.getpid())
        result.started = time.perf_counter()

    barrier = threading.Barrier(clients, action=go)
    with ThreadPoolExecutor(clients) as pool:
        futures = [
            loop.run_in_executor(
                pool, _client, port, work, messages, result, lock, timeout, barrier
            )
            for _ in range(clients)
        ]
        await asyncio.gather(*futures)
        result.finished = time.perf_counter()
    result.server_cpu = c.cpu_seconds(server_pid) - cpu_before[0]
    result.bench_cpu = c.cpu_seconds(os.getpid()) - cpu_before[1]
    return result


async def sink_round(messages: list[bytes], args: argparse.Namespace) -> Round:
    port = c.free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(c.BENCH / "_sink.py"),
        "--port",
        str(port),
        env=c.child_env(),
    )
    try:
        await c.wait_for_banner(port, process, 30)
        return await run_clients(
            "aiosmtpd sink", port, messages, args.clients, args.timeout, process.pid
        )
    finally:
        await c.stop_child(process)


async def gateway_round(
    messages: list[bytes], args: argparse.Namespace, work_dir: Path, sandbox, app, user
) -> tuple[Round, float | None, int, int, Path]:
    port = c.free_port()
    config = c.write_yaml(
        work_dir / "gateway.yaml", c.gateway_config(sandbox, app, work_dir / "state", port)
    )
    log_path = work_dir / "gateway.log"
    ops = sandbox.ops(user)
    with open(log_path, "wb") as log_file:
        process = await c.start_gateway(config, log_file)
        try:
            await c.wait_for_banner(port, process, 60)
            before = len(ops.sent(user))
            result = await run_clients(
                "gateway → Graph", port, messages, args.clients, args.timeout, process.pid
            )
            # End to end: from the first submission until every accepted message is in Sent.
            expected = before + len(result.latencies)
            tail_start = time.perf_counter()
            tail_cpu = c.cpu_seconds(process.pid), c.cpu_seconds(os.getpid())
            deadline = time.perf_counter() + args.timeout
            delivered_at = None
            while time.perf_counter() < deadline:
                if len(ops.sent(user)) >= expected:
                    delivered_at = time.perf_counter()
                    break
                await asyncio.sleep(0.02)
            tail = (
                time.perf_counter() - tail_start,
                c.cpu_seconds(process.pid) - tail_cpu[0],
                c.cpu_seconds(os.getpid()) - tail_cpu[1],
            )
            await asyncio.sleep(0.5)  # let stragglers (duplicates, if any) show up
            sent = ops.sent(user)[before:]
            ids = [m.raw.split(b"Message-ID: <", 1)[-1].split(b">", 1)[0] for m in sent]
            duplicates = len(ids) - len(set(ids))
        finally:
            await c.stop_child(process)
    end_to_end = None if delivered_at is None else delivered_at - result.started
    return result, end_to_end, len(sent), duplicates, log_path, tail


def row(name: str, r: Round, n: int) -> str:
    ok = len(r.latencies)
    if not ok:
        return f"{name:<18} {'-':>8} {'-':>9} {'-':>8} {'-':>8} {'-':>8} {len(r.errors):>6}"
    ms = [v * 1000 for v in r.latencies]
    return (
        f"{name:<18} {ok:>5}/{n:<4} {ok / r.wall:>8.1f} {c.percentile(ms, 0.5):>8.1f} "
        f"{c.percentile(ms, 0.95):>8.1f} {c.percentile(ms, 0.99):>8.1f} {len(r.errors):>6}"
    )


async def main(args: argparse.Namespace) -> int:
    run_id = f"{int(time.time())}"
    messages = [build_message(i, args.size, run_id) for i in range(args.messages)]
    tmp = tempfile.mkdtemp(prefix="bench-smtp-")
    work_dir = Path(tmp)
    sandbox, app, user = await c.start_sandbox(work_dir / "sandbox")
    try:
        sink = await sink_round(messages, args)
        gateway, end_to_end, delivered, duplicates, log_path, tail = await gateway_round(
            messages, args, work_dir, sandbox, app, user
        )
        log_text = log_path.read_text(errors="replace")
    finally:
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    n = args.messages
    print(
        f"\nSMTP throughput: {n} messages of {len(messages[0])} bytes, {args.clients} clients, "
        f"one connection + AUTH PLAIN each, loopback, plain SMTP (no TLS)"
    )
    print(
        f"{'':<18} {'accepted':>10} {'msg/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6}"
    )
    print(row("aiosmtpd sink", sink, n))
    print(row("gateway (spool)", gateway, n))
    ca = [v * 1000 for v in gateway.connect_auth] or [0]
    ca_sink = [v * 1000 for v in sink.connect_auth] or [0]
    print(
        f"connect+EHLO+AUTH, before the clock starts (slowest of {args.clients}): gateway "
        f"{max(ca):.0f} ms, sink {max(ca_sink):.0f} ms"
    )
    if gateway.latencies and sink.latencies:
        g_rate, s_rate = len(gateway.latencies) / gateway.wall, len(sink.latencies) / sink.wall
        g50, s50 = c.percentile(gateway.latencies, 0.5), c.percentile(sink.latencies, 0.5)
        g99, s99 = c.percentile(gateway.latencies, 0.99), c.percentile(sink.latencies, 0.99)
        print(
            f"ratio gateway/sink: throughput {g_rate / s_rate:.3f}x, "
            f"p50 latency {g50 / s50:.1f}x, p99 latency {g99 / s99:.1f}x"
        )
    for label, r in (("sink", sink), ("gateway", gateway)):
        print(
            f"CPU during submission ({r.wall:.2f} s wall): {label} process {r.server_cpu:.2f} s, "
            f"benchmark process (clients + sandbox) {r.bench_cpu:.2f} s"
        )
    if end_to_end is None:
        print(
            f"end-to-end: NOT all delivered within {args.timeout:.0f}s "
            f"({delivered}/{len(gateway.latencies)} in Sent)"
        )
    else:
        print(
            f"end-to-end (first submission → all {delivered} in sandbox Sent): "
            f"{end_to_end:.2f} s = {delivered / end_to_end:.1f} msg/s delivered "
            f"(submission alone took {gateway.wall:.2f} s)"
        )
    print(
        f"CPU from the last 250 until all delivered ({tail[0]:.2f} s wall): gateway process "
        f"{tail[1]:.2f} s, benchmark process (sandbox) {tail[2]:.2f} s"
    )
    print(f"duplicates in Sent: {duplicates}")
    if args.keep:
        print(f"work directory kept: {tmp}")
    for label, r in (("sink", sink), ("gateway", gateway)):
        for error in r.errors[:5]:
            print(f"  {label} error: {error}")
    problems = [
        line
        for line in log_text.splitlines()
        if '"level": "error"' in line or '"level": "warning"' in line or "Traceback" in line
    ]
    retries = log_text.count("spool.retry")
    print(f"gateway log: {retries} spool.retry, {len(problems)} warning/error lines")
    for line in problems[:5]:
        print(f"  {line[:300]}")
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=800)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=10 * 1024, help="bytes per message")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds: socket timeout, and the limit for delivery to finish",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (gateway log, spool)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    c.run(main, _arguments())
