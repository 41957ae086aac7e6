"""Shared plumbing of the benchmarks: the sandbox tenant, gateway configs, child processes.

Not a test helper: nothing here asserts; it builds the pieces and measures.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
USERNAME = "crm"
PASSWORD = "bench horse battery staple"  # noqa: S105 (a throwaway local account)
SENDER = "crm@contoso.example"
RECIPIENT = "ann@example.org"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


async def start_sandbox(state_dir: Path) -> tuple[Any, Any, Any]:
    """A sandbox with one Microsoft mailbox and an app-only app (no consent needed)."""
    from mailgw_sandbox import Sandbox

    sandbox = Sandbox(state_dir)
    await sandbox.start()
    app = sandbox.add_app("microsoft", app_permissions=("Mail.Send", "Mail.ReadWrite"))
    user = sandbox.add_user("microsoft", SENDER)
    return sandbox, app, user


def smtp_only(smtp_port: int) -> dict[str, Any]:
    """The listeners section of a benchmark gateway: the plain SMTP port, every other off."""
    listeners: dict[str, Any] = {
        f"{name}_port": None for name in ("smtps", "imap", "imaps", "pop3", "pop3s", "admin")
    }
    return {**listeners, "smtp_port": smtp_port}


def gateway_config(sandbox: Any, app: Any, state_dir: Path, smtp_port: int) -> dict:
    """Only the plain SMTP listener (AUTH in clear is allowed from loopback by default)."""
    from gateway.passwords import hash_password

    listeners = smtp_only(smtp_port)
    return {
        "state_dir": str(state_dir),
        "listeners": listeners,
        "ca_bundle": str(sandbox.ca_file),
        "microsoft": {
            "client_id": app.client_id,
            "client_secret": app.client_secret,
            "app_only": True,
            "tenant": sandbox.microsoft.tenant_id,
            "authority_host": sandbox.url,
            "graph_url": f"{sandbox.url}/v1.0",
        },
        "logging": {"level": "info", "format": "json"},
        # The production hash cost (2**15): each SMTP connection pays it once at AUTH.
        "accounts": [
            {
                "username": USERNAME,
                "password_hash": hash_password(PASSWORD),
                "provider": "microsoft",
                "address": SENDER,
            }
        ],
    }


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


async def wait_for_banner(
    port: int,
    process: asyncio.subprocess.Process,
    limit: float,
    expect: bytes = b"220",
    goodbye: bytes = b"QUIT\r\n",
) -> float:
    """Wait until ``port`` greets with ``expect`` (SMTP's 220 unless told; ``b"* OK"`` for IMAP);
    returns seconds waited. Gives up after ``limit``."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if process.returncode is not None:
            raise RuntimeError(f"child exited with {process.returncode} before listening")
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.write(goodbye)
        writer.close()
        if line.startswith(expect):
            return time.monotonic() - start
    raise RuntimeError(f"nothing answered on port {port} within {limit}s")


async def stop_child(process: asyncio.subprocess.Process, limit: float = 30) -> int:
    """SIGTERM, then SIGKILL after ``limit`` seconds; only this child, by its pid."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), limit)
        except TimeoutError:
            process.kill()
            await process.wait()
    return process.returncode


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a process, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


class ProbeClient:
    """Talks to a child that runs bench/_probe.py: one JSON line per command on stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ready(self, limit: float = 60) -> dict:
        return await self._read(limit)

    async def command(self, name: str, limit: float = 30) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{name}\n".encode())
        await self.process.stdin.drain()
        return await self._read(limit)

    async def _read(self, limit: float) -> dict:
        assert self.process.stdout is not None
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("the probe did not answer in time")
            line = await asyncio.wait_for(self.process.stdout.readline(), remaining)
            if not line:
                raise RuntimeError(f"the probe's process ended (rc {self.process.returncode})")
            if line.startswith(b"PROBE "):
                return json.loads(line[6:])


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))  # ceil
    return ordered[min(rank, len(ordered)) - 1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    extra = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + extra if extra else "")
    return env


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat: the difference of two
    readings says how busy the whole machine was in between."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_between(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Fraction of the machine's CPU time that was busy between two machine_jiffies()."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process (from /proc/<pid>/stat)."""
    return sum(cpu_times(pid))


def cpu_times(pid: int, thread: int | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by a process, or by one of its threads (its
    main thread's id is the process id), from /proc."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def start_gateway(
    config: Path, log_file: Any, extra_env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """``gateway run -c config`` as a child process, its output into ``log_file``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "run",
        "-c",
        str(config),
        env={**child_env(), **(extra_env or {})},
        cwd=str(ROOT),
        stdout=log_file,
        stderr=log_file,
    )


def run(main: Any, arguments: Any) -> None:
    """Run ``main(arguments)`` on a loop with Twisted's reactor installed first, as the CLI
    does, and exit with its return code."""
    from gateway.runtime import new_loop_with_reactor

    loop = new_loop_with_reactor()
    try:
        sys.exit(loop.run_until_complete(main(arguments)))
    finally:
        loop.close()


def upstream_gateway_config(
    state_dir: Path, smtp_port: int, postfix: Any, user: Any, sessions: int
) -> dict:
    """One ``provider: upstream`` account that sends through ``postfix``'s submission port
    (STARTTLS, AUTH as the Dovecot ``user``, ``sessions`` pooled sessions); only the plain SMTP
    listener."""
    from gateway.passwords import hash_password

    listeners = smtp_only(smtp_port)
    return {
        "state_dir": str(state_dir),
        "listeners": listeners,
        "logging": {"level": "info", "format": "json"},
        "accounts": [
            {
                "username": USERNAME,
                "password_hash": hash_password(PASSWORD),
                "provider": "upstream",
                "address": SENDER,
                "upstream": {
                    "smtp": {
                        "host": "localhost",
                        "port": postfix.submission_port,
                        "security": "starttls",
                        "username": user.name,
                        "password": user.password,
                        "ca_file": str(postfix.ca_file),
                        "max_sessions": sessions,
                    }
                },
            }
        ],
    }


def postfix_sessions(log_file: Path, since: int) -> list[int]:
    """Messages per smtpd session in Postfix's log after byte offset ``since`` (sessions that
    carried at least one message; a session is ``connect from`` … ``disconnect from``)."""
    import re

    text = log_file.read_bytes()[since:].decode(errors="replace")
    open_sessions: dict[str, int] = {}
    counts: list[int] = []
    for found in re.finditer(r"/smtpd\[(\d+)\]: (connect from|disconnect from|\w+: client=)", text):
        pid, event = found.groups()
        if event == "connect from":
            open_sessions[pid] = 0
        elif event == "disconnect from":
            if open_sessions.get(pid):
                counts.append(open_sessions.pop(pid))
        elif pid in open_sessions:
            open_sessions[pid] += 1
    return counts


def queue_waits(log_text: str) -> list[tuple[str, float]]:
    """(queue id, seconds from commit to the delivering attempt's start) of every ``spool.sent``
    line in a gateway's JSON log, in submission order (queue ids sort by arrival time)."""
    waits = []
    for line in log_text.splitlines():
        if '"spool.sent"' in line:
            entry = json.loads(line)
            waits.append((entry["queue_id"], float(entry["queue_wait"])))
    return sorted(waits)


def queue_wait_summary(waits: list[tuple[str, float]], rescan_interval: float = 30.0) -> str:
    """The longest queue wait, and how far a message was overtaken: the most messages
    submitted after it whose delivery began before its own. A message the worker lost track of
    waits for the rescan (``rescan_interval``) and is overtaken by everything meanwhile."""
    if not waits:
        return "queue wait: no spool.sent lines"
    # A queue id begins with its DATA's start in ms; the commit follows within milliseconds.
    starts = [int(queue_id[:12], 16) / 1000 + wait for queue_id, wait in waits]
    overtaken = 0
    later_starts: list[float] = []  # walking from the newest: starts of those submitted later
    for start in reversed(starts):
        overtaken = max(overtaken, bisect.bisect_left(later_starts, start))
        bisect.insort(later_starts, start)
    longest = max(wait for _, wait in waits)
    return (
        f"queue wait (commit → delivery start) over {len(waits)} messages: max {longest:.2f} s, "
        f"median {statistics.median(w for _, w in waits):.2f} s; most later messages started "
        f"before one: {overtaken} (a message left for the {rescan_interval:.0f} s rescan would "
        "be overtaken by everything sent meanwhile)"
    )


def rescan_found(log_text: str) -> int:
    """Messages a gateway's spool found only by its rescan (``spool.rescan_found`` lines): each
    waited for the rescan, which issue 13 wants to be a safety net that never catches one."""
    return sum(
        int(json.loads(line)["count"])
        for line in log_text.splitlines()
        if '"spool.rescan_found"' in line
    )
