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
private one (``mailgw_sandbox.postgres``, as in the tests) on this machine, so its CPU is
counted in the machine's load, not in the gateways' CPU column.
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
    p99_ms: float
    duplicates: int

    def line(self) -> str:
        rate = self.accepted / self.accept_wall if self.accept_wall else 0.0
        delivered = (
            f"{self.accepted / self.delivered_wall:9.1f}" if self.delivered_wall else "  not all"
        )
        cpu_ms = 1000 * self.gateway_cpu / self.accepted if self.accepted else 0.0
        return (
            f"{self.name:<26}{rate:9.1f}{delivered}{self.p99_ms:9.1f}{cpu_ms:9.2f}"
            f"{self.accepted:>7}{self.errors:>5}{self.duplicates:>5}"
        )


HEADER = (
    f"{'set-up':<26}{'acc/s':>9}{'dlv/s':>9}{'p99 ms':>9}{'cpu ms':>9}{'acc':>7}{'err':>5}"
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
) -> Result:
    """A fresh app per set-up (the sandbox throttles per app and mailbox), one mailbox."""
    app = sandbox.add_app("microsoft", app_permissions=("Mail.Send", "Mail.ReadWrite"))
    address = c.SENDER
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    env = {**c.child_env(), "GATEWAY_SECRET_KEY": key}
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
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gateway",
                    "run",
                    "-c",
                    str(config),
                    env=env,
                    cwd=str(c.ROOT),
                    stdout=log,
                    stderr=log,
                )
            )
            ports.append(port)
        for port, process in zip(ports, processes, strict=True):
            await c.wait_for_banner(port, process, 60)
        ops = sandbox.ops(user)
        before = len(ops.sent(user))
        result = await submit(ports, messages, args.clients, [p.pid for p in processes])
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
                    url = None
                    if on_pg:
                        url = postgres.new_database()
                        await migrate_postgresql(url)
                    outcome = await run_setup(
                        name, instances, url, messages, args, work_dir, sandbox, user, number
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
