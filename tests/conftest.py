"""Test harness: one session-wide asyncio loop with Twisted's reactor on it, and a gateway.

The reactor can be installed only once per process and stays bound to its loop, so every async
test and fixture shares the session loop created by the same function production uses.
Blocking clients (smtplib, imaplib, poplib, subprocesses) must run through ``asyncio.to_thread``
inside async tests, or they would stall the very loop that serves them.
"""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.runtime import new_loop_with_reactor
from mailgw_sandbox import Sandbox
from mailgw_sandbox.postgres import INSTALL_HINT as PG_INSTALL_HINT
from mailgw_sandbox.postgres import PostgresServer, postgres_bin
from tests.helpers import base_config

TESTS = Path(__file__).parent


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict:
    return {"reactor": new_loop_with_reactor}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    integration = TESTS / "integration"
    for item in items:
        if integration in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config dict (or base_config with overrides) to a file and return its path."""

    def write(config: dict | None = None, name: str = "config.yaml", **overrides: Any) -> Path:
        path = tmp_path / name
        data = config if config is not None else base_config(tmp_path / "state", **overrides)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
async def gateway(write_config: Callable[..., Path]) -> AsyncIterator[Any]:
    """A gateway running in-process on the test loop, on free loopback ports, temp state dir."""
    from gateway.app import Gateway
    from gateway.config import load_settings

    running = Gateway(load_settings(write_config()))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """A fresh sandbox (fake Microsoft 365 + Google) over real HTTPS on loopback.

    It serves from the test loop, so blocking clients (msal, google-auth's requests transport)
    must run through ``asyncio.to_thread`` or they would wait on a server they are blocking.
    """
    running = Sandbox(tmp_path / "sandbox")
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
def sandbox_tls(sandbox: Sandbox) -> ssl.SSLContext:
    """Client TLS context that trusts exactly the sandbox's CA (use with httpx: verify=...)."""
    return ssl.create_default_context(cafile=sandbox.ca_file)


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    """A stream for ``configure_logging(..., stream)``; the root logger is restored after."""
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    levels = {name: logging.getLogger(name).level for name in ("mail.log", "twisted")}
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL on 127.0.0.1 for the session (initdb in a temporary directory).

    Missing binaries fail the test rather than skip it: a green run means PostgreSQL ran.
    """
    if postgres_bin() is None:
        pytest.fail(f"PostgreSQL is not installed: {PG_INSTALL_HINT}", pytrace=False)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a new, empty database on the session's PostgreSQL (not migrated)."""
    return postgres.new_database()
