"""Issue 10 point 4, scaled down: a burst into a mailbox whose provider limits it per period.

Real SMTP clients submit a burst to the gateway; the sandbox's Graph allows the mailbox 50
requests per 1.5 s period (set through its control API) and answers the rest 429 with a
Retry-After. The gateway must pause the mailbox, not hammer it: every message goes out exactly
once, with at most 10 % more requests than messages, and none arrives while a Retry-After the
mailbox was given is still running (the sandbox counts both).
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
import time
from collections import Counter
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import httpx

from mailgw_sandbox import Sandbox
from tests.helpers import (
    MS_ADDRESS,
    PASSWORD,
    running_gateway,
    sandbox_config,
    serve_without_consent,
)

MESSAGES = 300
CLIENTS = 4
LIMIT, PERIOD = 50, 1.5
CONTROL = {"X-Sandbox-Control": "1"}


def submit(port: int, message_ids: list[str]) -> None:
    """One SMTP session submitting a message per id (a legacy program's burst)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.login("crm", PASSWORD)
        for message_id in message_ids:
            message = EmailMessage()
            message["From"] = MS_ADDRESS
            message["To"] = "alice@example.org"
            message["Subject"] = "burst"
            message["Message-ID"] = message_id
            message.set_content("One of many.\n")
            client.send_message(message)


async def test_a_burst_into_a_throttled_mailbox_is_delivered_once_without_a_storm(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    serve_without_consent(sandbox, config, tmp_path)
    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=sandbox.ca_file), base_url=sandbox.url
    ) as control:
        answer = await control.put(
            "/_sandbox/throttle",
            json={"provider": "microsoft", "limit": LIMIT, "period_seconds": PERIOD},
            headers=CONTROL,
        )
        assert answer.status_code == 200, answer.text
        user = sandbox.directory.user(MS_ADDRESS)
        assert user is not None
        ids = [make_msgid(domain="burst.test") for _ in range(MESSAGES)]
        async with running_gateway(config, tmp_path / "c.yaml", sandbox) as gateway:
            port = gateway.ports["smtp"]
            shares = [ids[n::CLIENTS] for n in range(CLIENTS)]
            await asyncio.gather(*(asyncio.to_thread(submit, port, share) for share in shares))
            paused_seen = False
            deadline = time.monotonic() + 25
            while len(sandbox.ops(user).sent(user)) < MESSAGES:
                assert time.monotonic() < deadline, f"{len(sandbox.ops(user).sent(user))} sent"
                paused_seen = paused_seen or "crm" in gateway.spool.pauses()
                await asyncio.sleep(0.05)
            while gateway.spool.messages():  # a record leaves only once its send is over:
                assert time.monotonic() < deadline, "the spool did not empty"  # then nothing
                await asyncio.sleep(0.05)  # is in flight, and a duplicate would show by now
            stats = (await control.get("/_sandbox/stats", headers=CONTROL)).json()
    sent = Counter(str(m.raw.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0], "ascii")
                   for m in sandbox.ops(user).sent(user))  # fmt: skip
    assert sorted(sent) == sorted(ids) and set(sent.values()) == {1}, "lost or duplicated"
    counts = stats["mailboxes"][MS_ADDRESS]
    assert counts["throttled"] > 0 and paused_seen, "the limit was never reached"
    assert counts["requests"] <= MESSAGES * 1.1, counts
    assert counts["during_pause"] == 0, counts
