"""``/metrics`` on the admin listener, read by prometheus_client's own parser after real work:
a message sent through Graph (sandbox, over HTTPS), a failed SMTP login and a message held
for a mailbox that is not connected."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgw_sandbox import Sandbox
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    PASSWORD,
    running_gateway,
    sandbox_config,
    serve_without_consent,
    until,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def gateway(sandbox: Sandbox, tmp_path: Path) -> AsyncIterator[Any]:
    """``crm`` sends through Graph at once (app-only); ``scanner`` (Gmail) is not connected,
    so its mail is held."""
    config, _ = sandbox_config(sandbox, tmp_path / "state")
    serve_without_consent(sandbox, config, tmp_path)
    del config["google"]["service_account_file"]
    async with running_gateway(config, tmp_path / "gateway.yaml") as running:
        yield running


async def scrape(gateway: Any, **headers: str) -> httpx.Response:
    url = f"http://127.0.0.1:{gateway.ports['admin']}/metrics"
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        return await client.get(url, headers=headers)


async def samples(gateway: Any) -> Samples:
    page = await scrape(gateway)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page.text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def submit(port: int, user: str, address: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.login(user, PASSWORD)
        client.sendmail(
            address,
            ["someone@example.net"],
            f"From: {address}\r\nSubject: metrics\r\n\r\nbody\r\n".encode(),
        )


def wrong_login(port: int) -> None:
    """One AUTH PLAIN with a wrong password (smtplib's ``login`` would try PLAIN, then LOGIN)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.user, client.password = "crm", "not the password"
        client.auth("PLAIN", client.auth_plain)


async def test_metrics_count_a_send_a_failed_login_and_a_held_message(
    gateway: Any, sandbox: Sandbox
) -> None:
    before = await samples(gateway)
    smtp = gateway.ports["smtp"]
    await asyncio.to_thread(submit, smtp, "crm", MS_ADDRESS)
    await until(lambda: not gateway.spool.messages(), 20, "the message sent (the queue empty)")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        await asyncio.to_thread(wrong_login, smtp)
    await asyncio.to_thread(submit, smtp, "scanner", GOOGLE_ADDRESS)
    await until(lambda: [m.state for m in gateway.spool.messages()] == ["held"], 20, "held")
    after = await samples(gateway)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("mailgw_sends_total", provider="microsoft", result="sent") == 1
    assert grew("mailgw_sends_total", provider="google", result="held") == 1
    assert grew("mailgw_logins_total", protocol="smtp", result="failed") == 1
    assert grew("mailgw_logins_total", protocol="smtp", result="ok") == 2
    assert grew("mailgw_provider_requests_total", kind="Graph sendMail", status="202") == 1
    assert grew("mailgw_provider_request_duration_seconds_count", kind="Graph sendMail") == 1
    assert grew("mailgw_token_refreshes_total", provider="microsoft", result="ok") >= 1
    assert grew("mailgw_token_refreshes_total", provider="google", result="reauth_required") >= 1
    # Read from this gateway's spool when scraped: one held message, none queued.
    assert value(after, "mailgw_queue_messages", state="held") == 1
    assert value(after, "mailgw_queue_messages", state="queued") == 0
    assert value(after, "mailgw_queue_oldest_age_seconds", state="held") > 0
    assert ("mailgw_open_connections", frozenset({("protocol", "admin")})) in after
    # The page carries no account name or address.
    page = (await scrape(gateway)).text
    assert "crm" not in page and "scanner" not in page and "example" not in page


async def test_metrics_are_not_served_through_a_reverse_proxy(gateway: Any) -> None:
    forwarded = await scrape(gateway, **{"X-Forwarded-For": "203.0.113.7"})
    assert forwarded.status_code == 403
    assert "this machine only" in forwarded.text
