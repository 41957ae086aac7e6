"""Graph ``$batch`` and Gmail batch requests, over real HTTPS against the sandbox: the
sources' batched downloads, the sandbox holding to the services' documented batch rules
(limits, per-item status, base64 bodies, every inner request charged), and a view's
warm-up through them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from gateway import outbound
from gateway.mailbox import MailboxView, crlf_form
from gateway.providers import GmailSource, GraphSource
from gateway.store import SecretBox, open_sqlite
from mailgw_sandbox import Sandbox
from tests.helpers import SandboxTokens

KEY = bytes(range(32))
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class World:
    def __init__(self, sandbox: Sandbox, client: httpx.AsyncClient, provider: str) -> None:
        self.sandbox, self.client, self.provider = sandbox, client, provider
        address = "desk@contoso.example" if provider == "microsoft" else "desk@example.com"
        self.address = address
        self.user = sandbox.add_user(provider, address)  # type: ignore[arg-type]
        self.ops = sandbox.ops(self.user)
        self.tokens = SandboxTokens(sandbox, self.user)
        if provider == "microsoft":
            self.source: GraphSource | GmailSource = GraphSource(
                client, self.tokens, f"{sandbox.url}/v1.0", "desk", address
            )
        else:
            self.source = GmailSource(client, self.tokens, sandbox.url, "desk")

    def seed(self, count: int) -> list[str]:
        ids = []
        for n in range(count):
            raw = f"From: s@example.org\r\nSubject: m{n}\r\n\r\nbody {n}\n".encode()
            ids.append(self.ops.seed_inbox(self.user, raw, received_at=T0 + timedelta(minutes=n)))
        return ids

    def requests(self) -> int:
        return self.sandbox.throttle.stats().get(self.address.casefold(), {}).get("requests", 0)

    async def token(self) -> str:
        return await self.tokens.access_token("desk")


@pytest.fixture(params=["microsoft", "google"])
async def world(sandbox: Sandbox, request: pytest.FixtureRequest) -> AsyncIterator[World]:
    async with outbound.async_client(sandbox.ca_file) as client:
        yield World(sandbox, client, request.param)


@pytest.fixture
async def graph(sandbox: Sandbox) -> AsyncIterator[World]:
    async with outbound.async_client(sandbox.ca_file) as client:
        yield World(sandbox, client, "microsoft")


@pytest.fixture
async def gmail(sandbox: Sandbox) -> AsyncIterator[World]:
    async with outbound.async_client(sandbox.ca_file) as client:
        yield World(sandbox, client, "google")


async def test_batched_downloads_match_single_ones_and_count_each_request(world: World) -> None:
    ids = world.seed(12)
    before = world.requests()
    batch = await world.source.fetch_batch(ids)
    assert world.requests() - before == 12  # every inner request counted; the envelope not
    assert batch.retry_after is None and not batch.gone
    for pid in ids[:3]:
        assert batch.bodies[pid] == await world.source.fetch_raw(pid)


async def test_inner_requests_over_the_quota_are_429_inside_a_200_batch(world: World) -> None:
    ids = world.seed(12)
    if world.provider == "microsoft":
        world.sandbox.throttle.configure("microsoft", 5, 60.0)
        expected = 5
    else:
        world.sandbox.throttle.configure("google", 25, 60.0)  # messages.get costs 5 units
        expected = 5
    batch = await world.source.fetch_batch(ids)
    assert len(batch.bodies) == expected
    assert batch.retry_after is not None and batch.retry_after > 0


async def test_graph_batch_rules(graph: World) -> None:
    world = graph
    [pid] = world.seed(1)
    url = f"{world.sandbox.url}/v1.0/$batch"
    auth = {"Authorization": f"Bearer {await world.token()}"}
    user = f"/users/{world.address}"
    item = {"method": "GET", "url": f"{user}/messages/{pid}/$value"}
    too_many = {"requests": [{"id": str(n), **item} for n in range(21)]}
    response = await world.client.post(url, json=too_many, headers=auth)
    assert response.status_code == 400
    twice = {"requests": [{"id": "1", **item}, {"id": "1", **item}]}
    assert (await world.client.post(url, json=twice, headers=auth)).status_code == 400

    mixed = {
        "requests": [
            {"id": "a", **item},
            {"id": "b", "method": "GET", "url": f"{user}/messages/nope/$value"},
            {"id": "c", "method": "GET", "url": f"{user}/mailFolders/inbox"},
        ]
    }
    response = await world.client.post(url, json=mixed, headers=auth)
    assert response.status_code == 200
    answers = {a["id"]: a for a in response.json()["responses"]}
    raw = await world.source.fetch_raw(pid)
    assert base64.b64decode(answers["a"]["body"]) == raw  # MIME is not JSON: base64
    assert answers["b"]["status"] == 404
    assert answers["b"]["body"]["error"]["code"] == "ErrorItemNotFound"
    assert answers["c"]["status"] == 200 and isinstance(answers["c"]["body"], dict)

    no_token = await world.client.post(url, json={"requests": [{"id": "1", **item}]})
    assert no_token.json()["responses"][0]["status"] == 401


async def test_gmail_batch_rules(gmail: World) -> None:
    world = gmail
    [pid] = world.seed(1)
    url = f"{world.sandbox.url}/batch/gmail/v1"
    token = await world.token()

    def body(paths: list[str]) -> bytes:
        parts = [
            f"--B\r\nContent-Type: application/http\r\nContent-ID: <{n}>\r\n\r\n"
            f"GET {path} HTTP/1.1\r\n\r\n"
            for n, path in enumerate(paths)
        ]
        return ("".join(parts) + "--B--\r\n").encode()

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "multipart/mixed; boundary=B"}
    get = f"/gmail/v1/users/me/messages/{pid}?format=minimal"
    too_many = await world.client.post(url, content=body([get] * 101), headers=headers)
    assert too_many.status_code == 400
    full_url = await world.client.post(
        url, content=body([f"https://gmail.googleapis.com{get}"]), headers=headers
    )
    assert full_url.status_code == 400
    answer = await world.client.post(
        url, content=body([get, "/gmail/v1/users/me/messages/18c0ffee00000000"]), headers=headers
    )
    assert answer.status_code == 200
    text = answer.content.decode()
    assert "Content-ID: <response-0>" in text and "Content-ID: <response-1>" in text
    assert "HTTP/1.1 200 OK" in text and "HTTP/1.1 404 Not Found" in text
    first = text.split("HTTP/1.1 200 OK", 1)[1].split("\r\n\r\n", 1)[1].split("\r\n--", 1)[0]
    assert json.loads(first)["id"] == pid


async def test_a_view_warms_up_through_batches(world: World, tmp_path: Path) -> None:
    ids = world.seed(45)
    store = await open_sqlite(tmp_path / "state", SecretBox(KEY))
    try:
        view = await MailboxView.open(store.mailboxes, "desk", world.source)
        await view.sync()
        assert view.warm_up is not None
        await view.warm_up.finished.wait()
        before = world.requests()
        sizes = [view.known_size(info.uid) for info in view.messages()]
        assert world.requests() == before  # the listing asks nothing
        raw = await world.source.fetch_raw(ids[0])
        assert sizes[0] == len(crlf_form(raw)) and None not in sizes
        assert view.warm_up.requests == 45
        await view.close()
    finally:
        await store.close()
