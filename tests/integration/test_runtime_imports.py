"""The product never loads the provider sandbox: a real ``gateway run`` reports its modules.

The sandbox (``mailgw_sandbox``, its own distribution in sandbox/) is for the demo and the tests;
the wheel and the Docker image do not carry it, so a runtime import of it would break every
installation. The child process runs the real CLI in-process under a tiny wrapper that, at exit,
prints which sandbox modules ended up in ``sys.modules``, and whether the sandbox was importable
at all (else an empty list would prove nothing).
"""

from __future__ import annotations

import imaplib
import json
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.cli import SANDBOX_PACKAGE
from mailgw_sandbox.upstream import free_ports
from tests.helpers import PASSWORD, base_config

LISTENERS = ("smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "admin")
REPORT = "sandbox-report "
WRAPPER = f"""
import atexit, importlib.util, json, sys
from gateway.cli import main

def report():
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] == {SANDBOX_PACKAGE!r})
    findable = importlib.util.find_spec({SANDBOX_PACKAGE!r}) is not None
    print({REPORT!r} + json.dumps({{"loaded": loaded, "findable": findable}}), flush=True)

atexit.register(report)
sys.exit(main(sys.argv[1:]))
"""


def _wait_until_serving(proc: subprocess.Popen, admin_port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"gateway did not come up:\n{log.read_text()}")


def _use_every_front(ports: dict[str, int]) -> None:
    """Sessions and a login reach code that a bare start does not (login gate, mailbox source)."""
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as smtp:
        assert smtp.ehlo()[0] == 250
    with imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=10) as imap:
        imap.starttls()
        # The right password passes the login gate; the never-connected mailbox is then refused.
        with pytest.raises(imaplib.IMAP4.error, match="has not been connected yet"):
            imap.login("crm", PASSWORD)
    with socket.create_connection(("127.0.0.1", ports["pop3"]), timeout=10) as pop3:
        assert pop3.recv(200).startswith(b"+OK")


def test_gateway_run_loads_no_sandbox_module(tmp_path: Path) -> None:
    ports = dict(zip(LISTENERS, free_ports(len(LISTENERS)), strict=True))
    config = base_config(tmp_path / "state")
    config["listeners"] = {f"{name}_port": port for name, port in ports.items()}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "gateway.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, "run", "-c", str(path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        _wait_until_serving(proc, ports["admin"], log)
        _use_every_front(ports)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    (line,) = [line for line in output.splitlines() if line.startswith(REPORT)]
    report = json.loads(line.removeprefix(REPORT))
    assert report["findable"], "the sandbox is not installed here: this check would prove nothing"
    assert report["loaded"] == [], f"`gateway run` imported the sandbox: {report['loaded']}"
