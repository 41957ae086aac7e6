"""IMAP LOGIN latency: the gateway (first login of an account, then repeat logins) against a
private Dovecot, in the same run with the same imaplib client, each login on a new connection
(as legacy programs log in: connect, LOGIN, a little work, LOGOUT, every few minutes).

    .venv/bin/python bench/login_bench.py [--accounts 5] [--repeats 50]

The gateway runs as a child ``python -m gateway run -c CFG`` with only its IMAP listener (LOGIN
in clear text from loopback, the default), app-only Microsoft accounts on the sandbox (empty
INBOXes) with production-strength scrypt hashes (2**15). Dovecot is
``mailgw_sandbox.upstream.Dovecot`` (passwd-file users, ``{PLAIN.b64}`` passwords, its default
auth settings). Measured, per LOGIN, from sending the command to its tagged answer:

- **first login**: the first LOGIN of each of --accounts accounts (the gateway's scrypt check,
  and opening the account's mailbox view: one empty first sync against the sandbox);
- **repeat login**: --repeats further LOGINs of one account (the gateway recognises the
  password from its verified-login cache; the view is open);
- the gate alone, in this process: one ``LoginGate.check`` with a 2**15 hash, cold and cached.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c


def login_seconds(port: int, user: str, password: str) -> float:
    """Connect, then time LOGIN (command sent → tagged OK); LOGOUT."""
    client = imaplib.IMAP4(c.HOST, port, timeout=60)
    try:
        started = time.perf_counter()
        typ, data = client.login(user, password)
        elapsed = time.perf_counter() - started
        if typ != "OK":
            raise RuntimeError(f"LOGIN {user}: {typ} {data}")
        return elapsed
    finally:
        client.logout()


def gateway_config(sandbox, app, state_dir: Path, port: int, accounts: int) -> dict:
    from gateway.passwords import hash_password

    config = c.gateway_config(sandbox, app, state_dir, c.free_port())
    config["listeners"]["smtp_port"] = None
    config["listeners"]["imap_port"] = port
    for n in range(1, accounts):
        address = f"user{n}@contoso.example"
        sandbox.add_user("microsoft", address)
        config["accounts"].append(
            {
                "username": f"user{n}",
                "password_hash": hash_password(c.PASSWORD),
                "provider": "microsoft",
                "address": address,
            }
        )
    return config


async def gate_alone() -> tuple[float, float]:
    """One cold check and the median of 20 cached ones, in seconds (this process, no I/O)."""
    from gateway.login_gate import MAILBOX, LoginGate, UserKey
    from gateway.passwords import hash_password, parse_hash

    gate, stored, user = LoginGate(), parse_hash(hash_password(c.PASSWORD)), UserKey(MAILBOX, "x")
    started = time.perf_counter()
    await gate.check(c.HOST, user, c.PASSWORD, stored, protocol="bench")
    cold = time.perf_counter() - started
    cached = []
    for _ in range(20):
        started = time.perf_counter()
        await gate.check(c.HOST, user, c.PASSWORD, stored, protocol="bench")
        cached.append(time.perf_counter() - started)
    return cold, statistics.median(cached)


def summary(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:<34}{len(ms):>4}  p50 {statistics.median(ms):7.2f} ms  "
        f"p95 {c.percentile(ms, 0.95):7.2f} ms  max {max(ms):7.2f} ms"
    )


async def main(args: argparse.Namespace) -> int:
    from mailgw_sandbox.upstream import Dovecot

    work_dir = Path(tempfile.mkdtemp(prefix="bench-login-"))
    sandbox, app, _ = await c.start_sandbox(work_dir / "sandbox")
    dovecot = Dovecot()
    process = None
    try:
        await asyncio.to_thread(dovecot.start)
        dovecot_users = [f"bench{n}" for n in range(args.accounts)]
        for name in dovecot_users:
            dovecot.add_user(name, c.PASSWORD)
        port = c.free_port()
        config = c.write_yaml(
            work_dir / "gateway.yaml",
            gateway_config(sandbox, app, work_dir / "state", port, args.accounts),
        )
        with open(work_dir / "gateway.log", "ab") as log_file:  # the child keeps its own descriptor
            process = await c.start_gateway(config, log_file)
        await c.wait_for_banner(port, process, 60, expect=b"* OK", goodbye=b"x LOGOUT\r\n")
        gateway_users = [c.USERNAME] + [f"user{n}" for n in range(1, args.accounts)]

        async def measure(port: int, users: list[str]) -> tuple[list[float], list[float]]:
            first = [await asyncio.to_thread(login_seconds, port, u, c.PASSWORD) for u in users]
            repeat = [
                await asyncio.to_thread(login_seconds, port, users[0], c.PASSWORD)
                for _ in range(args.repeats)
            ]
            return first, repeat

        gw_first, gw_repeat = await measure(port, gateway_users)
        dc_first, dc_repeat = await measure(dovecot.imap_port, dovecot_users)
        cold, cached = await gate_alone()
    finally:
        if process is not None:
            await c.stop_child(process)
        await asyncio.to_thread(dovecot.stop)
        await sandbox.stop()

    ratio = statistics.median(gw_repeat) / statistics.median(dc_repeat)
    print(
        f"IMAP LOGIN latency, each login on a new connection, loopback, no TLS "
        f"({args.accounts} accounts, {args.repeats} repeats)"
    )
    print(summary("gateway first login (scrypt+view)", gw_first))
    print(summary("gateway repeat login (cache)", gw_repeat))
    print(summary("Dovecot first login", dc_first))
    print(summary("Dovecot repeat login", dc_repeat))
    print(f"ratio gateway/Dovecot, repeat login p50: {ratio:.2f}x")
    print(
        f"login gate alone (this process): scrypt 2**15 check {cold * 1000:.1f} ms, "
        f"cached {cached * 1e6:.1f} µs"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    c.run(main, parser.parse_args())
