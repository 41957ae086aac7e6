"""An INBOX served from PostgreSQL while PostgreSQL goes away and comes back (issue 16).

An IMAP client with a selected INBOX keeps its session: commands that need the database answer
``NO`` with a sentence (never a BYE, never a traceback), and once PostgreSQL is back a message
that arrived meanwhile is shown. Its own PostgreSQL server, stopped and started by this test.
"""

from __future__ import annotations

import asyncio
import imaplib
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailgw_sandbox import Sandbox
from mailgw_sandbox.postgres import PostgresServer
from tests.helpers import (
    CLOUD_ACCOUNTS,
    InboxSeeder,
    imap_starttls_login,
    running_cluster,
    sandbox_config,
    serve_without_consent,
)

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)


def _exists(client: imaplib.IMAP4) -> int:
    typ, data = client.noop()
    assert typ == "OK", data
    typ, data = client.uid("SEARCH", "ALL")
    assert typ == "OK", data
    return len(data[0].split())


async def test_an_imap_session_outlives_a_postgresql_outage(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")
    config, _ = sandbox_config(sandbox, tmp_path / "a")
    serve_without_consent(sandbox, config, tmp_path)
    config["reading"] = {"poll_seconds": 1}
    account, address = CLOUD_ACCOUNTS["microsoft"]
    user = sandbox.directory.user(address)
    assert user is not None
    seed = InboxSeeder(sandbox, user, T0)
    seed("before")
    with PostgresServer() as own:
        async with running_cluster(config, tmp_path, own.new_database(), count=1) as (gateway,):
            cafile = str(gateway.settings.state_dir / "tls/ca.crt")
            client = await asyncio.to_thread(
                imap_starttls_login, gateway.ports["imap"], cafile, account
            )
            try:
                await asyncio.to_thread(client.select, "INBOX")
                assert await asyncio.to_thread(_exists, client) == 1
                await asyncio.to_thread(own.stop)
                seed("during")
                answers = []
                for _ in range(3):  # polls and commands while the database is gone
                    typ, data = await asyncio.to_thread(client.noop)
                    answers.append((typ, data))
                    await asyncio.sleep(1.0)
                assert all(typ in ("OK", "NO") for typ, _ in answers), answers
                typ, data = await asyncio.to_thread(client.uid, "FETCH", "1", "(UID FLAGS)")
                assert typ in ("OK", "NO"), data
                await asyncio.to_thread(own.restart_after)
                seen = [0]

                async def shown() -> bool:
                    try:
                        seen[0] = await asyncio.to_thread(_exists, client)
                    except AssertionError:
                        return False
                    return seen[0] == 2

                deadline = asyncio.get_running_loop().time() + 60
                while not await shown():
                    assert asyncio.get_running_loop().time() < deadline, seen
                    await asyncio.sleep(0.5)
            finally:
                await asyncio.to_thread(client.logout)
    events = [r.getMessage() for r in caplog.records]
    assert events.count("mailbox.poll_failed") == 1, events  # one line per outage, not per poll
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors
