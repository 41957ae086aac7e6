"""What the token broker does with the ``auth`` channel's notices (other instances' changes).

A real broker over a real SQLite store; the notices are handed to its listener as the
coordination would, including the ``None`` that says notices may have been missed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.oauth import TokenBroker
from gateway.store import AccountAuth, SecretBox, Stores, open_sqlite


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    opened = await open_sqlite(tmp_path / "state", SecretBox(secrets.token_bytes(32)))
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def broker(
    stores: Stores, write_config: Callable[..., Path]
) -> AsyncIterator[tuple[TokenBroker, list[str]]]:
    """A broker whose account ``crm`` is connected, and the accounts it followed."""
    await stores.auth.put_account_auth(
        AccountAuth("crm", "microsoft", "connected", "crm@contoso.example", (), b"cache")
    )
    settings = load_settings(write_config())
    made = TokenBroker(settings, stores.auth, stores.events, stores.coordination)
    followed: list[str] = []

    async def on_connected(username: str) -> None:
        followed.append(username)

    made.on_connected = on_connected
    try:
        yield made, followed
    finally:
        await made.close()


async def settled(broker: TokenBroker) -> None:
    await asyncio.gather(*broker._followers)


def notice(account: str, sender: str) -> str:
    return json.dumps({"account": account, "from": sender})


async def test_a_connection_made_elsewhere_is_followed_here(
    broker: tuple[TokenBroker, list[str]],
) -> None:
    made, followed = broker
    made._on_auth_notice(notice("crm", "another instance"))
    await settled(made)
    assert followed == ["crm"]


async def test_its_own_notice_is_not_followed_again(broker: tuple[TokenBroker, list[str]]) -> None:
    made, followed = broker
    made._on_auth_notice(notice("crm", made._instance))
    await settled(made)
    assert followed == []


async def test_only_a_later_none_redoes_the_connections(
    broker: tuple[TokenBroker, list[str]],
) -> None:
    """The first None comes when the channel is first listened to, just after start: nothing
    was missed. A later one (the listening connection was lost) may hide a connection."""
    made, followed = broker
    made._on_auth_notice(None)
    await settled(made)
    assert followed == []
    made._on_auth_notice(None)
    await settled(made)
    assert followed == ["crm"]


async def test_a_disconnection_elsewhere_is_not_followed(
    broker: tuple[TokenBroker, list[str]], stores: Stores
) -> None:
    made, followed = broker
    await stores.auth.delete_account_auth("crm")
    made._on_auth_notice(notice("crm", "another instance"))
    await settled(made)
    assert followed == []


@pytest.mark.parametrize("payload", ["not json", "[]", '{"from": "x"}'])
async def test_an_unreadable_notice_is_logged_and_ignored(
    broker: tuple[TokenBroker, list[str]], payload: str
) -> None:
    made, followed = broker
    made._on_auth_notice(payload)
    await settled(made)
    assert followed == []
