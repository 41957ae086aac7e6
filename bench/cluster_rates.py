"""Accepted and delivered rates with one and two instances on one PostgreSQL, next to SQLite.

    .venv/bin/python bench/cluster_rates.py [--messages 1000] [--clients 16] [--size 10240]
                                            [--rounds 2]

Each round runs three set-ups one after the other, each from a fresh start, with the same
clients and messages: the embedded default (one instance, SQLite and the file spool), one
instance on PostgreSQL (the database spool), and two instances on that PostgreSQL with the
clients split between them (as a TCP load balancer would). Accepted: messages over the wall time
of the submission (16 clients, one connection and AUTH each, messages from a shared queue).
Delivered: from the first submission until every accepted message is in the sandbox mailbox's
Sent Items (Graph, in this process; app-only, so nobody consents). The PostgreSQL server is a
private one (``mailgw_sandbox.postgres``, as in the tests) on this machine. CPU columns, per
accepted message during the submission: ``cpu ms`` the gateway processes, ``pg ms`` the
PostgreSQL server (the database spool moves the commit's work there).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
from smtp_throughput import Round, _client, build_message


@dataclass
class Result:
    name: str
    accepted: int
    errors: int
    accept_wall: float
    delivered_wall: float | None
    gateway_cpu: float
    postgres_cpu: float
    p99_ms: float
    duplicates: int

    def line(self) -> str:
        rate = self.accepted / self.accept_wall if self.accept_wall else 0.0
        delivered = (
            f"{self.accepted / self.delivered_wall:9.1f}" if self.delivered_wall else "  not all"
        )
        cpu_ms = 1000 * self.gateway_cpu / self.accepted if self.accepted else 0.0
        pg_ms = 1000 * self.postgres_cpu / self.accepted if self.accepted else 0.0
        return (
            f"{self.name:<26}{rate:9.1f}{delivered}{self.p99_ms:9.1f}{cpu_ms:9.2f}{pg_ms:9.2f}"
            f"{self.accepted:>7}{self.errors:>5}{self.duplicates:>5}"
        )


HEADER = (
    f"{'set-up':<26}{'acc/s':>9}{'dlv/s':>9}{'p99 ms':>9}{'cpu ms':>9}{'pg ms':>9}{'acc':>7}"
    f"{'err':>5}"
    f"{'dup':>5}"
)


async def submit(ports: list[int], messages: list[bytes], clients: int, pids: list[int]) -> Round:
    """Every message through ``clients`` smtplib threads, client ``i`` on ``ports[i % n]``."""
    result = Round("cluster")
    work: queue.Queue[int] = queue.Queue()
    for index in range(len(messages)):
        work.put(index)
    lock = threading.Lock()
    cpu_before: list[float] = []

    def go() -> None:
        cpu_before[:] = [c.cpu_seconds(pid) for pid in pids]
        result.started = time.perf_counter()

    barrier = threading.Barrier(clients, action=go)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(clients) as pool:
        await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool,
                    _client,
                    ports[i % len(ports)],
                    work,
                    messages,
                    result,
                    lock,
                    120.0,
                    barrier,
                )
                for i in range(clients)
            )
        )
    result.finished = time.perf_counter()
    result.server_cpu = sum(c.cpu_seconds(pid) for pid in pids) - sum(cpu_before)
    return result


def postgres_cpu(data_dir: Path | None) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster, its live children, and
    (through the postmaster's cutime/cstime) the children it has reaped."""
    if data_dir is None:
        return 0.0
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, parent = int(stat.parent.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(f) for f in fields[11:15]) / tick
        elif parent == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def config_for(
    sandbox, app, user_address: str, state_dir: Path, port: int, url: str | None
) -> dict:
    config = c.gateway_config(sandbox, app, state_dir, port)
    config["accounts"][0]["address"] = user_address
    config["logging"] = {"level": "warning"}
    if url is not None:
        config["store"] = {"url": url}
    return config


async def run_setup(
    name: str,
    instances: int,
    url: str | None,
    messages: list[bytes],
    args: argparse.Namespace,
    work_dir: Path,
    sandbox,
    user,
    number: int,
    data_dir: Path | None,
) -> Result:
    """A fresh app per set-up (the sandbox throttles per app and mailbox), one mailbox."""
    app = sandbox.add_app("microsoft", app_permissions=("Mail.Send", "Mail.ReadWrite"))
    address = c.SENDER
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = {"GATEWAY_SECRET_KEY": key}
    processes, logs, ports = [], [], []
    try:
        for n in range(instances):
            port = c.free_port()
            state = work_dir / f"{number}-{n}"
            config = c.write_yaml(
                work_dir / f"{number}-{n}.yaml",
                config_for(sandbox, app, address, state, port, url),
            )
            log = open(work_dir / f"{number}-{n}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            processes.append(await c.start_gateway(config, log, env))
            ports.append(port)
        for port, process in zip(ports, processes, strict=True):
            await c.wait_for_banner(port, process, 60)
        ops = sandbox.ops(user)
        before = len(ops.sent(user))
        pg_before = postgres_cpu(data_dir)
        result = await submit(ports, messages, args.clients, [p.pid for p in processes])
        pg_used = postgres_cpu(data_dir) - pg_before
        accepted = len(result.latencies)
        delivered_at = None
        deadline = time.perf_counter() + args.timeout
        while time.perf_counter() < deadline:
            if len(ops.sent(user)) - before >= accepted:
                delivered_at = time.perf_counter()
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # duplicates, if any, show up
        sent = ops.sent(user)[before:]
        ids = [m.raw.split(b"Message-ID: <", 1)[-1].split(b">", 1)[0] for m in sent]
    finally:
        for process in processes:
            await c.stop_child(process)
        for log in logs:
            log.close()
    latencies = sorted(result.latencies)
    return Result(
        name,
        accepted,
        len(result.errors),
        result.wall,
        None if delivered_at is None else delivered_at - result.started,
        result.server_cpu,
        pg_used,
        1000 * c.percentile(latencies, 0.99) if latencies else 0.0,
        len(ids) - len(set(ids)),
    )


async def main(args: argparse.Namespace) -> int:
    from gateway.store import migrate_postgresql
    from mailgw_sandbox.postgres import PostgresServer

    run_id = f"{int(time.time())}"
    messages = [build_message(i, args.size, run_id) for i in range(args.messages)]
    work_dir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    sandbox, _app, user = await c.start_sandbox(work_dir / "sandbox")
    results: dict[str, list[Result]] = {}
    load_before = os.getloadavg()
    number = 0
    try:
        with PostgresServer() as postgres:
            for _round in range(args.rounds):
                for name, instances, on_pg in (
                    ("SQLite, 1 instance", 1, False),
                    ("PostgreSQL, 1 instance", 1, True),
                    ("PostgreSQL, 2 instances", 2, True),
                ):
                    number += 1
                    url, data_dir = None, None
                    if on_pg:
                        data_dir = postgres.data
                        url = postgres.new_database()
                        await migrate_postgresql(url)
                    outcome = await run_setup(
                        name,
                        instances,
                        url,
                        messages,
                        args,
                        work_dir,
                        sandbox,
                        user,
                        number,
                        data_dir,
                    )
                    results.setdefault(name, []).append(outcome)
                    print(outcome.line(), flush=True)
    finally:
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"\n{args.messages} messages of {args.size} bytes, {args.clients} clients, "
          f"{args.rounds} rounds; load {load_before[0]:.2f} -> {load_after[0]:.2f}")  # fmt: skip
    print(HEADER)
    for rounds in results.values():
        for outcome in rounds:
            print(outcome.line())
    _medians(results)
    return 0


def _medians(results: dict[str, list[Result]]) -> None:
    base = results["SQLite, 1 instance"]

    def accepted(r: Result) -> float:
        return r.accepted / r.accept_wall

    def delivered(r: Result) -> float:
        return r.accepted / r.delivered_wall if r.delivered_wall else 0.0

    reference = (statistics.median(map(accepted, base)), statistics.median(map(delivered, base)))
    for name, rounds in results.items():
        acc = statistics.median(map(accepted, rounds))
        dlv = statistics.median(map(delivered, rounds))
        print(
            f"median {name}: accepted {acc:.1f} msg/s ({acc / reference[0]:.2f}x SQLite), "
            f"delivered {dlv:.1f} msg/s ({dlv / reference[1]:.2f}x SQLite)"
        )


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=10 * 1024, help="bytes per message")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="delivery limit, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the logs and state")
    return parser.parse_args()


if __name__ == "__main__":
    c.run(main, _arguments())
