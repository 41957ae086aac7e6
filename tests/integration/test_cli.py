"""The ``gateway`` command as an admin runs it: a real process, real signals, real sockets."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import load_settings
from gateway.passwords import parse_hash, verify_password
from tests.helpers import PASSWORD, PASSWORD_HASH, base_config, free_port

REPO = Path(__file__).resolve().parents[2]
GATEWAY = [sys.executable, "-m", "gateway"]
LISTENERS = ("smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "admin")


EXAMPLE = REPO / "config.example.yaml"
EXAMPLE_HASH = (
    "$scrypt$ln=15,r=8,p=1$FD41NgOlrtNuR4Kfzqy5Tg$0Carnr2QEYijPMFQmqRcT0V1tLTpuUM1tFMhcayBYTQ"
)


def gateway_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GATEWAY, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def _environ_without(*names: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in names and not k.endswith("_PROXY")}
    return {**env, **extra}


def test_check_config_flags_the_examples_published_hashes() -> None:
    """A copy of the example as it is must not serve: its hashes are of "change-me-now"."""
    result = gateway_cli("check-config", str(EXAMPLE))
    assert result.returncode == 2
    assert f"{EXAMPLE}: 4 problems" in result.stderr
    lines = [
        n for n, text in enumerate(EXAMPLE.read_text().splitlines(), 1) if EXAMPLE_HASH in text
    ]
    keys = ["admin.password_hash"] + [f"accounts[{i}].password_hash" for i in range(3)]
    for line, key in zip(lines, keys, strict=True):
        assert f"{EXAMPLE}:{line}: {key}: this is the example's published hash" in result.stderr
    assert result.stderr.count("fix: run `gateway hash-password`") == 4


def _example_copy(tmp_path: Path, password_hash: str = EXAMPLE_HASH) -> Path:
    copy = tmp_path / "config.yaml"
    copy.write_text(EXAMPLE.read_text().replace(EXAMPLE_HASH, password_hash))
    return copy


def test_the_example_with_own_hashes_is_accepted(tmp_path: Path) -> None:
    result = gateway_cli("check-config", str(_example_copy(tmp_path, PASSWORD_HASH)))
    assert result.returncode == 0, result.stderr
    assert "OK (3 accounts" in result.stdout
    assert "note:" not in result.stdout  # its upstream account has an SMTP server


def test_run_refuses_the_examples_published_hash(tmp_path: Path) -> None:
    copy = _example_copy(tmp_path)
    result = subprocess.run(
        [*GATEWAY, "run", "-c", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert f"{copy}:" in result.stderr and "admin.password_hash: this is the example's" in (
        result.stderr
    )
    assert "run `gateway hash-password`, type a password of your own" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_check_config_takes_dash_c_like_every_command(tmp_path: Path) -> None:
    copy = _example_copy(tmp_path, PASSWORD_HASH)
    result = gateway_cli("check-config", "-c", str(copy))
    assert result.returncode == 0, result.stderr
    assert f"{copy}: OK" in result.stdout
    from_env = gateway_cli("check-config", env={**os.environ, "GATEWAY_CONFIG": str(copy)})
    assert from_env.returncode == 0 and f"{copy}: OK" in from_env.stdout
    both = gateway_cli("check-config", str(copy), "-c", str(EXAMPLE))
    assert both.returncode == 2 and "two files given" in both.stderr


def test_state_dir_variable_overrides_the_file(tmp_path: Path) -> None:
    """The Docker image sets GATEWAY_STATE_DIR, so a copied example's ./state is not used."""
    copy = _example_copy(tmp_path, PASSWORD_HASH)
    state = tmp_path / "elsewhere"
    result = gateway_cli(
        "queue", "list", "-c", str(copy), env={**os.environ, "GATEWAY_STATE_DIR": str(state)}
    )
    assert result.returncode == 0, result.stderr
    assert f"no spool at {state / 'spool'}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "usage: gateway"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("queue",), "the following arguments are required: action"),
        (("queue", "delete"), "gateway queue delete: say which message ID"),
        (("queue", "release", "nobody"), "there is no account 'nobody' (accounts: crm, scanner)"),
        (("connect", "nobody"), "there is no account 'nobody' (accounts: crm, scanner)"),
        (("demo", "--first-port", "x"), "not a port number: 'x'"),
    ],
)
def test_bad_usage_exits_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path / "state")))
    needs_config = args[:1] in (("queue",), ("connect",)) and len(args) > 1
    result = gateway_cli(*args, *(("-c", str(path)) if needs_config else ()))
    assert result.returncode == 2, result
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_says_what_it_does() -> None:
    overview = gateway_cli("--help").stdout
    section = overview[overview.index("commands:") :]
    commands = re.findall(r"^    (\S+)", section, re.MULTILINE)
    assert set(commands) >= {
        "run",
        "check-config",
        "health",
        "connect",
        "queue",
        "accounts",
        "demo",
        "hash-password",
    }
    assert "Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage." in overview
    for command in commands:
        text = gateway_cli(command, "--help").stdout
        description = " ".join(text.split("\n\n")[1].split())  # the paragraph after usage
        assert re.match(r"[A-Z].{15,}?[a-z)]\.( |$)", description), (command, description)


def test_check_config_notes_an_account_that_can_only_read(tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    imap = {"host": "mail.example.org", "username": "legacy", "password": "pw"}
    config["accounts"].append(
        {
            "username": "legacy",
            "password_hash": config["accounts"][0]["password_hash"],
            "provider": "upstream",
            "address": "legacy@example.org",
            "upstream": {"imap": imap},
        }
    )
    path = tmp_path / "read-only.yaml"
    path.write_text(yaml.safe_dump(config))
    result = gateway_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK (3 accounts" in result.stdout
    assert "note: account 'legacy' can only read mail: it has no upstream.smtp server" in (
        result.stdout
    )


def test_check_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    config = base_config(tmp_path / "state")
    config["listeners"].update(smtp_port=2525, imap_port=2525, pop3_port="x")
    config["accounts"][0]["password_hash"] = "plain-text-password"
    config["colour"] = "blue"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = gateway_cli("check-config", str(path))
    assert result.returncode == 2
    assert f"{path}: 4 problems" in result.stderr
    for key in ("listeners.imap_port", "listeners.pop3_port", "accounts[0].password_hash"):
        assert f": {key}: " in result.stderr
    assert "colour: unknown key 'colour'" in result.stderr
    assert result.stderr.count("    fix: ") == 4


def test_version() -> None:
    assert gateway_cli("--version").stdout.startswith("gateway 0.")


def test_hash_password_from_stdin_is_accepted_by_the_config(tmp_path: Path) -> None:
    result = gateway_cli("hash-password", stdin="légacy pass\n")
    assert result.returncode == 0
    hashed = result.stdout.strip()
    assert verify_password("légacy pass", parse_hash(hashed))
    config = base_config(tmp_path / "state")
    config["accounts"][0]["password_hash"] = hashed
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert load_settings(path, environ={}).accounts[0].password_hash == hashed
    empty = gateway_cli("hash-password", stdin="\n")
    assert empty.returncode == 2 and "An empty password cannot be hashed." in empty.stderr


def _read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            data += chunk
    return data


def test_hash_password_prompts_twice_without_echo() -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a real terminal, as an admin at a shell
        os.execv(sys.executable, [*GATEWAY, "hash-password"])
    transcript = _read_until(fd, b"Password: ")
    os.write(fd, b"typed secret 42\n")
    transcript += _read_until(fd, b"Repeat password: ")
    os.write(fd, b"typed secret 42\n")
    transcript += _read_until(fd, b"$scrypt$")
    transcript += _read_until(fd, b"\n")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"typed secret 42" not in transcript  # not echoed
    hashed = transcript[transcript.index(b"$scrypt$") :].split()[0].decode()
    assert verify_password("typed secret 42", parse_hash(hashed))


def _distinct_free_ports(count: int) -> list[int]:
    """Ports free a moment ago, all different (held open together while the kernel picks)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class GatewayProcess:
    """``gateway run`` in a child process on fixed free ports, stderr kept for inspection."""

    def __init__(
        self,
        tmp_path: Path,
        state_dir: Path,
        configure: Callable[[dict], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ports = dict(zip(LISTENERS, _distinct_free_ports(len(LISTENERS)), strict=True))
        config = base_config(state_dir)
        config["listeners"] = {f"{name}_port": port for name, port in self.ports.items()}
        if configure is not None:
            configure(config)
        self.config = tmp_path / "run.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp_path / "gateway.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*GATEWAY, "run", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            env=self.env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{self.ports['admin']}/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"gateway did not come up:\n{self.log.read_text()}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=15)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def process(tmp_path: Path):
    running = GatewayProcess(tmp_path, tmp_path / "state")
    yield running
    running.kill()


def _greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.recv(200)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_serves_every_listener_and_stops_cleanly(process: GatewayProcess, signum: int) -> None:
    process.start()
    assert _greeting(process.ports["smtp"]).startswith(b"220 localhost")
    assert _greeting(process.ports["imap"]).startswith(b"* OK [CAPABILITY IMAP4rev1")
    assert _greeting(process.ports["pop3"]).startswith(b"+OK")
    for name in ("smtps", "imaps", "pop3s"):
        socket.create_connection(("127.0.0.1", process.ports[name]), timeout=10).close()
    page = httpx.get(f"http://127.0.0.1:{process.ports['admin']}/login", timeout=10)
    assert page.status_code == 200
    held = socket.create_connection(("127.0.0.1", process.ports["imap"]), timeout=10)
    held.recv(200)
    assert process.stop(signum) == 0  # an open client connection does not hold up the stop
    assert held.recv(200) == b""  # ... it was closed by the gateway
    held.close()
    log = process.log.read_text()
    assert "event=gateway.started" in log and "event=gateway.stopped" in log
    assert f"signal={signal.Signals(signum).name}" in log
    for port in process.ports.values():  # every port was released
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))


def test_restart_keeps_state(process: GatewayProcess, tmp_path: Path) -> None:
    state = tmp_path / "state"
    process.start()
    assert process.stop() == 0
    key, cert = (state / "secret.key").read_bytes(), (state / "tls" / "ca.crt").read_bytes()
    assert (state / "secret.key").stat().st_mode & 0o777 == 0o600
    assert (state / "gateway.db").stat().st_mode & 0o777 == 0o600
    process.start()
    assert process.stop() == 0
    assert (state / "secret.key").read_bytes() == key
    assert (state / "tls" / "ca.crt").read_bytes() == cert
    rows = subprocess.run(
        [sys.executable, "-c", _COUNT_EVENTS, str(state)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert rows.stdout.split() == ["gateway.started=2", "gateway.stopped=2"]


_COUNT_EVENTS = """
import asyncio, sys
from collections import Counter
from pathlib import Path
from gateway.store import SecretBox, load_or_create_key, open_sqlite

async def main(state):
    stores = await open_sqlite(state, SecretBox(load_or_create_key(state)))
    kinds = Counter(e.kind for e in await stores.events.recent_events(100))
    await stores.close()
    print(*(f"{k}={v}" for k, v in sorted(kinds.items())))

asyncio.run(main(Path(sys.argv[1])))
"""


def test_port_in_use_is_a_clear_start_error(process: GatewayProcess) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", process.ports["imaps"]))
        squatter.listen()
        result = subprocess.run(
            [*GATEWAY, "run", "-c", str(process.config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{process.ports['imaps']} for listeners.imaps_port" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_logs_never_contain_passwords(process: GatewayProcess) -> None:
    """Clients send passwords to every front; not one of them reaches the (debug-level) log."""
    process.start()
    secret = PASSWORD.replace(" ", "-")
    with socket.create_connection(("127.0.0.1", process.ports["imap"]), timeout=10) as imap:
        lines = imap.makefile("rb")
        lines.readline()  # greeting
        imap.sendall(f"a1 LOGIN crm {secret}\r\n".encode())
        assert lines.readline().startswith(b"a1 NO")
    with socket.create_connection(("127.0.0.1", process.ports["pop3"]), timeout=10) as pop:
        lines = pop.makefile("rb")
        lines.readline()  # greeting
        pop.sendall(f"USER crm\r\nPASS {secret}\r\n".encode())
        assert lines.readline().startswith(b"+OK")  # USER
        assert lines.readline().startswith(b"-ERR")  # PASS: the answer, not a timed guess
    assert process.stop() == 0
    log = process.log.read_text()
    assert "event=gateway.started" in log
    assert secret not in log


def test_health_command_follows_the_running_gateway(process: GatewayProcess) -> None:
    assert gateway_cli("health", "-c", str(process.config)).returncode == 1  # not started yet
    process.start()
    healthy = gateway_cli("health", "-c", str(process.config))
    assert healthy.returncode == 0 and "healthy" in healthy.stdout
    assert process.stop() == 0
    down = gateway_cli("health", "-c", str(process.config))
    assert down.returncode == 1 and "not healthy" in down.stderr


def test_health_ignores_proxy_settings(process: GatewayProcess) -> None:
    """A proxy for the gateway's outbound traffic must not carry the loopback probe (port 9 is
    discard: a proxy there refuses every connection)."""
    process.start()
    proxied = {
        **os.environ,
        **{name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        **{name.lower(): "http://127.0.0.1:9" for name in ("HTTP_PROXY", "ALL_PROXY")},
    }
    result = gateway_cli("health", "-c", str(process.config), env=proxied)
    assert result.returncode == 0, result.stderr
    assert "healthy" in result.stdout


UPSTREAM_VARIABLE = "GW_TEST_UPSTREAM_PASSWORD"


def _with_upstream_account(config: dict) -> None:
    """An upstream account whose password comes from the environment."""
    server = {"host": "localhost", "username": "legacy", "password": {"env": UPSTREAM_VARIABLE}}
    config["accounts"].append(
        {
            "username": "legacy",
            "password_hash": config["accounts"][0]["password_hash"],
            "provider": "upstream",
            "address": "legacy@example.org",
            "upstream": {"imap": {**server, "port": free_port(), "security": "none"}},
        }
    )


def test_operations_commands_need_no_unused_secrets(tmp_path: Path) -> None:
    """queue, accounts and health work without the upstream password exported; run and
    check-config still insist on it, naming the file, the key and the fix."""
    running = GatewayProcess(
        tmp_path,
        tmp_path / "state",
        configure=_with_upstream_account,
        env=_environ_without(UPSTREAM_VARIABLE, **{UPSTREAM_VARIABLE: "upstream secret"}),
    )
    unset = _environ_without(UPSTREAM_VARIABLE)
    config = str(running.config)
    try:
        running.start()
        health = gateway_cli("health", "-c", config, env=unset)
        assert health.returncode == 0, health.stderr
        queue = gateway_cli("queue", "list", "-c", config, env=unset)
        assert queue.returncode == 0 and "the queue is empty" in queue.stdout, queue.stderr
        accounts = gateway_cli("accounts", "-c", config, env=unset)
        assert accounts.returncode == 0, accounts.stderr
        assert re.search(
            r"^legacy\s+legacy@example.org\s+upstream\s+password server$",
            accounts.stdout,
            re.MULTILINE,
        ), accounts.stdout
        release = gateway_cli("queue", "release", "legacy", "-c", config, env=unset)
        assert release.returncode == 0, release.stderr
    finally:
        running.kill()
    for command in (("check-config", config), ("run", "-c", config)):
        refused = gateway_cli(*command, env=unset)
        assert refused.returncode == 2, refused
        assert (
            f"{config}:" in refused.stderr
            and f"accounts[2].upstream.imap.password: environment variable {UPSTREAM_VARIABLE} "
            "is not set or empty"
            in refused.stderr
        )
        assert f"fix: export {UPSTREAM_VARIABLE}=... before starting the gateway" in (
            refused.stderr
        )
