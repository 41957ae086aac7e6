"""A fresh sandbox per test, served over real HTTPS on loopback from the session loop.

The sandbox runs on the test loop, so blocking clients (msal, google-auth's requests transport)
must run through ``asyncio.to_thread`` or they would wait forever on a server they are blocking.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.sandbox import Sandbox


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
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
