"""One ~30 MB message (a random attachment) through the gateway to the sandbox Graph (draft +
upload sessions + send): the gateway's peak RSS and its event loop's longest stall, against the
same message into a bare aiosmtpd sink measured in the same run.

    .venv/bin/python bench/large_message.py [--mb 30]

Layout: the sandbox runs in this process. The gateway runs in a child process started by
bench/_gateway_probe.py: the CLI's ``run`` start-up (reactor first) plus a probe task on the
gateway's own loop that sleeps 10 ms in a loop and records the largest lateness, and reads
/proc/self/status (VmRSS, VmHWM; VmHWM is reset through /proc/self/clear_refs before the
message, so the peak is the peak *while the message is processed*). The sink child
(bench/_sink.py --probe) carries the same probe. Loopback only; bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import smtplib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

IDLE = 1.0  # seconds of idle loop measured before the message, as the stall floor


def build_message(total: int, run_id: str) -> tuple[bytes, str]:
    """A multipart message of about ``total`` bytes; returns it and the attachment's sha256."""
    raw_size = (total - 4096) * 3 // 4 * 76 // 78  # base64 is 4/3, plus CRLF every 76
    payload = os.urandom(raw_size)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    head = (
        f"From: CRM <{c.SENDER}>\r\nTo: Ann <{c.RECIPIENT}>\r\nSubject: large {run_id}\r\n"
        f"Message-ID: <large-{run_id}@bench.invalid>\r\nDate: Sun, 29 Nov 2026 00:00:00 +0000\r\n"
        f'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b-{run_id}"\r\n\r\n'
        f"--b-{run_id}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"The scan is attached.\r\n\r\n"
        f'--b-{run_id}\r\nContent-Type: application/octet-stream; name="scan.bin"\r\n'
        f'Content-Disposition: attachment; filename="scan.bin"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = f"\r\n--b-{run_id}--\r\n".encode()
    return head + encoded + tail, hashlib.sha256(payload).hexdigest()


def submit(port: int, message: bytes, timeout: float) -> float:
    """AUTH and send; the seconds from MAIL FROM to the 250 after DATA."""
    with smtplib.SMTP(c.HOST, port, local_hostname="bench.local", timeout=timeout) as smtp:
        smtp.ehlo()
        smtp.login(c.USERNAME, c.PASSWORD)
        start = time.perf_counter()
        smtp.sendmail(c.SENDER, [c.RECIPIENT], message)
        return time.perf_counter() - start


async def measure(
    label: str,
    process: asyncio.subprocess.Process,
    port: int,
    message: bytes,
    args: argparse.Namespace,
    delivered=None,
) -> dict:
    probe = c.ProbeClient(process)
    await probe.ready(90)
    await c.wait_for_banner(port, process, 30)
    await probe.command("reset")
    await asyncio.sleep(IDLE)
    idle = await probe.command("report")
    baseline = await probe.command("reset")
    result = {"label": label, "idle": idle, "baseline": baseline}
    result["submit_s"] = await asyncio.to_thread(submit, port, message, args.timeout)
    result["after_250"] = await probe.command("report")
    # A second window for what follows the 250 (the spool's delivery worker, for the gateway).
    result["after_250_reset"] = await probe.command("reset")
    if delivered is not None:
        start = time.perf_counter()
        result["delivered_s"] = None
        while time.perf_counter() - start < args.timeout:
            if delivered(1):
                result["delivered_s"] = time.perf_counter() - start
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the worker finishes its bookkeeping
    result["final"] = await probe.command("report")
    # Successive messages (--count): RSS once each is delivered, to see whether it is given back.
    result["rss_after"] = [result["final"]["VmRSS"]]
    result["rss_parts"] = [(result["final"].get("RssAnon", 0), result["final"].get("RssFile", 0))]
    for number in range(2, args.count + 1 if delivered is not None else 0):
        await asyncio.to_thread(submit, port, message, args.timeout)
        await _poll(lambda n=number: delivered(n), args.timeout)
        await asyncio.sleep(0.5)
        report = await probe.command("report")
        result["rss_after"].append(report["VmRSS"])
        result["rss_parts"].append((report.get("RssAnon", 0), report.get("RssFile", 0)))
        result["max_stall_later_ms"] = max(
            result.get("max_stall_later_ms", 0.0), report["max_stall_ms"]
        )
    return result


async def _poll(done, limit: float) -> None:
    """Until ``done()`` (the sandbox's Sent list is only polled) or ``limit`` seconds."""
    deadline = time.perf_counter() + limit
    while not done() and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def sink_round(message: bytes, args: argparse.Namespace) -> dict:
    port = c.free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(c.BENCH / "_sink.py"),
        "--port",
        str(port),
        "--probe",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=c.child_env(),
    )
    try:
        return await measure("aiosmtpd sink", process, port, message, args)
    finally:
        await c.stop_child(process)


async def gateway_round(
    message: bytes, args: argparse.Namespace, work_dir: Path, sandbox, app, user
) -> tuple[dict, list, Path]:
    port = c.free_port()
    config = c.write_yaml(
        work_dir / "gateway.yaml", c.gateway_config(sandbox, app, work_dir / "state", port)
    )
    ops = sandbox.ops(user)
    before = len(ops.sent(user))
    log_path = work_dir / "gateway.log"
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(c.BENCH / "_gateway_probe.py"),
            str(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=c.child_env(),
            cwd=str(c.ROOT),
        )
        try:
            result = await measure(
                "gateway → Graph",
                process,
                port,
                message,
                args,
                delivered=lambda count: len(ops.sent(user)) >= before + count,
            )
        finally:
            await c.stop_child(process)
    return result, ops.sent(user)[before:], log_path


def check_delivery(sent: list, digest: str) -> str:
    import email
    from email import policy

    if len(sent) != 1:
        return f"{len(sent)} messages in Sent (expected 1)"
    parsed = email.message_from_bytes(sent[0].raw, policy=policy.default)
    for part in parsed.iter_attachments():
        content = part.get_payload(decode=True)
        if hashlib.sha256(content).hexdigest() == digest:
            return f"attachment intact ({len(content)} bytes, sha256 matches)"
        return f"attachment DIFFERS ({len(content)} bytes)"
    return "no attachment in the sent message"


def stall(r: dict) -> float:
    return max(r["after_250"]["max_stall_ms"], r["final"]["max_stall_ms"])


def report(results: list[dict], size: int) -> None:
    mib = 1024 * 1024
    print(
        f"\nLarge message: {size} bytes ({size / mib:.1f} MiB) on the wire, one SMTP client, "
        f"AUTH PLAIN, loopback, plain SMTP"
    )
    print(
        f"{'':<16} {'base RSS':>9} {'peak RSS':>9} {'delta':>8} {'delta/msg':>9} "
        f"{'250 after':>9} {'idle stall':>10} {'max stall':>10}"
    )
    deltas = {}
    for r in results:
        base = r["baseline"]["VmRSS"] / 1024
        peak = max(r["after_250"]["VmHWM"], r["final"]["VmHWM"]) / 1024
        delta = peak - base
        deltas[r["label"]] = delta
        print(
            f"{r['label']:<16} {base:>7.1f}MB {peak:>7.1f}MB {delta:>6.1f}MB "
            f"{delta * mib / size:>8.2f}x {r['submit_s']:>8.2f}s "
            f"{r['idle']['max_stall_ms']:>8.1f}ms {stall(r):>8.1f}ms"
        )
    gateway, sink = results[1], results[0]
    print(
        "(MB = MiB; peak = VmHWM after reset at the baseline; stall = worst lateness of a "
        "10 ms sleep on the process's loop)"
    )
    print(
        f"gateway, SMTP receive until 250: peak {gateway['after_250']['VmHWM'] / 1024:.1f}MB, "
        f"max stall {gateway['after_250']['max_stall_ms']:.1f}ms"
    )
    print(
        f"gateway, after the 250 until delivered (Graph upload): RSS at start "
        f"{gateway['after_250_reset']['VmRSS'] / 1024:.1f}MB, peak "
        f"{gateway['final']['VmHWM'] / 1024:.1f}MB, max stall "
        f"{gateway['final']['max_stall_ms']:.1f}ms"
    )
    if deltas["aiosmtpd sink"] > 0:
        rss_ratio = deltas["gateway → Graph"] / deltas["aiosmtpd sink"]
        print(
            f"ratio gateway/sink: RSS delta {rss_ratio:.1f}x, "
            f"max stall {stall(gateway) / max(stall(sink), 0.1):.1f}x, "
            f"time to 250 {gateway['submit_s'] / sink['submit_s']:.1f}x"
        )
    rss = [kib / 1024 for kib in gateway.get("rss_after", [])]
    if len(rss) > 1:
        print(
            "gateway RSS after each delivered message: "
            + " → ".join(f"{mb:.0f}" for mb in rss)
            + f" MiB; after {len(rss)} / after the first = {rss[-1] / rss[0]:.2f}x (goal <= 1.2x); "
            f"max stall over messages 2-{len(rss)}: {gateway['max_stall_later_ms']:.1f}ms"
        )
        parts = gateway.get("rss_parts", [])
        print(
            "  of which anonymous / file-backed: "
            + " → ".join(f"{anon / 1024:.0f}/{file / 1024:.0f}" for anon, file in parts)
            + " MiB"
        )
    delivered = gateway.get("delivered_s")
    print(
        "delivery after the 250: "
        + (f"{delivered:.2f}s" if delivered is not None else "NOT delivered within the timeout")
    )


async def main(args: argparse.Namespace) -> int:
    run_id = f"{int(time.time())}"
    message, digest = build_message(int(args.mb * 1024 * 1024), run_id)
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        work_dir = Path(tmp)
        sandbox, app, user = await c.start_sandbox(work_dir / "sandbox")
        try:
            sink = await sink_round(message, args)
            gateway, sent, log_path = await gateway_round(
                message, args, work_dir, sandbox, app, user
            )
            log_text = log_path.read_text(errors="replace")
        finally:
            await sandbox.stop()
    report([sink, gateway], len(message))
    print("in sandbox Sent: " + check_delivery(sent[:1], digest))
    path = [line for line in log_text.splitlines() if "spool.sent" in line]
    print("gateway log: " + (path[0][:240] if path else "no spool.sent line"))
    problems = [
        line
        for line in log_text.splitlines()
        if '"level": "error"' in line or '"level": "warning"' in line or "Traceback" in line
    ]
    for line in problems[:5]:
        print(f"  {line[:300]}")
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=30, help="message size in MiB")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--count", type=int, default=1, help="messages sent to the gateway one after another"
    )
    return parser.parse_args()


if __name__ == "__main__":
    c.run(main, _arguments())
