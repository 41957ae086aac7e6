"""Config reload of a running ``gateway run`` process: SIGHUP and ``gateway reload``.

A real process, real signals and real IMAP clients: a changed password works on connections
opened after the reload while an open session keeps working; a broken file changes nothing.
"""

from __future__ import annotations

import asyncio
import imaplib
import signal
import smtplib
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from gateway.passwords import hash_password
from mailgw_sandbox.upstream import Dovecot, MailUser, Postfix
from tests.helpers import PASSWORD, PASSWORD_HASH, base_config, running_gateway
from tests.integration.test_cli import GatewayProcess, gateway_cli

NEW_PASSWORD = "a-new-password-after-reload"


def _with_upstream_reader(dovecot: Dovecot, user: MailUser):  # type: ignore[no-untyped-def]
    """An account ``legacy`` whose INBOX is the Dovecot user's (an IMAP session can stay open
    without any cloud)."""

    def configure(config: dict) -> None:
        config["accounts"].append(
            {
                "username": "legacy",
                "password_hash": config["accounts"][0]["password_hash"],
                "provider": "upstream",
                "address": "legacy@upstream.test",
                "upstream": {
                    "imap": {
                        "host": "localhost",
                        "port": dovecot.imap_port,
                        "security": "starttls",
                        "username": user.name,
                        "password": user.password,
                        "ca_file": str(dovecot.ca_file),
                    }
                },
            }
        )

    return configure


@pytest.fixture
def running(tmp_path: Path, dovecot: Dovecot, upstream_user: MailUser) -> Iterator[GatewayProcess]:
    process = GatewayProcess(
        tmp_path, tmp_path / "state", configure=_with_upstream_reader(dovecot, upstream_user)
    )
    process.start()
    yield process
    process.kill()


def _imap(process: GatewayProcess) -> imaplib.IMAP4_SSL:
    ca = process.config.parent / "state" / "tls" / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca))
    return imaplib.IMAP4_SSL("localhost", process.ports["imaps"], ssl_context=context, timeout=30)


def _login(process: GatewayProcess, password: str) -> imaplib.IMAP4_SSL:
    client = _imap(process)
    client.login("legacy", password)
    return client


def _refused(process: GatewayProcess, password: str) -> bool:
    client = _imap(process)
    try:
        client.login("legacy", password)
    except imaplib.IMAP4.error:
        return True
    finally:
        client.shutdown()
    return False


def _edit_config(process: GatewayProcess, change) -> None:  # type: ignore[no-untyped-def]
    config = yaml.safe_load(process.config.read_text())
    change(config)
    process.config.write_text(yaml.safe_dump(config))


def _wait_for_log(process: GatewayProcess, marker: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = process.log.read_text()
        if marker in log:
            return log
        assert process.proc is not None and process.proc.poll() is None, log
        time.sleep(0.1)
    raise AssertionError(f"no {marker!r} in the log:\n{process.log.read_text()}")


def _set_password(config: dict, password: str) -> None:
    (legacy,) = [a for a in config["accounts"] if a["username"] == "legacy"]
    legacy["password_hash"] = hash_password(password, log2_n=10)


def test_sighup_applies_a_changed_password_and_keeps_open_sessions(
    running: GatewayProcess,
) -> None:
    session = _login(running, PASSWORD)
    assert session.select("INBOX")[0] == "OK"
    _edit_config(running, lambda config: _set_password(config, NEW_PASSWORD))
    assert running.proc is not None
    running.proc.send_signal(signal.SIGHUP)
    log = _wait_for_log(running, "event=gateway.reloaded")
    assert "changed_accounts=legacy" in log
    assert running.proc.poll() is None  # SIGHUP no longer stops the gateway
    # The session opened before the reload goes on working on the same connection.
    assert session.noop()[0] == "OK"
    assert session.select("INBOX")[0] == "OK"
    # New connections: the new password works, the old one (cached as verified) does not.
    fresh = _login(running, NEW_PASSWORD)
    assert fresh.select("INBOX")[0] == "OK"
    fresh.logout()
    assert _refused(running, PASSWORD)
    assert session.logout()[0] == "BYE"


def test_sighup_with_a_broken_config_keeps_the_running_one(running: GatewayProcess) -> None:
    def break_it(config: dict) -> None:
        _set_password(config, NEW_PASSWORD)  # would apply, were the file valid
        config["smtp"] = {"max_recipients": "many"}
        config["accounts"][0]["provider"] = "yahoo"

    _edit_config(running, break_it)
    assert running.proc is not None
    running.proc.send_signal(signal.SIGHUP)
    log = _wait_for_log(running, "event=gateway.reload_refused")
    assert "problems=2" in log
    assert "key=smtp.max_recipients" in log and "key=accounts[0].provider" in log
    assert f"file={running.config}" in log and "line=" in log and "fix=" in log
    assert "event=gateway.reloaded" not in log
    assert running.proc.poll() is None
    # The old config is in force: the old password works, the new one does not.
    _login(running, PASSWORD).logout()
    assert _refused(running, NEW_PASSWORD)


def test_reload_command_signals_the_gateway_of_the_state_dir(running: GatewayProcess) -> None:
    _edit_config(running, lambda config: config.setdefault("smtp", {}).update(max_recipients=7))
    result = gateway_cli("reload", "-c", str(running.config))
    assert result.returncode == 0, result.stderr
    assert "sent SIGHUP to process" in result.stdout
    log = _wait_for_log(running, "event=gateway.reloaded")
    assert "changed_accounts=-" in log
    running.stop()
    stopped = gateway_cli("reload", "-c", str(running.config))
    assert stopped.returncode == 1 and "no running gateway found" in stopped.stderr


def test_reload_names_the_settings_that_need_a_restart(running: GatewayProcess) -> None:
    _edit_config(running, lambda config: config.update(hostname="mx.example.org"))
    assert running.proc is not None
    running.proc.send_signal(signal.SIGHUP)
    log = _wait_for_log(running, "event=gateway.reloaded")
    assert "event=gateway.reload_needs_restart key=hostname" in log


async def test_reload_sends_mail_held_for_a_wrong_upstream_password_at_once(
    postfix: Postfix, upstream_user: MailUser, tmp_path: Path
) -> None:
    """The 'fix it and reload' of the held message is true: after the reload the held mail
    goes out at once, not at its next scheduled attempt (15 minutes later)."""
    token = uuid.uuid4().hex
    config = base_config(tmp_path / "state")
    smtp_server = {
        "host": "localhost",
        "port": postfix.submission_port,
        "security": "starttls",
        "username": upstream_user.name,
        "password": "not-the-password",
        "ca_file": str(postfix.ca_file),
    }
    address = f"{upstream_user.name}@upstream.test"
    config["accounts"].append(
        {
            "username": "legacy",
            "password_hash": PASSWORD_HASH,
            "provider": "upstream",
            "address": address,
            "upstream": {"smtp": smtp_server},
        }
    )
    path = tmp_path / "gateway.yaml"
    async with running_gateway(config, path) as gateway:

        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", gateway.ports["smtp"], timeout=30) as client:
                client.login("legacy", PASSWORD)
                message = f"From: {address}\r\nSubject: held {token}\r\n\r\nbody\r\n"
                client.sendmail(address, ["someone@elsewhere.example"], message.encode())

        await asyncio.to_thread(submit)
        await _until(lambda: [m.state for m in gateway.spool.messages()] == ["held"])
        (held,) = gateway.spool.messages()
        assert "then `gateway reload`" in held.reason
        smtp_server["password"] = upstream_user.password
        await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
        assert await gateway.reload()
        await _until(lambda: gateway.spool.messages() == [])
        (logged,) = await gateway.spool.recent_deliveries()
        assert logged["result"] == "sent"
    uids = await asyncio.to_thread(postfix.wait_for_delivery, "header", "Subject", f"held {token}")
    assert len(uids) == 1


async def _until(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


async def test_reload_applies_the_spool_settings(tmp_path: Path) -> None:
    """The spool's retry and intake-hold settings take effect on reload, without a restart
    (reload names the settings that would need one, and these are not among them)."""
    config = base_config(tmp_path / "state")
    path = tmp_path / "gateway.yaml"
    async with running_gateway(config, path) as gateway:
        assert (gateway.spool.max_defer, gateway.spool.max_backoff) == (1.0, 3600.0)
        config["spool"] = {"hold_for_intake_ms": 0, "max_backoff_minutes": 5}
        await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
        assert await gateway.reload()
        assert (gateway.spool.max_defer, gateway.spool.max_backoff) == (0.0, 300.0)
