"""SMTP → gateway → sandbox Graph: submission throughput, latency and end-to-end delivery time,
against a bare aiosmtpd sink measured in the same run with the same clients and messages.

    .venv/bin/python bench/smtp_throughput.py [--messages 800] [--clients 16] [--size 10240]
                                              [--rounds 3]

Layout: the sandbox (HTTPS Graph + sign-in) runs in this process on its event loop; the client
threads (smtplib) run here too; the gateway runs as a child ``python -m gateway run -c CFG``
(app-only Microsoft account, so nobody has to consent); the sink is a child
``bench/_sink.py``. Each client opens one connection, EHLO + AUTH PLAIN once, then sends
messages taken from a shared queue (MAIL/RCPT/DATA per message) until the queue is empty.
Everything is on 127.0.0.1; the run is bounded by --messages and --timeout.

    .venv/bin/python bench/smtp_throughput.py --upstream [--messages 2000] [--rounds 3]

With --upstream (as root: a private Postfix and Dovecot, as in the integration tests), the same
clients submit once straight to Postfix's submission port (STARTTLS + AUTH PLAIN) and once to a
gateway whose ``upstream`` account sends through that Postfix, in interleaved rounds; each round
times from the first submission until the last message is in Dovecot (counted in its maildir),
and counts the Postfix sessions that carried them (from Postfix's log). The three kinds of run
(direct, gateway, the spool draining alone) take turns at going first. ``--pin`` puts Postfix
and Dovecot on the first CPU and everything else on the others, as if the upstream server were
a machine of its own; ``--hold-ms N`` sets the gateway's ``spool.hold_for_intake_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import shutil
import smtplib
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
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
    # (user, system) CPU seconds during submission: the server's process, its main thread
    server_times: tuple[float, float] = (0.0, 0.0)
    server_main_times: tuple[float, float] = (0.0, 0.0)
    machine_at_start: tuple[int, int] = (0, 0)  # c.machine_jiffies() when the clock started
    machine_busy: float = 0.0  # --upstream: fraction of all cores busy until all delivered
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
    login: tuple[str, str] = (c.USERNAME, c.PASSWORD),
    tls: ssl.SSLContext | None = None,
) -> None:
    smtp, ready = None, False
    try:
        begin = time.perf_counter()
        smtp = smtplib.SMTP(c.HOST, port, local_hostname="bench.local", timeout=timeout)
        smtp.ehlo()
        if tls is not None:
            smtp.starttls(context=tls)
            smtp.ehlo()
        smtp.login(*login)
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
    name: str,
    port: int,
    messages: list[bytes],
    clients: int,
    timeout: float,
    server_pid: int,
    login: tuple[str, str] = (c.USERNAME, c.PASSWORD),
    tls: ssl.SSLContext | None = None,
) -> Round:
    """Submit every message with ``clients`` threads; the loop keeps serving meanwhile."""
    result = Round(name)
    cpu_before = [0.0, 0.0]
    times_before = [(0.0, 0.0), (0.0, 0.0)]  # the server's process, its main thread
    work: queue.Queue = queue.Queue()
    for index in range(len(messages)):
        work.put(index)
    lock = threading.Lock()
    loop = asyncio.get_running_loop()

    def go() -> None:
        cpu_before[:] = c.cpu_seconds(server_pid), c.cpu_seconds(os.getpid())
        times_before[:] = c.cpu_times(server_pid), c.cpu_times(server_pid, server_pid)
        result.machine_at_start = c.machine_jiffies()
        result.started = time.perf_counter()

    barrier = threading.Barrier(clients, action=go)
    with ThreadPoolExecutor(clients) as pool:
        futures = [
            loop.run_in_executor(
                pool, _client, port, work, messages, result, lock, timeout, barrier, login, tls
            )
            for _ in range(clients)
        ]
        await asyncio.gather(*futures)
        result.finished = time.perf_counter()
    result.server_cpu = c.cpu_seconds(server_pid) - cpu_before[0]
    result.server_times = _minus(c.cpu_times(server_pid), times_before[0])
    result.server_main_times = _minus(c.cpu_times(server_pid, server_pid), times_before[1])
    result.bench_cpu = c.cpu_seconds(os.getpid()) - cpu_before[1]
    return result


def _minus(after: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


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
) -> tuple[Round, float | None, int, int, Path, tuple[float, float, float]]:
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


# -- upstream: delivered into a real Dovecot through a real Postfix ----------------------------


@dataclass
class Delivered:
    """One round of the upstream comparison: submission, then delivery into Dovecot."""

    name: str
    submitted: Round
    seconds: float | None  # from the first submission until the last message is in Dovecot
    arrived: int  # messages in Dovecot from this round (more than submitted = duplicates)
    sessions: list[int]  # Postfix smtpd sessions that carried messages: messages each
    waits: list[tuple[str, float]] = field(default_factory=list)  # gateway: c.queue_waits
    found: int = 0  # gateway: messages its spool found only by a rescan (c.rescan_found)

    @property
    def rate(self) -> float | None:
        accepted = len(self.submitted.latencies)
        return accepted / self.seconds if self.seconds else None


def _inbox_count(dovecot, user: str) -> int:
    """Messages delivered to ``user``'s INBOX: the files of its maildir's ``new/`` and ``cur/``
    (Dovecot's LMTP renames each message into ``new/`` once it is written). Counted here, not
    with ``doveadm``: a doveadm process every 20 ms cost the machine a tenth of a core, taken
    from whichever round was being measured."""
    total = 0
    for part in ("new", "cur"):
        try:
            with os.scandir(dovecot.mail_dir / user / "Maildir" / part) as entries:
                total += sum(1 for _ in entries)
        except FileNotFoundError:
            pass
    return total


async def _wait_delivered(dovecot, user: str, expected: int, limit: float) -> float | None:
    """perf_counter() when ``user``'s INBOX first holds ``expected`` messages, or None."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if _inbox_count(dovecot, user) >= expected:
            return time.perf_counter()
        await asyncio.sleep(0.02)
    return None


async def delivered_round(
    name: str, port: int, messages: list[bytes], args: argparse.Namespace, postfix, pid, **login
) -> Delivered:
    """Submit ``messages`` to ``port`` and wait until all accepted ones are in Dovecot."""
    dovecot, catchall = postfix.dovecot, postfix.catchall_user
    before = _inbox_count(dovecot, catchall)
    log_start = postfix.log_file.stat().st_size
    result = await run_clients(name, port, messages, args.clients, args.timeout, pid, **login)
    expected = before + len(result.latencies)
    done = await _wait_delivered(dovecot, catchall, expected, args.timeout)
    result.machine_busy = c.busy_between(result.machine_at_start, c.machine_jiffies())
    await asyncio.sleep(1.0)  # duplicates, if any, would show up meanwhile
    arrived = _inbox_count(dovecot, catchall) - before
    seconds = None if done is None else done - result.started
    return Delivered(
        name, result, seconds, arrived, c.postfix_sessions(postfix.log_file, log_start)
    )


async def upstream_main(args: argparse.Namespace) -> int:
    """Postfix submission direct vs the gateway in front of the same Postfix, interleaved."""
    from mailgw_sandbox.upstream import Dovecot, Postfix

    tmp = tempfile.mkdtemp(prefix="bench-upstream-")
    work_dir = Path(tmp)
    rounds: list[tuple[Delivered, Delivered, Delivered]] = []
    cpus = os.sched_getaffinity(0)
    if args.pin:  # Postfix and Dovecot inherit the first CPU; this process and the gateway
        _pin_process({min(cpus)})  # (its children) get the others from inside the block
    with Dovecot() as dovecot, Postfix(dovecot) as postfix:
        if args.pin:
            _pin_process(cpus - {min(cpus)})
        user = dovecot.new_user("bench")
        tls = ssl.create_default_context(cafile=str(postfix.ca_file))
        tls.check_hostname = False  # the certificate names localhost; the clients dial 127.0.0.1
        for number in range(args.rounds):
            tag = f"{int(time.time())}-{number}"
            direct_messages = [build_message(i, args.size, f"d{tag}") for i in range(args.messages)]

            runs: dict[str, Callable[[], Awaitable[Delivered]]] = {
                "direct": partial(
                    delivered_round,
                    "Postfix direct",
                    postfix.submission_port,
                    direct_messages,
                    args,
                    postfix,
                    postfix.master_pid(),
                    login=(user.name, user.password),
                    tls=tls,
                ),
                "gateway": partial(
                    _gateway_upstream_round, args, work_dir / f"round{number}", postfix, user,
                    f"g{tag}",
                ),
                "drain": partial(
                    _drain_round, args, work_dir / f"drain{number}", postfix, user, f"s{tag}"
                ),
            }  # fmt: skip
            # Each kind of run takes each place in turn (a Latin square): every run leaves the
            # file system and the mailbox slower for the next one (Postfix's queue files and
            # the maildir), which must not always fall on the same kind.
            order = list(runs)
            turn = number % len(order)
            done = {name: await runs[name]() for name in order[turn:] + order[:turn]}
            rounds.append((done["direct"], done["gateway"], done["drain"]))
            print(f"round {number + 1}: " + " | ".join(_summary(r) for r in rounds[-1]))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    _report_upstream(args, rounds)
    return 0


def _pin_process(cpus: set[int]) -> None:
    """Every thread of this process on ``cpus`` (``sched_setaffinity`` is per thread; the
    processes and threads started from now on inherit it)."""
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), cpus)


async def _gateway_upstream_round(
    args: argparse.Namespace, work_dir: Path, postfix, user, tag: str
) -> Delivered:
    await asyncio.to_thread(work_dir.mkdir, parents=True)
    port = c.free_port()
    settings = c.upstream_gateway_config(work_dir / "state", port, postfix, user, args.sessions)
    if args.hold_ms is not None:
        settings["spool"] = {"hold_for_intake_ms": args.hold_ms}
    config = c.write_yaml(work_dir / "gateway.yaml", settings)
    messages = [build_message(i, args.size, tag) for i in range(args.messages)]
    with open(work_dir / "gateway.log", "wb") as log_file:
        process = await c.start_gateway(config, log_file)
        try:
            await c.wait_for_banner(port, process, 60)
            log_start = postfix.log_file.stat().st_size
            result = await delivered_round(
                "gateway → Postfix", port, messages, args, postfix, process.pid
            )
        finally:
            await c.stop_child(process)  # QUIT on the pooled sessions: Postfix logs them
    await asyncio.sleep(0.5)
    result.sessions = c.postfix_sessions(postfix.log_file, log_start)
    log_text = (work_dir / "gateway.log").read_text(errors="replace")
    result.waits = c.queue_waits(log_text)
    result.found = c.rescan_found(log_text)
    return result


async def _drain_round(
    args: argparse.Namespace, work_dir: Path, postfix, user, tag: str
) -> Delivered:
    """The upstream leg alone: a spool holding every message starts, and its worker sends
    them through the account's session pool (in this process: no SMTP intake involved)."""
    from gateway.config import load_settings
    from gateway.delivery import Envelope
    from gateway.outbound import system_ca_file
    from gateway.providers import UpstreamSender
    from gateway.spool import FileSpool

    await asyncio.to_thread(work_dir.mkdir, parents=True)
    config = c.write_yaml(
        work_dir / "gateway.yaml",
        c.upstream_gateway_config(work_dir / "state", c.free_port(), postfix, user, args.sessions),
    )
    settings = load_settings(config)
    sender = UpstreamSender(system_ca_file())
    spool = FileSpool.from_settings(settings, {"upstream": sender})
    envelope = Envelope(c.USERNAME, c.SENDER, (c.RECIPIENT,), False, datetime.now(UTC), "127.0.0.1")
    for index in range(args.messages):
        await spool.submit(envelope, build_message(index, args.size, tag))
    dovecot, catchall = postfix.dovecot, postfix.catchall_user
    before = _inbox_count(dovecot, catchall)
    log_start = postfix.log_file.stat().st_size
    submitted = Round("spool drain")
    cpu, machine = c.cpu_seconds(os.getpid()), c.machine_jiffies()
    submitted.started = time.perf_counter()
    await spool.start()
    try:
        done = await _wait_delivered(dovecot, catchall, before + args.messages, args.timeout)
    finally:
        submitted.bench_cpu = c.cpu_seconds(os.getpid()) - cpu
        submitted.machine_busy = c.busy_between(machine, c.machine_jiffies())
        await spool.stop()
        await sender.close()
    submitted.finished = time.perf_counter()
    submitted.latencies = [0.0] * args.messages  # all were queued before the clock started
    await asyncio.sleep(1.0)
    arrived = _inbox_count(dovecot, catchall) - before
    seconds = None if done is None else done - submitted.started
    return Delivered(
        "gateway spool drain", submitted, seconds, arrived,
        c.postfix_sessions(postfix.log_file, log_start),
    )  # fmt: skip


def _machine_ms(r: Delivered) -> float:
    """The whole machine's busy CPU time per delivered message, in ms (every process: clients,
    gateway, Postfix, Dovecot, and whatever else ran meanwhile)."""
    if not r.seconds or not r.arrived:
        return 0.0
    return r.submitted.machine_busy * r.seconds * (os.cpu_count() or 1) / r.arrived * 1000


def _summary(r: Delivered) -> str:
    rate = f"{r.rate:.1f} msg/s" if r.rate else "NOT all delivered"
    return f"{r.name}: {rate}, {r.arrived} arrived, {len(r.sessions)} sessions"


def _report_upstream(
    args: argparse.Namespace, rounds: list[tuple[Delivered, Delivered, Delivered]]
) -> None:
    print(
        f"\nUpstream delivery: {args.messages} messages of ~{args.size} bytes, {args.clients} "
        f"clients (one connection + AUTH PLAIN each), {args.rounds} interleaved rounds; "
        "delivered = first submission → last message in Dovecot"
    )
    if args.hold_ms is not None:
        print(f"--hold-ms: the gateway's spool.hold_for_intake_ms is {args.hold_ms}")
    if args.pin:
        print(
            "--pin: Postfix and Dovecot on CPU 0; the clients, the gateway and the spool drain "
            "on the others (the upstream server as if on a machine of its own)"
        )
    header = f"{'':<20} {'delivered msg/s':>16} {'accepted msg/s':>15} {'p99 ms':>8}"
    print(header + f" {'arrived':>8} {'Postfix sessions':>17} {'errors':>6}")
    medians = {}
    for index, name in enumerate(("Postfix direct", "gateway → Postfix", "gateway spool drain")):
        runs = [pair[index] for pair in rounds]
        for r in runs:
            accepted = len(r.submitted.latencies) / r.submitted.wall if r.submitted.wall else 0
            p99 = c.percentile([v * 1000 for v in r.submitted.latencies] or [0], 0.99)
            rate = f"{r.rate:.1f}" if r.rate else "-"
            print(
                f"{name:<20} {rate:>16} {accepted:>15.1f} {p99:>8.1f} "
                f"{r.arrived:>5}/{args.messages:<4} {len(r.sessions):>17} "
                f"{len(r.submitted.errors):>6}"
            )
        rates = [r.rate for r in runs if r.rate]
        medians[name] = statistics.median(rates) if len(rates) == len(runs) else None
    direct = medians["Postfix direct"]
    for name in ("gateway → Postfix", "gateway spool drain"):
        if direct and medians[name]:
            print(
                f"median delivered: {name} {medians[name]:.1f} msg/s vs Postfix direct "
                f"{direct:.1f} msg/s = {medians[name] / direct:.2f}x (goal >= 0.95x)"
            )
        else:
            print(f"median delivered, {name}: a round did not deliver all within --timeout")
    for number, trio in enumerate(rounds, 1):
        busy = ", ".join(
            f"{r.name} {r.submitted.machine_busy:.0%} ({_machine_ms(r):.1f} ms of CPU per message)"
            for r in trio
        )
        print(f"round {number}, machine busy until delivered ({os.cpu_count()} cores): {busy}")
        drain = trio[2]
        print(
            f"spool drain round {number}: its process (the spool) used "
            f"{drain.submitted.bench_cpu:.2f} s of CPU in {drain.seconds or 0:.2f} s"
        )
        print(f"gateway → Postfix round {number}: {c.queue_wait_summary(trio[1].waits)}")
        print(f"gateway → Postfix round {number}: found only by a rescan: {trio[1].found}")
    for trio in rounds:
        for r in trio:
            for error in r.submitted.errors[:3]:
                print(f"  {r.name} error: {error}")


def row(name: str, r: Round, n: int) -> str:
    ok = len(r.latencies)
    if not ok:
        return f"{name:<18} {'-':>8} {'-':>9} {'-':>8} {'-':>8} {'-':>8} {len(r.errors):>6}"
    ms = [v * 1000 for v in r.latencies]
    return (
        f"{name:<18} {ok:>5}/{n:<4} {ok / r.wall:>8.1f} {c.percentile(ms, 0.5):>8.1f} "
        f"{c.percentile(ms, 0.95):>8.1f} {c.percentile(ms, 0.99):>8.1f} {len(r.errors):>6}"
    )


@dataclass
class AcceptRound:
    """One gateway round of the accept comparison and what followed it."""

    submitted: Round
    end_to_end: float | None  # first submission → all in the sandbox's Sent
    delivered: int
    duplicates: int
    tail: tuple[float, float, float]  # after the last 250: wall, gateway CPU, bench CPU
    log_text: str


async def main(args: argparse.Namespace) -> int:
    """``--rounds`` interleaved rounds (sink, then gateway, each from a fresh start); the goal
    line compares the medians."""
    run_id = f"{int(time.time())}"
    messages = [build_message(i, args.size, run_id) for i in range(args.messages)]
    tmp = tempfile.mkdtemp(prefix="bench-smtp-")
    work_dir = Path(tmp)
    sandbox, app, user = await c.start_sandbox(work_dir / "sandbox")
    sinks: list[Round] = []
    gateways: list[AcceptRound] = []
    try:
        for number in range(args.rounds):
            sinks.append(await sink_round(messages, args))
            round_dir = work_dir / f"round-{number + 1}"
            round_dir.mkdir()
            result, end_to_end, delivered, duplicates, log_path, tail = await gateway_round(
                messages, args, round_dir, sandbox, app, user
            )
            log_text = log_path.read_text(errors="replace")
            gateways.append(AcceptRound(result, end_to_end, delivered, duplicates, tail, log_text))
    finally:
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    _report_accept(args, messages, sinks, gateways)
    if args.keep:
        print(f"work directory kept: {tmp}")
    return 0


def _report_accept(
    args: argparse.Namespace,
    messages: list[bytes],
    sinks: list[Round],
    gateways: list[AcceptRound],
) -> None:
    n = args.messages
    print(
        f"\nSMTP throughput: {n} messages of {len(messages[0])} bytes, {args.clients} clients, "
        f"one connection + AUTH PLAIN each, loopback, plain SMTP (no TLS), "
        f"{args.rounds} interleaved rounds"
    )
    print(
        f"{'':<18} {'accepted':>10} {'msg/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6}"
    )
    for sink in sinks:
        print(row("aiosmtpd sink", sink, n))
    for gateway in gateways:
        print(row("gateway (spool)", gateway.submitted, n))
    ca = [v * 1000 for g in gateways for v in g.submitted.connect_auth] or [0]
    ca_sink = [v * 1000 for s in sinks for v in s.connect_auth] or [0]
    print(
        f"connect+EHLO+AUTH, before the clock starts (slowest of {args.clients}): gateway "
        f"{max(ca):.0f} ms, sink {max(ca_sink):.0f} ms"
    )
    rounds = [g.submitted for g in gateways]
    if all(r.latencies for r in rounds + sinks):
        g_rate = statistics.median(len(r.latencies) / r.wall for r in rounds)
        s_rate = statistics.median(len(r.latencies) / r.wall for r in sinks)
        g99 = statistics.median(c.percentile(r.latencies, 0.99) for r in rounds) * 1000
        s99 = statistics.median(c.percentile(r.latencies, 0.99) for r in sinks) * 1000
        print(
            f"median accepted: gateway {g_rate:.1f} msg/s vs sink {s_rate:.1f} msg/s = "
            f"{g_rate / s_rate:.2f}x (goal >= 0.5x); median p99: gateway {g99:.1f} ms vs sink "
            f"{s99:.1f} ms = {g99 / s99:.1f}x (goal <= 2x)"
        )
    for label, runs in (("sink", sinks), ("gateway", rounds)):
        cpu = ", ".join(f"{r.server_cpu:.2f} s in {r.wall:.2f} s" for r in runs)
        bench = ", ".join(f"{r.bench_cpu:.2f} s" for r in runs)
        print(f"CPU during submission, {label} process: {cpu}; benchmark process: {bench}")
        per_message = ", ".join(
            f"{r.server_cpu / len(r.latencies) * 1000:.2f}" for r in runs if r.latencies
        )
        print(f"CPU per accepted message, {label} process: {per_message} ms")
    for number, g in enumerate(gateways, 1):
        accepted = len(g.submitted.latencies)
        if g.end_to_end is None:
            delivery = f"NOT all delivered within {args.timeout:.0f}s ({g.delivered}/{accepted})"
        else:
            delivery = (
                f"all {g.delivered} in Sent after {g.end_to_end:.2f} s = "
                f"{g.delivered / g.end_to_end:.1f} msg/s delivered"
            )
        print(
            f"round {number} end-to-end: {delivery}; after the last 250 {g.tail[0]:.2f} s wall, "
            f"gateway CPU {g.tail[1]:.2f} s, sandbox {g.tail[2]:.2f} s; "
            f"duplicates in Sent: {g.duplicates}"
        )
        print(f"round {number} {c.queue_wait_summary(c.queue_waits(g.log_text))}")
        print(f"round {number} found only by a rescan: {c.rescan_found(g.log_text)} messages")
    for label, runs in (("sink", sinks), ("gateway", rounds)):
        for r in runs:
            for error in r.errors[:5]:
                print(f"  {label} error: {error}")
    log_text = "".join(g.log_text for g in gateways)
    problems = [
        line
        for line in log_text.splitlines()
        if '"level": "error"' in line or '"level": "warning"' in line or "Traceback" in line
    ]
    retries = log_text.count("spool.retry")
    print(f"gateway logs: {retries} spool.retry, {len(problems)} warning/error lines")
    for line in problems[:5]:
        print(f"  {line[:300]}")


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
    parser.add_argument(
        "--upstream",
        action="store_true",
        help="instead: delivered rate into Dovecot through Postfix, direct vs via the gateway "
        "(needs root and the upstream test servers: scripts/install-test-deps.sh)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument(
        "--hold-ms",
        type=int,
        help="--upstream: the gateway's spool.hold_for_intake_ms (default: the config's, 1000)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="--upstream: Postfix and Dovecot on the first CPU, everything else on the others, "
        "as if the upstream server were a machine of its own (needs 2 CPUs or more)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=16,
        help="--upstream: the gateway account's upstream.smtp.max_sessions (as many as clients)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _arguments()
    c.run(upstream_main if arguments.upstream else main, arguments)
