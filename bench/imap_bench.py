"""IMAP: the gateway's read-only INBOX (sandbox Graph behind it) against a private Dovecot holding
the same messages, measured in the same run with the same imaplib client.

    .venv/bin/python bench/imap_bench.py [--messages 5000] [--sync-messages 10000]
                                         [--connections 1000] [--idle starttls|clear] [--hold 35]
                                         [--rounds 3] [--timeout 600]

Layout: the sandbox (HTTPS Graph + sign-in) runs in this process on its event loop; the gateway
runs as a child ``python -m gateway run -c CFG`` with only its STARTTLS IMAP listener (app-only
Microsoft accounts, so nobody has to consent) and the ``reading`` defaults written out
(``plaintext_auth: loopback``, ``poll_seconds: 30``, ``cache_mb: 64``); Dovecot is
``mailgw_sandbox.upstream.Dovecot`` (its own processes). The same --messages messages
(~10 KB, every 5th multipart/mixed with a base64 attachment) are APPENDed to a Dovecot user and
seeded into the sandbox INBOX of ``crm@contoso.example``, with the same arrival times. Measured,
best of --rounds after one warm-up run of each command (the warm-up is timed too, as "cold"):

- ``UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)``
- a Thunderbird-style header fetch of every message
- ``UID FETCH <first 100 UIDs> (BODY.PEEK[])``

plus the provider API calls of the first sync (LOGIN + first SELECT) of a second account whose
INBOX holds --sync-messages messages; the gateway's VmRSS per idle IMAP connection with
--connections connections each (STARTTLS unless --idle clear) LOGIN + EXAMINE INBOX, and the
provider requests while they sit idle --hold seconds (the view's poller); and the cold listing
and header fetch again after a restart of the gateway (SIGTERM, same state directory and
config). Everything is on 127.0.0.1 and bounded.

With ``reading.plaintext_auth: loopback`` the gateway allows LOGIN in clear text from 127.0.0.1,
so both servers are measured in clear and with STARTTLS, and the gateway's ratios are given
against both Dovecot sessions. A first gateway session (clear) pays the cold listing (every
body downloaded once for its exact size) and is reported alone; the two measured gateway
sessions then start alike, with sizes and bodies known.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import imaplib
import os
import re
import resource
import shutil
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
SYNC_ADDRESS = "sync@contoso.example"
SYNC_ACCOUNT = "sync"
DOVECOT_USER = "bench"
HEADER_FIELDS = (
    "From To Cc Bcc Subject Date Message-ID Priority X-Priority References Newsgroups "
    "In-Reply-To Content-Type Reply-To"
)


def build_message(index: int, size: int, run_id: str) -> bytes:
    """~``size`` bytes; every 5th is multipart/mixed (text + a base64 attachment)."""
    line = b"The quick brown fox jumps over the lazy dog, message body line padding.\r\n"
    multipart = index % 5 == 0
    head = (
        f"From: Sender {index % 37} <sender{index % 37}@example.org>\r\n"
        f"To: CRM <{c.SENDER}>\r\nCc: Ann <{c.RECIPIENT}>\r\n"
        f"Subject: bench message {index}\r\n"
        f"Message-ID: <imap-{run_id}-{index}@bench.invalid>\r\n"
        f"Date: {(T0 + timedelta(seconds=index)).strftime('%a, %d %b %Y %H:%M:%S +0000')}\r\n"
        f"MIME-Version: 1.0\r\n"
    ).encode()
    if not multipart:
        head += b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
        return head + body + b"\r\n"
    boundary = f"b-{run_id}-{index}"
    head += f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode()
    text = line * 40
    attachment_b64 = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2\r\n" * 120
    parts = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n".encode()
        + text
        + f'--{boundary}\r\nContent-Type: application/octet-stream; name="a{index}.bin"\r\n'
        f"Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="a{index}.bin"\r\n\r\n'.encode()
        + attachment_b64[: max(0, size - len(head) - len(text) - 400)]
        + f"--{boundary}--\r\n".encode()
    )
    return head + parts


# -- imaplib side (in threads: the sandbox must keep serving on this process's loop) ------------


def fetch_count(data: list) -> int:
    """FETCH responses in an imaplib answer."""
    count = 0
    for item in data:
        head = item[0] if isinstance(item, tuple) else item
        if isinstance(head, bytes) and re.match(rb"\d+ \(", head):
            count += 1
    return count


def timed_fetch(client: imaplib.IMAP4, uid_set: str, items: str) -> tuple[float, int, int]:
    start = time.perf_counter()
    typ, data = client.uid("FETCH", uid_set, items)
    elapsed = time.perf_counter() - start
    if typ != "OK":
        raise RuntimeError(f"UID FETCH {uid_set} {items[:40]}: {typ} {data!r:.200}")
    size = sum(len(x[1]) for x in data if isinstance(x, tuple))
    return elapsed, fetch_count(data), size


def connect(port: int, starttls: ssl.SSLContext | None, user: str, password: str, timeout: float):
    client = imaplib.IMAP4(c.HOST, port, timeout=timeout)
    if starttls is not None:
        client.starttls(ssl_context=starttls)
    client.login(user, password)
    return client


COMMANDS = [
    ("listing", "1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE)"),
    ("headers", "1:*", f"(UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS ({HEADER_FIELDS})])"),
    ("body x100", None, "(BODY.PEEK[])"),
]


def measure(client: imaplib.IMAP4, rounds: int, requests_of=None) -> dict:
    """Cold (first) run and best of ``rounds`` warm runs of each command, in one session."""
    typ, data = client.select("INBOX", readonly=True)
    if typ != "OK":
        raise RuntimeError(f"EXAMINE INBOX: {typ} {data}")
    typ, data = client.uid("SEARCH", "ALL")
    uids = [int(u) for u in data[0].split()]
    first100 = f"{uids[0]}:{uids[min(99, len(uids) - 1)]}"
    out = {"exists": int(client.untagged_responses.get("EXISTS", [b"0"])[-1]), "uids": len(uids)}
    for name, uid_set, items in COMMANDS:
        uid_set = uid_set or first100
        before = requests_of() if requests_of else None
        cold = timed_fetch(client, uid_set, items)
        calls = delta(before, requests_of()) if requests_of else None
        warm = [timed_fetch(client, uid_set, items) for _ in range(rounds)]
        best = min(warm)
        out[name] = {"cold": cold, "best": best, "cold_calls": calls}
    return out


# -- idle connections (asyncio streams: 1,000 threads would measure the client instead) ---------


async def _command(reader, writer, tag: bytes, line: bytes, limit: float) -> list[bytes]:
    writer.write(tag + b" " + line + b"\r\n")
    await writer.drain()
    lines = []
    while True:
        got = await asyncio.wait_for(reader.readline(), limit)
        if not got:
            raise ConnectionError(f"closed during {line[:20]!r}")
        lines.append(got)
        if got.startswith(tag + b" "):
            if not got.startswith(tag + b" OK"):
                raise RuntimeError(f"{line.split()[0]!r}: {got!r}")
            return lines


async def idle_connection(
    port: int, tls: ssl.SSLContext | None, password: str, limit: float, source: str
):
    reader, writer = await asyncio.open_connection(c.HOST, port, local_addr=(source, 0))
    await asyncio.wait_for(reader.readline(), limit)
    if tls is not None:
        await _command(reader, writer, b"a1", b"STARTTLS", limit)
        await writer.start_tls(tls, server_hostname=c.HOST)
    await _command(reader, writer, b"a2", f'LOGIN {c.USERNAME} "{password}"'.encode(), limit)
    await _command(reader, writer, b"a3", b"EXAMINE INBOX", limit)
    return writer


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return " ".join(line.split()[3:5])
    return "?"


async def idle_rss(
    port: int,
    tls: ssl.SSLContext | None,
    pid: int,
    count: int,
    limit: float,
    requests,
    hold: float,
    probe: c.ProbeClient | None = None,
    tracing: bool = False,
) -> dict:
    """VmRSS before and 2 s after ``count`` idle sessions opened; then they sit ``hold`` seconds
    more, to count the provider requests of idle selected sessions (the view's poller). With a
    ``probe`` (bench/_gateway_memory.py), free heap pages are given back before each RSS
    reading, and when ``tracing``, tracemalloc snapshots are taken at both readings and their
    difference is returned in ``"traced"``."""
    await asyncio.sleep(1)
    if probe is not None:
        await probe.command("trim", limit)
        if tracing:
            await probe.command("snapshot", limit)
    before = c.proc_status(pid)["VmRSS"]
    fds_before = fd_count(pid)
    calls_before = requests()
    writers, errors = [], []
    gate = asyncio.Semaphore(64)

    async def one(source: str) -> None:
        async with gate:
            try:
                writers.append(await idle_connection(port, tls, c.PASSWORD, limit, source))
            except (OSError, RuntimeError, TimeoutError, ConnectionError) as error:
                errors.append(repr(error))

    start = time.perf_counter()
    # Each from its own 127.x.y.z (see crowd_sources): 64 at a time from 127.0.0.1 would meet
    # listeners.max_unauthenticated_per_address (20), which is not what this measures.
    await asyncio.gather(*(one(source) for source in crowd_sources("spread", count)))
    setup = time.perf_counter() - start
    await asyncio.sleep(2)
    if probe is not None:
        await probe.command("trim", limit)
    status = c.proc_status(pid)
    traced = None
    if tracing:
        await probe.command("snapshot", limit)
        traced = await probe.command("diff", limit)
    fds_after = fd_count(pid)
    calls_opened = requests()
    await asyncio.sleep(hold)
    calls_held = delta(calls_opened, requests())
    for writer in writers:
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return {
        "before": before,
        "after": status["VmRSS"],
        "hwm": status["VmHWM"],
        "calls": delta(calls_before, calls_opened),
        "held": calls_held,
        "ok": len(writers),
        "errors": errors,
        "setup": setup,
        "fds": (fds_before, fds_after),
        "traced": traced,
    }


# -- the run ---------------------------------------------------------------------------------------


def delta(before: dict, after: dict) -> dict:
    """Requests per target made between two snapshots (the non-zero ones)."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def count_graph_kinds(kinds: dict[str, int]) -> None:
    """Count Graph requests by kind (``graph $value`` = one body download, ``graph delta`` = one
    delta page, ``graph other``) as the sandbox in this process sees them: the sandbox's
    fault middleware asks ``_faults.target_of`` for every request, so that is wrapped here.
    The sandbox's own count per target (``graph``, ``microsoft-login``) stays as it was."""
    from mailgw_sandbox import _faults

    original = _faults.target_of

    def target_of(path: str):
        target = original(path)
        if target == "graph":
            kind = (
                "graph $value"
                if path.endswith("/$value")
                else "graph delta"
                if "/delta" in path
                else "graph other"
            )
            kinds[kind] = kinds.get(kind, 0) + 1
        return target

    _faults.target_of = target_of


def gateway_config(sandbox, app, state_dir: Path, imap_port: int) -> dict:
    from gateway.passwords import hash_password

    config = c.gateway_config(sandbox, app, state_dir, c.free_port())
    config["listeners"]["smtp_port"] = None
    config["listeners"]["imap_port"] = imap_port
    # The defaults, written out: LOGIN in clear text from loopback, one poller per selected
    # mailbox every 30 s, 64 MiB of bodies cached per mailbox.
    config["reading"] = {"plaintext_auth": "loopback", "poll_seconds": 30, "cache_mb": 64}
    config["accounts"].append(
        {
            "username": SYNC_ACCOUNT,
            "password_hash": hash_password(c.PASSWORD),
            "provider": "microsoft",
            "address": SYNC_ADDRESS,
        }
    )
    return config


async def main(args: argparse.Namespace) -> int:
    from mailgw_sandbox.upstream import Dovecot

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections * 2 + 512
    if soft < want:  # raised before the gateway starts, so the child inherits it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    run_id = f"{int(time.time())}"
    messages = [build_message(i, args.size, run_id) for i in range(args.messages)]
    total_bytes = sum(map(len, messages))
    work_dir = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    sandbox, app, user = await c.start_sandbox(work_dir / "sandbox")
    graph_kinds: dict[str, int] = {}
    count_graph_kinds(graph_kinds)
    log_path = work_dir / "gateway.log"
    dovecot = Dovecot()
    process = None
    report: list[str] = []
    try:
        # -- the same messages in both places --------------------------------------------------
        await asyncio.to_thread(dovecot.start)
        dovecot.add_user(DOVECOT_USER, c.PASSWORD)
        started = time.perf_counter()

        def append_all() -> None:
            client = connect(dovecot.imap_port, None, DOVECOT_USER, c.PASSWORD, args.timeout)
            try:
                for i, raw in enumerate(messages):
                    when = T0 + timedelta(minutes=i)
                    typ, data = client.append("INBOX", None, when, raw)
                    if typ != "OK":
                        raise RuntimeError(f"APPEND {i}: {data}")
            finally:
                client.logout()

        await asyncio.to_thread(append_all)
        dovecot_fill = time.perf_counter() - started
        ops = sandbox.ops(user)
        started = time.perf_counter()
        for i, raw in enumerate(messages):
            ops.seed_inbox(user, raw, received_at=T0 + timedelta(minutes=i))
        sync_user = sandbox.add_user("microsoft", SYNC_ADDRESS)
        sync_ops = sandbox.ops(sync_user)
        for i in range(args.sync_messages):
            raw = messages[i % len(messages)]
            sync_ops.seed_inbox(sync_user, raw, received_at=T0 + timedelta(minutes=i))
        seed_time = time.perf_counter() - started

        # -- the gateway -------------------------------------------------------------------------
        port = c.free_port()
        config = c.write_yaml(
            work_dir / "gateway.yaml", gateway_config(sandbox, app, work_dir / "state", port)
        )

        async def spawn() -> asyncio.subprocess.Process:
            with open(log_path, "ab") as log_file:  # the child has its own descriptor
                return await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway", "run", "-c", str(config),
                    env=c.child_env(), cwd=str(c.ROOT), stdout=log_file, stderr=log_file,
                )  # fmt: skip

        process = await spawn()
        await c.wait_for_banner(port, process, 60, expect=b"* OK", goodbye=b"x LOGOUT\r\n")
        gw_tls = ssl.create_default_context(cafile=str(work_dir / "state" / "tls" / "ca.crt"))
        dc_tls = ssl.create_default_context(cafile=str(dovecot.ca_file))
        dc_tls.check_hostname = False  # Dovecot's leaf names localhost; we dial 127.0.0.1

        def requests() -> dict:
            return dict(sandbox.faults.requests) | graph_kinds

        def capabilities_in_clear() -> str:
            client = imaplib.IMAP4(c.HOST, port, timeout=args.timeout)
            try:
                return " ".join(client.capabilities)
            finally:
                client.logout()

        clear_caps = await asyncio.to_thread(capabilities_in_clear)

        # First sync of the --sync-messages INBOX: LOGIN (opens the view) + first SELECT.
        def first_sync() -> tuple[float, int]:
            client = connect(port, gw_tls, SYNC_ACCOUNT, c.PASSWORD, args.timeout)
            try:
                start = time.perf_counter()
                typ, data = client.select("INBOX", readonly=True)
                took = time.perf_counter() - start
                return took, int(data[0]) if typ == "OK" else -1
            finally:
                client.logout()

        before = requests()
        cpu = c.cpu_seconds(process.pid), c.cpu_seconds(os.getpid())
        sync_took, sync_exists = await asyncio.to_thread(first_sync)
        sync_cpu = c.cpu_seconds(process.pid) - cpu[0], c.cpu_seconds(os.getpid()) - cpu[1]
        sync_calls = delta(before, requests())

        # The gateway's first listing of this INBOX (sizes unknown), in a session of its own,
        # so that both measured gateway sessions below start alike: sizes and bodies known.
        def first_listing() -> dict:
            client = connect(port, None, c.USERNAME, c.PASSWORD, args.timeout)
            try:
                client.select("INBOX", readonly=True)
                before = requests()
                took, count, _ = timed_fetch(client, COMMANDS[0][1], COMMANDS[0][2])
                return {"took": took, "count": count, "calls": delta(before, requests())}
            finally:
                client.logout()

        results = {}
        sessions = (
            ("Dovecot (clear)", dovecot.imap_port, None, DOVECOT_USER, None),
            ("Dovecot STARTTLS", dovecot.imap_port, dc_tls, DOVECOT_USER, None),
            ("gateway (clear)", port, None, c.USERNAME, requests),
            ("gateway STARTTLS", port, gw_tls, c.USERNAME, requests),
        )
        for name, port_, tls, account, reqs in sessions:
            if name == "gateway (clear)":
                cold_listing = await asyncio.to_thread(first_listing)

            def session(port_=port_, tls=tls, account=account, reqs=reqs) -> dict:
                client = connect(port_, tls, account, c.PASSWORD, args.timeout)
                try:
                    return measure(client, args.rounds, reqs)
                finally:
                    client.logout()

            results[name] = await asyncio.to_thread(session)

        rss_before_idle = c.proc_status(process.pid)
        idle_tls = gw_tls if args.idle == "starttls" else None
        idle = await idle_rss(
            port, idle_tls, process.pid, args.connections, args.timeout, requests, args.hold
        )
        gw_limit = nofile_limit(process.pid)
        gw_cpu = c.cpu_seconds(process.pid)
        await asyncio.sleep(2)  # let the gateway see the idle connections go
        rss_after_idle = c.proc_status(process.pid)

        # -- after a restart: same state directory, same config ----------------------------------
        started = time.perf_counter()
        stopped_rc = await c.stop_child(process)
        stop_took = time.perf_counter() - started
        started = time.perf_counter()
        process = await spawn()
        await c.wait_for_banner(port, process, 60, expect=b"* OK", goodbye=b"x LOGOUT\r\n")
        start_took = time.perf_counter() - started

        def after_restart() -> dict:
            out = {}
            before = requests()
            start = time.perf_counter()
            client = connect(port, None, c.USERNAME, c.PASSWORD, args.timeout)
            try:
                typ, data = client.select("INBOX", readonly=True)
                if typ != "OK":
                    raise RuntimeError(f"EXAMINE INBOX after the restart: {typ} {data}")
                out["open"] = time.perf_counter() - start, int(data[0])
                out["open calls"] = delta(before, requests())
                for command, uid_set, items in COMMANDS[:2]:
                    before = requests()
                    out[command] = timed_fetch(client, uid_set, items)
                    out[f"{command} calls"] = delta(before, requests())
                out["listing again"] = timed_fetch(client, COMMANDS[0][1], COMMANDS[0][2])
            finally:
                client.logout()
            return out

        restart = await asyncio.to_thread(after_restart)
        rss_restart = c.proc_status(process.pid)
    finally:
        if process is not None:
            await c.stop_child(process)
        await asyncio.to_thread(dovecot.stop)
        await sandbox.stop()
    log_text = log_path.read_text(errors="replace")
    if not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)

    # -- report ------------------------------------------------------------------------------------
    n = args.messages
    p = report.append
    p(
        f"\nIMAP: {n} messages ({total_bytes / n:.0f} bytes average, every 5th multipart), "
        f"loopback, imaplib, EXAMINE INBOX, best of {args.rounds} after one warm-up run"
    )
    p(
        f"filled in {dovecot_fill:.1f}s (Dovecot, IMAP APPEND) and {seed_time:.1f}s "
        f"(sandbox seed_inbox, {n} + {args.sync_messages} messages)"
    )
    p(
        "gateway reading settings: plaintext_auth loopback, poll_seconds 30, cache_mb 64 "
        "(the defaults)"
    )
    p(f"gateway capabilities in clear from 127.0.0.1: {clear_caps}")
    for name, r in results.items():
        p(f"  {name}: EXISTS {r['exists']}, UIDs {r['uids']}")
    p(
        f"gateway, first listing of the INBOX (own session, in clear, sizes unknown): "
        f"{cold_listing['took'] * 1000:.1f} ms, {cold_listing['count']} responses, "
        f"provider requests {cold_listing['calls'] or 'none'}"
    )
    p("then one session per row; 'cold' = its first run (for the gateway: sizes, bodies known)")
    p(f"{'':<20}{'command':<12}{'cold ms':>10}{'best ms':>10}{'msg/s':>10}{'responses':>10}")
    for name, r in results.items():
        for command, _, _ in COMMANDS:
            cold, best = r[command]["cold"], r[command]["best"]
            p(
                f"{name:<20}{command:<12}{cold[0] * 1000:>10.1f}{best[0] * 1000:>10.1f}"
                f"{best[1] / best[0]:>10.0f}{best[1]:>10}"
            )
    for gateway in ("gateway (clear)", "gateway STARTTLS"):
        gw = results[gateway]
        for reference in ("Dovecot (clear)", "Dovecot STARTTLS"):
            ref = results[reference]
            ratios = ", ".join(
                f"{command} {gw[command]['best'][0] / ref[command]['best'][0]:.2f}x"
                for command, _, _ in COMMANDS
            )
            p(f"ratio {gateway}/{reference} (best, time): {ratios}")
    for gateway in ("gateway (clear)", "gateway STARTTLS"):
        calls = {command: results[gateway][command]["cold_calls"] for command, _, _ in COMMANDS}
        calls = {command: found for command, found in calls.items() if found}
        p(f"{gateway}: provider requests during its cold runs: {calls or 'none'}")
    p(
        f"first sync (LOGIN + first SELECT) of a {args.sync_messages}-message INBOX: "
        f"SELECT took {sync_took:.2f}s, EXISTS {sync_exists}, provider requests {sync_calls}"
    )
    p(
        f"  CPU during LOGIN + SELECT: gateway process {sync_cpu[0]:.1f}s, benchmark process "
        f"(sandbox Graph + client) {sync_cpu[1]:.1f}s"
    )
    per = (idle["after"] - idle["before"]) / max(1, idle["ok"])
    how = "STARTTLS + " if args.idle == "starttls" else "in clear, "
    p(
        f"idle connections ({how}LOGIN + EXAMINE INBOX): {idle['ok']}/{args.connections} "
        f"open in {idle['setup']:.1f}s, {len(idle['errors'])} errors; gateway VmRSS "
        f"{idle['before'] / 1024:.1f} MiB -> {idle['after'] / 1024:.1f} MiB = {per:.1f} KiB "
        f"per connection; VmHWM {idle['hwm'] / 1024:.1f} MiB"
    )
    p(
        f"  provider requests while they opened (each EXAMINE syncs): {idle['calls'] or 'none'}; "
        f"then idle for {args.hold:.0f}s more: {idle['held'] or 'none'}"
    )
    p(f"  gateway VmRSS 2 s after they closed: {rss_after_idle['VmRSS'] / 1024:.1f} MiB")
    p(
        f"gateway fds {idle['fds'][0]} -> {idle['fds'][1]}, its RLIMIT_NOFILE {gw_limit}; "
        f"VmHWM {rss_before_idle['VmHWM'] / 1024:.1f} MiB before the idle test; "
        f"gateway CPU total {gw_cpu:.1f}s"
    )
    for error in sorted(set(idle["errors"]))[:5]:
        p(f"  idle error: {error[:200]}")
    opened, exists = restart["open"]
    p(
        f"after a restart (SIGTERM: exit {stopped_rc} in {stop_took:.1f}s; IMAP greeting again "
        f"{start_took:.1f}s later; same state dir): LOGIN (clear) + EXAMINE INBOX {opened:.2f}s, "
        f"EXISTS {exists}, provider requests {restart['open calls'] or 'none'}"
    )
    for command, _, _ in COMMANDS[:2]:
        took, count, _ = restart[command]
        p(
            f"  cold {command} after the restart: {took * 1000:.1f} ms, {count} responses, "
            f"provider requests {restart[f'{command} calls'] or 'none'}"
        )
    took, count, _ = restart["listing again"]
    p(
        f"  listing once more: {took * 1000:.1f} ms; gateway VmRSS "
        f"{rss_restart['VmRSS'] / 1024:.1f} MiB"
    )
    problems = [
        line
        for line in log_text.splitlines()
        if '"level": "error"' in line or '"level": "warning"' in line or "Traceback" in line
    ]
    p(f"gateway log (both runs): {len(problems)} warning/error lines")
    for line in problems[:5]:
        p(f"  {line[:300]}")
    if args.keep:
        p(f"work directory kept: {work_dir}")
    print("\n".join(report))
    return 0


# -- cold mailboxes (--cold): warm-up, shared syncs, first listing ---------------------------


def mailbox_requests(sandbox, address: str) -> int:
    """Provider requests the sandbox counted for one mailbox (inner batch requests each)."""
    return sandbox.throttle.stats().get(address.casefold(), {}).get("requests", 0)


CROWD_FROM = {
    "spread": "each client from its own 127.x.y.z address",
    "one": "every client from 127.0.0.1, listeners.max_unauthenticated_per_address raised to "
    "the number of clients",
    "one-default": "every client from 127.0.0.1, listeners.max_unauthenticated_per_address at "
    "its default (20)",
}


def crowd_sources(crowd_from: str, count: int) -> list[str]:
    """The client source address of each simultaneous login: ``one``, ``one-default`` =
    127.0.0.1 for all (what programs on the gateway's own machine use); ``spread`` =
    127.1.0.1, 127.1.0.2, ... (Linux routes all of 127.0.0.0/8 to loopback, so a socket can be
    bound to any of them)."""
    if crowd_from != "spread":
        return [c.HOST] * count
    return [f"127.{1 + i // 65024}.{(i // 254) % 256}.{1 + i % 254}" for i in range(count)]


async def crowd_login(port: int, source: str, limit: float) -> dict:
    """One client of the crowd: connect from ``source``, LOGIN, EXAMINE INBOX, LOGOUT. Returns
    ``{"outcome": ..., "login": seconds from connect to LOGIN OK, "done": seconds to EXAMINE
    OK}``; the outcome is ``ok`` or where and how it failed, as the client saw it."""
    start = time.perf_counter()
    out: dict = {"outcome": "ok"}
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(c.HOST, port, local_addr=(source, 0)), limit
        )
    except (OSError, TimeoutError) as error:
        return {"outcome": f"connect: {type(error).__name__} {error}"}
    try:
        greeting = await asyncio.wait_for(reader.readline(), limit)
        if not greeting.startswith(b"* OK"):
            return {"outcome": f"greeting: {_shown(greeting)}"}
        steps = ((b"a1", f'LOGIN {c.USERNAME} "{c.PASSWORD}"'.encode(), "login"),
                 (b"a2", b"EXAMINE INBOX", "done"))  # fmt: skip
        for tag, line, mark in steps:
            writer.write(tag + b" " + line + b"\r\n")
            await writer.drain()
            last = b""
            while True:
                got = await asyncio.wait_for(reader.readline(), limit)
                if not got:
                    out["outcome"] = f"{mark}: closed, last line {_shown(last)}"
                    return out
                last = got
                if got.startswith(tag + b" "):
                    break
            if not got.startswith(tag + b" OK"):
                out["outcome"] = f"{mark}: {_shown(got)}"
                return out
            out[mark] = time.perf_counter() - start
        writer.write(b"a3 LOGOUT\r\n")
        return out
    except (OSError, TimeoutError) as error:
        out["outcome"] = f"{type(error).__name__} {error}"
        return out
    finally:
        writer.close()


def _shown(line: bytes) -> str:
    """A server line as printed: digits masked (retry times, tags), so like lines count as one."""
    return re.sub(r"\d+", "N", line.decode("utf-8", "replace").strip())[:120]


def crowd_report(crowd: list[dict]) -> list[str]:
    """Outcomes counted by kind; LOGIN and EXAMINE completion times of the successful ones."""
    lines = []
    kinds: dict[str, int] = {}
    for one in crowd:
        kinds[one["outcome"]] = kinds.get(one["outcome"], 0) + 1
    for outcome, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {count:>5} {outcome}")
    ok = [one for one in crowd if one["outcome"] == "ok"]
    if ok:
        logins = [one["login"] for one in ok]
        dones = [one["done"] for one in ok]
        lines.append(
            f"    successful: LOGIN OK after p50 {c.percentile(logins, 0.5):.2f}s, p95 "
            f"{c.percentile(logins, 0.95):.2f}s, max {max(logins):.2f}s; EXAMINE OK after p50 "
            f"{c.percentile(dones, 0.5):.2f}s, max {max(dones):.2f}s (from connect)"
        )
    return lines


async def cold(args: argparse.Namespace) -> int:
    """The issue's cold-mailbox figures against Graph with ``--latency`` per request: the
    --messages INBOX of ``crm`` warmed up after its first sync (duration, provider requests),
    then the first and second full listing; a second mailbox (``sync``, same messages) listed
    at once, before any warm-up could finish (it must still answer correctly); and
    --connections simultaneous LOGIN + EXAMINE of ``crm`` (provider requests they cost)."""
    run_id = f"{int(time.time())}"
    messages = [build_message(i, args.size, run_id) for i in range(args.messages)]
    work_dir = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    sandbox, app, user = await c.start_sandbox(work_dir / "sandbox")
    sandbox.faults.latency = args.latency
    sync_user = sandbox.add_user("microsoft", SYNC_ADDRESS)
    for target in (user, sync_user):
        ops = sandbox.ops(target)
        for i, raw in enumerate(messages):
            ops.seed_inbox(target, raw, received_at=T0 + timedelta(minutes=i))
    port = c.free_port()
    settings = gateway_config(sandbox, app, work_dir / "state", port)
    if args.crowd_from == "one":  # see CROWD_FROM and bench/README.md
        settings["listeners"]["max_unauthenticated_per_address"] = max(20, args.connections)
    config = c.write_yaml(work_dir / "gateway.yaml", settings)
    log_path = work_dir / "gateway.log"
    report: list[str] = []
    with open(log_path, "ab") as log_file:
        process = await c.start_gateway(config, log_file)
    try:
        await c.wait_for_banner(port, process, 60, expect=b"* OK", goodbye=b"x LOGOUT\r\n")
        address = c.SENDER

        def examine(account: str) -> float:
            client = connect(port, None, account, c.PASSWORD, args.timeout)
            try:
                start = time.perf_counter()
                client.select("INBOX", readonly=True)
                return time.perf_counter() - start
            finally:
                client.logout()

        def listing(account: str) -> tuple[float, int, int]:
            client = connect(port, None, account, c.PASSWORD, args.timeout)
            try:
                client.select("INBOX", readonly=True)
                took, count, _ = timed_fetch(client, "1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE)")
                return took, count, 0
            finally:
                client.logout()

        before = mailbox_requests(sandbox, address)
        started = time.perf_counter()
        first_examine = await asyncio.to_thread(examine, c.USERNAME)  # first sync: warm-up starts
        sync_requests = mailbox_requests(sandbox, address) - before
        sync_before = mailbox_requests(sandbox, SYNC_ADDRESS)
        cold_took, cold_count, _ = await asyncio.to_thread(listing, SYNC_ACCOUNT)
        cold_requests = mailbox_requests(sandbox, SYNC_ADDRESS) - sync_before

        def warm_up_done() -> list[str]:  # the gateway logs the end of each warm-up
            return [
                line
                for line in log_path.read_text(errors="replace").splitlines()
                if "mailbox.warm_up_done" in line and "warm-up crm" in line
            ]

        while not (lines := warm_up_done()):
            if time.perf_counter() - started > args.timeout:
                raise RuntimeError("the warm-up did not finish in time")
            await asyncio.sleep(0.2)
        warm_took = time.perf_counter() - started
        warm_requests = mailbox_requests(sandbox, address) - before - sync_requests
        before = mailbox_requests(sandbox, address)
        first = await asyncio.to_thread(listing, c.USERNAME)
        first_requests = mailbox_requests(sandbox, address) - before
        second = await asyncio.to_thread(listing, c.USERNAME)
        second_requests = mailbox_requests(sandbox, address) - before - first_requests

        await asyncio.sleep(c_fresh_wait := 11)  # past the freshness window of the first EXAMINE
        before = mailbox_requests(sandbox, address)
        start = time.perf_counter()
        sources = crowd_sources(args.crowd_from, args.connections)
        crowd = await asyncio.gather(
            *(crowd_login(port, source, args.timeout) for source in sources)
        )
        crowd_took = time.perf_counter() - start
        crowd_requests = mailbox_requests(sandbox, address) - before

        # The same crowd against a gateway just restarted (same state and config): no login
        # remembered yet (every password goes through scrypt) and no view open for the mailbox.
        await c.stop_child(process)
        with open(log_path, "ab") as log_file:
            process = await c.start_gateway(config, log_file)
        await c.wait_for_banner(port, process, 60, expect=b"* OK", goodbye=b"x LOGOUT\r\n")
        before = mailbox_requests(sandbox, address)
        start = time.perf_counter()
        restarted = await asyncio.gather(
            *(crowd_login(port, source, args.timeout) for source in sources)
        )
        restarted_took = time.perf_counter() - start
        restarted_requests = mailbox_requests(sandbox, address) - before
        report += [
            f"cold mailboxes: {args.messages} messages of ~{args.size // 1024} KB, Graph latency "
            f"{args.latency * 1000:.0f} ms per request (sandbox), poll_seconds 30",
            f"  first EXAMINE (first sync): {first_examine:.2f}s, "
            f"{sync_requests} provider requests",
            f"  a second mailbox listed at once (no warm-up yet): {cold_took:.2f}s, "
            f"{cold_count} FETCH answers, {cold_requests} provider requests",
            f"  warm-up: done {warm_took:.1f}s after the first EXAMINE, {warm_requests} provider "
            f"requests counted by the sandbox; gateway log: {lines[-1] if lines else '?'}",
            f"  first listing after the warm-up: {first[0]:.2f}s, {first[1]} FETCH answers, "
            f"{first_requests} provider requests",
            f"  second listing: {second[0]:.2f}s, {second_requests} provider requests",
            f"  {args.connections} simultaneous LOGIN + EXAMINE ({c_fresh_wait}s after the last "
            f"sync; {CROWD_FROM[args.crowd_from]}): all done in {crowd_took:.1f}s, "
            f"{crowd_requests} provider requests",
            *crowd_report(crowd),
            f"  the same right after a restart of the gateway (no login remembered, no view "
            f"open): all done in {restarted_took:.1f}s, {restarted_requests} provider requests",
            *crowd_report(restarted),
        ]
    finally:
        await c.stop_child(process)
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    print("\n".join(report))
    return 0


# -- idle sessions only (--idle-only): RSS per session, and where it goes (--trace-memory) ----


async def idle_only(args: argparse.Namespace) -> int:
    """Only the idle-session figure, in a minute instead of five: ``crm``'s --messages INBOX in
    the sandbox (no Dovecot, no listings), the gateway's first sync and warm-up awaited (sizes
    and headers learnt, as in the full run once its listings are done), then --connections
    idle sessions (``--idle clear`` or ``starttls``: LOGIN + EXAMINE INBOX) and the gateway's
    VmRSS per session. The gateway runs under bench/_gateway_memory.py, which gives free heap
    pages back to the system before each reading (otherwise memory freed by the warm-up is
    reused by the sessions and the figure comes out too low). With --trace-memory N it runs
    under tracemalloc with N frames
    (bench/_gateway_memory.py) and the largest differences between the snapshots taken at the
    two RSS readings are printed: where the sessions' memory goes (the RSS then includes
    tracemalloc's own cost and is not the figure)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections * 2 + 512:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.connections * 2 + 512, hard), hard))
    run_id = f"{int(time.time())}"
    work_dir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    sandbox, app, user = await c.start_sandbox(work_dir / "sandbox")
    ops = sandbox.ops(user)
    for i in range(args.messages):
        raw = build_message(i, args.size, run_id)
        ops.seed_inbox(user, raw, received_at=T0 + timedelta(minutes=i))
    port = c.free_port()
    config = c.write_yaml(
        work_dir / "gateway.yaml", gateway_config(sandbox, app, work_dir / "state", port)
    )
    log_path = work_dir / "gateway.log"
    with open(log_path, "ab") as log_file:  # under bench/_gateway_memory.py (see idle_rss)
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(c.BENCH / "_gateway_memory.py"), str(config),
            str(args.trace_memory), env=c.child_env(), cwd=str(c.ROOT),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
        )  # fmt: skip
    probe = c.ProbeClient(process)
    await probe.ready(120)
    try:
        await c.wait_for_banner(port, process, 60, expect=b"* OK", goodbye=b"x LOGOUT\r\n")

        def first_sync() -> None:
            client = connect(port, None, c.USERNAME, c.PASSWORD, args.timeout)
            try:
                client.select("INBOX", readonly=True)
            finally:
                client.logout()

        await asyncio.to_thread(first_sync)
        started = time.perf_counter()
        while "mailbox.warm_up_done" not in log_path.read_text(errors="replace"):
            if time.perf_counter() - started > args.timeout:
                raise RuntimeError("the warm-up did not finish in time")
            await asyncio.sleep(0.2)
        tls = None
        if args.idle == "starttls":
            tls = ssl.create_default_context(cafile=str(work_dir / "state" / "tls" / "ca.crt"))
        idle = await idle_rss(
            port, tls, process.pid, args.connections, args.timeout, dict, args.hold, probe,
            tracing=bool(args.trace_memory),
        )  # fmt: skip
    finally:
        await c.stop_child(process)
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    per = (idle["after"] - idle["before"]) / max(1, idle["ok"])
    how = "STARTTLS + " if args.idle == "starttls" else "in clear, "
    report = [
        f"idle sessions ({how}LOGIN + EXAMINE INBOX of {args.messages} messages, sizes and "
        f"headers learnt): {idle['ok']}/{args.connections} open in {idle['setup']:.1f}s, "
        f"{len(idle['errors'])} errors; gateway VmRSS {idle['before'] / 1024:.1f} MiB -> "
        f"{idle['after'] / 1024:.1f} MiB = {per:.1f} KiB per session"
        + (" (under tracemalloc)" if args.trace_memory else "")
    ]
    for error in sorted(set(idle["errors"]))[:5]:
        report.append(f"  idle error: {error[:200]}")
    traced = idle["traced"]
    if traced:
        count = max(1, idle["ok"])
        report.append(
            f"tracemalloc: {traced['total'] / 1024:.0f} KiB more = "
            f"{traced['total'] / count:.0f} B per session; by line (B per session, objects):"
        )
        for where, size, objects in traced["lines"]:
            report.append(f"  {size / count:>8.0f} {objects:>8} {where}")
        report.append("by call stack (innermost first):")
        for stack, size, objects in traced["stacks"][:12]:
            report.append(f"  {size / count:>8.0f} {objects:>8} " + " <- ".join(stack))
    print("\n".join(report))
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sync-messages", type=int, default=10000)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument(
        "--idle", choices=("starttls", "clear"), default="starttls", help="idle connections"
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=35,
        help="seconds the idle connections stay open after the RSS reading (see the poller)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=10 * 1024, help="bytes per message (about)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds: socket timeouts")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--cold", action="store_true", help="only the cold-mailbox figures (see cold())"
    )
    parser.add_argument(
        "--latency", type=float, default=0.05, help="seconds per Graph request with --cold"
    )
    parser.add_argument(
        "--idle-only", action="store_true", help="only the idle sessions (see idle_only())"
    )
    parser.add_argument(
        "--trace-memory",
        type=int,
        default=0,
        metavar="FRAMES",
        help="--idle-only: run the gateway under tracemalloc with FRAMES frames per allocation",
    )
    parser.add_argument(
        "--crowd-from",
        choices=tuple(CROWD_FROM),
        default="spread",
        help="--cold: source addresses of the simultaneous logins (see CROWD_FROM)",
    )
    arguments = parser.parse_args()
    if arguments.messages < 1:
        parser.error("--messages must be at least 1")
    return arguments


if __name__ == "__main__":
    arguments = _arguments()
    from gateway.runtime import new_loop_with_reactor  # the reactor first, like the CLI

    loop = new_loop_with_reactor()
    try:
        chosen = (
            cold(arguments)
            if arguments.cold
            else idle_only(arguments)
            if arguments.idle_only
            else main(arguments)
        )
        sys.exit(loop.run_until_complete(asyncio.wait_for(chosen, 1800)))
    finally:
        loop.close()
