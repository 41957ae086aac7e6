"""The sandbox's shared parts: HTTPS with its own CA, the control API, fault injection."""

from __future__ import annotations

import ssl

import httpx
import pytest

from mailgw_sandbox import Fault, Sandbox

CONTROL = {"X-Sandbox-Control": "1"}


async def test_https_is_verified_against_the_sandbox_ca(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext
) -> None:
    async with httpx.AsyncClient(verify=sandbox_tls) as client:
        response = await client.get(f"{sandbox.url}/_sandbox/stats", headers=CONTROL)
    assert response.status_code == 200
    async with httpx.AsyncClient(verify=ssl.create_default_context()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{sandbox.url}/_sandbox/stats", headers=CONTROL)


async def test_control_api_needs_its_header(sandbox: Sandbox, sandbox_tls: ssl.SSLContext) -> None:
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        refused = await client.post("/_sandbox/users", json={"provider": "google"})
        bad = await client.post("/_sandbox/users", json={"provider": "yahoo"}, headers=CONTROL)
        created = await client.post(
            "/_sandbox/users",
            json={"provider": "microsoft", "address": "adele@contoso.example"},
            headers=CONTROL,
        )
    assert refused.status_code == 403
    assert bad.status_code == 400 and "provider must be one of" in bad.json()["error"]
    assert created.status_code == 201
    assert created.json()["display_name"] == "Adele"
    assert sandbox.directory.user("ADELE@contoso.example") is not None


@pytest.mark.parametrize(
    ("target", "path"),
    [("graph", "/v1.0/me"), ("gmail", "/gmail/v1/users/me/profile")],
)
async def test_faults_answer_like_the_cloud_then_clear(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext, target: str, path: str
) -> None:
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        await client.post(
            "/_sandbox/faults",
            json={"target": target, "kind": "429", "count": 2, "retry_after": "1.5"},
            headers=CONTROL,
        )
        first = await client.get(path)
        second = await client.get(path)
        third = await client.get(path)
        stats = (await client.get("/_sandbox/stats", headers=CONTROL)).json()
    for throttled in (first, second):
        assert throttled.status_code == 429
        assert throttled.headers["Retry-After"] == "1.5"
    assert "error" in first.json()
    assert third.status_code != 429
    assert stats["requests"][target] == 3


async def test_connection_reset_fault(sandbox: Sandbox, sandbox_tls: ssl.SSLContext) -> None:
    sandbox.faults.add(Fault("graph", "reset"))
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as client:
        with pytest.raises(httpx.TransportError):
            await client.get("/v1.0/me")
