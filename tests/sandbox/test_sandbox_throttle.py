"""The sandbox's per-mailbox limits: Graph's requests per period per app and mailbox, Gmail's
quota units per user, set through the control API, and the per-mailbox request counts."""

from __future__ import annotations

import ssl

import httpx

from mailgw_sandbox import Sandbox

CONTROL = {"X-Sandbox-Control": "1"}


def bearer(sandbox: Sandbox, provider: str, address: str, scopes: set[str]) -> dict[str, str]:
    client_id = sandbox.add_app(provider).client_id  # type: ignore[arg-type]
    grant = sandbox.directory.issue("access", provider, client_id, address, scopes)  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {grant.token}"}


async def test_graph_limits_requests_per_mailbox_and_counts_requests_during_a_pause(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    sandbox.add_user("microsoft", "busy@contoso.example")
    sandbox.add_user("microsoft", "calm@contoso.example")
    busy = bearer(sandbox, "microsoft", "busy@contoso.example", {"Mail.Read"})
    calm = bearer(sandbox, "microsoft", "calm@contoso.example", {"Mail.Read"})
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        refused = await client.put(
            "/_sandbox/throttle",
            json={"provider": "microsoft", "limit": 0, "period_seconds": 5},
            headers=CONTROL,
        )
        assert refused.status_code == 400 and "limit must be" in refused.json()["error"]
        configured = await client.put(
            "/_sandbox/throttle",
            json={"provider": "microsoft", "limit": 3, "period_seconds": 30},
            headers=CONTROL,
        )
        assert configured.status_code == 200
        answers = [await client.get("/v1.0/me/messages", headers=busy) for _ in range(8)]
        other = await client.get("/v1.0/me/messages", headers=calm)
        stats = (await client.get("/_sandbox/stats", headers=CONTROL)).json()["mailboxes"]
    assert [a.status_code for a in answers] == [200] * 3 + [429] * 5
    error = answers[3].json()["error"]
    assert error["code"] == "ApplicationThrottled"
    assert 25 < float(answers[3].headers["Retry-After"]) <= 30  # the rest of the period
    assert other.status_code == 200  # the limit is per mailbox
    # After the first 429, three requests may have been on the wire already; the fourth was not.
    assert stats["busy@contoso.example"] == {
        "requests": 8,
        "throttled": 5,
        "during_pause": 1,
        "in_flight_at_pause": 3,
    }
    assert stats["calm@contoso.example"]["requests"] == 1


async def test_gmail_charges_quota_units_per_user_and_answers_without_retry_after(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    sandbox.add_user("google", "quota@example.com")
    token = bearer(
        sandbox, "google", "quota@example.com", {"https://www.googleapis.com/auth/gmail.readonly"}
    )
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        await client.put(
            "/_sandbox/throttle",
            json={"provider": "google", "limit": 12, "period_seconds": 60},
            headers=CONTROL,
        )
        # messages.list costs 5 units, getProfile 1: 5 + 5 + 1 fit in 12, a third list does not.
        answers = [
            await client.get(path, headers=token)
            for path in (
                "/gmail/v1/users/me/messages",
                "/gmail/v1/users/me/messages",
                "/gmail/v1/users/me/profile",
                "/gmail/v1/users/me/messages",
            )
        ]
        await client.put(
            "/_sandbox/throttle",
            json={"provider": "google", "limit": 1, "period_seconds": 60, "status": 403},
            headers=CONTROL,
        )
        first = await client.get("/gmail/v1/users/me/profile", headers=token)
        as_403 = await client.get("/gmail/v1/users/me/profile", headers=token)
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    reason = answers[3].json()["error"]["errors"][0]["reason"]
    assert reason == "userRateLimitExceeded" and "Retry-After" not in answers[3].headers
    assert first.status_code == 200
    assert as_403.status_code == 403
    assert as_403.json()["error"]["errors"][0]["reason"] == "userRateLimitExceeded"
