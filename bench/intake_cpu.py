"""CPU per accepted message of the gateway's SMTP intake, a figure the machine's load moves
little (issue 13): the gateway process's CPU time during the burst divided by the messages.

    .venv/bin/python bench/intake_cpu.py [--messages 800] [--rounds 3] [--deliver]
                                         [--profile DIR] [--perf DIR]

The same clients and messages as ``smtp_throughput.py`` (16 connections, AUTH PLAIN once, 10 KB
messages) against a gateway child (``_gateway_profile.py``) whose spool holds every delivery
while the burst lasts, so what is measured is the intake alone; ``--deliver`` lets the worker
deliver to the sandbox's Graph as configured, as the throughput bench does. ``--profile DIR``
runs the loop's thread under cProfile (slower, so its rates mean nothing) and prints the top
functions by their own time and by cumulative time of each round; its stats stay in DIR.
``--perf DIR`` records the gateway process (all threads, kernel included) with ``perf record
-g`` during the burst: the place to see system time (file creation, fsync, sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c
from smtp_throughput import Round, build_message, run_clients, sink_round


async def _round(
    number: int, messages: list[bytes], args: argparse.Namespace, work_dir: Path, sandbox, app
) -> Round:
    """One gateway from a fresh start."""
    round_dir = work_dir / f"round-{number}"
    round_dir.mkdir()
    port = c.free_port()
    config = c.write_yaml(
        round_dir / "gateway.yaml", c.gateway_config(sandbox, app, round_dir / "state", port)
    )
    command = [sys.executable, str(c.BENCH / "_gateway_profile.py"), str(config)]
    if args.deliver:
        command.append("--deliver")
    if args.profile:
        command += ["--profile", str(Path(args.profile) / f"round-{number}.prof")]
    with open(round_dir / "gateway.log", "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            *command, env=c.child_env(), cwd=str(c.ROOT), stdout=log_file, stderr=log_file
        )
        try:
            await c.wait_for_banner(port, process, 60)
            async with _perf(args.perf, number, process.pid):
                result = await run_clients(
                    "gateway", port, messages, args.clients, args.timeout, process.pid
                )
        finally:
            await c.stop_child(process)
    for error in result.errors[:3]:
        print(f"  round {number} error: {error}")
    return result


@contextlib.asynccontextmanager
async def _perf(directory: str | None, number: int, pid: int) -> AsyncIterator[None]:
    """``perf record -g`` of the gateway's process (every thread, kernel included) while the
    body runs, into ``directory/round-N.data`` (none without a directory)."""
    if directory is None:
        yield
        return
    output = Path(directory) / f"round-{number}.data"
    perf = await asyncio.create_subprocess_exec(
        *("perf", "record", "-F", "1999", "-g", "-p", str(pid), "-o", str(output)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)  # perf is attached (it prints nothing to wait for)
    try:
        yield
    finally:
        perf.send_signal(signal.SIGINT)
        await perf.wait()
        print(f"round {number}: perf data in {output} (perf report -i {output} --no-children)")


def _line(name: str, r: Round, messages: int) -> str:
    """CPU per accepted message: the process's (user + system), and its main thread's (the
    event loop's) user and system parts."""
    accepted = len(r.latencies)
    if not accepted:
        return f"{name:<8} nothing accepted"

    def ms(seconds: float) -> str:
        return f"{seconds / accepted * 1000:5.2f}"

    user, system = r.server_times
    main_user, main_system = r.server_main_times
    return (
        f"{name:<8} {accepted:>5}/{messages:<5} {accepted / r.wall:>7.1f} {r.server_cpu:>6.2f} "
        f"{r.wall:>6.2f}  {ms(user + system):>6} {ms(user):>6} {ms(system):>6}  "
        f"{ms(main_user):>6} {ms(main_system):>6}"
    )


def _print_profile(path: Path, lines: int) -> None:
    for order in ("tottime", "cumulative"):
        print(f"--- {path.name}, by {order}")
        pstats.Stats(str(path)).strip_dirs().sort_stats(order).print_stats(lines)


async def main(args: argparse.Namespace) -> int:
    messages = [build_message(i, args.size, f"{int(time.time())}") for i in range(args.messages)]
    work_dir = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    for directory in (args.profile, args.perf):
        if directory:
            await asyncio.to_thread(Path(directory).mkdir, parents=True, exist_ok=True)
    sandbox, app, _ = await c.start_sandbox(work_dir / "sandbox")
    sinks: list[Round] = []
    gateways: list[Round] = []
    try:
        for number in range(1, args.rounds + 1):
            sinks.append(await sink_round(messages, args))
            gateways.append(await _round(number, messages, args, work_dir, sandbox, app))
    finally:
        await sandbox.stop()
        if not args.keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    mode = "delivering as configured" if args.deliver else "deliveries held"
    print(
        f"\nIntake CPU: {args.messages} messages of {len(messages[0])} bytes, {args.clients} "
        f"clients, {mode}; CPU in ms per accepted message (process: all; loop: main thread)"
    )
    print(
        f"{'':<8} {'accepted':>11} {'msg/s':>7} {'CPU s':>6} {'wall s':>6}  {'all':>6} "
        f"{'user':>6} {'sys':>6}  {'loop u':>6} {'loop s':>6}"
    )
    for sink, gateway in zip(sinks, gateways, strict=True):
        print(_line("sink", sink, args.messages))
        print(_line("gateway", gateway, args.messages))

    def median_ms(runs: list[Round]) -> float:
        return statistics.median(r.server_cpu / max(1, len(r.latencies)) * 1000 for r in runs)

    print(
        f"median CPU per accepted message: gateway {median_ms(gateways):.2f} ms, "
        f"sink {median_ms(sinks):.2f} ms"
    )
    if args.profile:
        for number in range(1, args.rounds + 1):
            _print_profile(Path(args.profile) / f"round-{number}.prof", args.lines)
    return 0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=800)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--size", type=int, default=10 * 1024, help="bytes per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300, help="socket timeout, seconds")
    parser.add_argument("--deliver", action="store_true", help="deliveries during the burst")
    parser.add_argument("--profile", help="directory for the loop thread's cProfile stats")
    parser.add_argument("--perf", help="directory for perf record data of the gateway process")
    parser.add_argument("--lines", type=int, default=40, help="--profile: functions printed")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args()


if __name__ == "__main__":
    c.run(main, _arguments())
