"""The service files an admin installs: the systemd unit and the Docker image's settings."""

from __future__ import annotations

import configparser
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.spool import FileSpool

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "mail-gateway.service"
DOCKERFILE = REPO / "Dockerfile"
SEND_GRACE = inspect.signature(FileSpool.stop).parameters["grace"].default


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit.parent,
    )


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify also checks that ExecStart's program exists: the copy runs this venv's gateway.
    Warnings (an unknown key, a bad value) go to stderr with exit 0, so stderr must be empty."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: run scripts/install-test-deps.sh (systemd)")
    gateway = Path(sys.executable).parent / "gateway"
    assert gateway.exists()
    text = UNIT.read_text()
    assert "ExecStart=/opt/mail-gateway/bin/gateway run" in text
    copy = tmp_path / "mail-gateway.service"
    copy.write_text(text.replace("/opt/mail-gateway/bin/gateway", str(gateway)))
    result = _verify(copy)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    broken = tmp_path / "broken.service"  # the check does notice a mistyped directive
    broken.write_text(copy.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "Unknown key 'NoNewPrivilege'" in _verify(broken).stderr


def test_systemd_unit_hardening_and_stop_timeout() -> None:
    service = _unit()["Service"]
    assert service["User"] not in ("", "root") and service["Group"] not in ("", "root")
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert int(service["LimitNOFILE"]) >= 4096
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    # Sends in flight get SEND_GRACE seconds after SIGTERM; SIGKILL must not cut them off.
    assert _seconds(service["TimeoutStopSec"]) >= SEND_GRACE + 15
    state = service["ReadWritePaths"]
    assert state == f"/var/lib/{service['StateDirectory']}"
    environment = dict(re.findall(r"(\w+)=(\S+)", service["Environment"]))
    assert environment["GATEWAY_CONFIG"] == "/etc/mail-gateway/config.yaml"
    readme = (REPO / "README.md").read_text()
    assert f"state_dir: {state}" in readme  # the install steps put state where it may write
    assert "contrib/systemd/mail-gateway.service" in readme


def test_docker_image_stops_gracefully_and_keeps_state_in_its_volume() -> None:
    text = DOCKERFILE.read_text()
    instructions = {
        line.split()[0]: line.split(maxsplit=1)[1]
        for line in text.splitlines()
        if line and not line.startswith(("#", " "))
    }
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert instructions["USER"] == "gateway"
    assert 'VOLUME ["/var/lib/gateway"]' in text
    assert "GATEWAY_STATE_DIR=/var/lib/gateway" in text  # a copied example's ./state is not used
    # Docker's default stop timeout (10 s) is shorter than the send grace: the run line says more.
    timeout = re.search(r"--stop-timeout (\d+)", text)
    assert timeout and int(timeout.group(1)) >= SEND_GRACE + 15
    assert "chown 10001:10001" in text  # the bind-mount ownership step
