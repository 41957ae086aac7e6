"""Sign-ins waiting for the provider's answer live in the store, not in the broker's memory:
a broker over the same store (a restarted gateway, another instance) completes them; each is
taken once, and not after PENDING_LIFETIME.

A real broker over a real SQLite store (the same store code runs on PostgreSQL: test_store);
Google sign-ins, whose start needs no network. The provider's answer here is an error
(``access_denied``), so what the broker does with it shows that it found the sign-in; the
completed sign-ins are in tests/integration (test_oauth, test_oauth_cluster).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.config import load_settings
from gateway.oauth import ConsentError, TokenBroker
from gateway.oauth._broker import NOT_STARTED_HERE, PENDING_LIFETIME
from gateway.oauth._pending import state_hash
from gateway.store import SecretBox, Stores, open_sqlite

DENIED = "Google answered access_denied"


@pytest.fixture
def key() -> SecretBox:
    return SecretBox(secrets.token_bytes(32))


@pytest.fixture
def open_broker(
    tmp_path: Path, write_config: Callable[..., Path], key: SecretBox
) -> Callable[[], AsyncIterator[tuple[TokenBroker, Stores]]]:
    """Opens a gateway's store and broker over the same state directory, as each start does."""
    settings = load_settings(write_config())

    async def opened() -> AsyncIterator[tuple[TokenBroker, Stores]]:
        stores = await open_sqlite(tmp_path / "state", key)
        broker = TokenBroker(settings, stores.auth, stores.events, stores.coordination)
        try:
            yield broker, stores
        finally:
            await broker.close()
            await stores.close()

    return opened


@pytest.fixture
async def broker(
    open_broker: Callable[[], AsyncIterator[tuple[TokenBroker, Stores]]],
) -> AsyncIterator[tuple[TokenBroker, Stores]]:
    async for made in open_broker():
        await made[0].set_google_client("client-id", "client-secret")
        yield made


def state_of(provider_url: str) -> str:
    return parse_qs(urlsplit(provider_url).query)["state"][0]


async def test_a_sign_in_started_before_a_restart_completes_after_it(
    open_broker: Callable[[], AsyncIterator[tuple[TokenBroker, Stores]]],
) -> None:
    async for before, _ in open_broker():
        await before.set_google_client("client-id", "client-secret")
        state = state_of(await before.begin_consent("scanner"))
    async for after, _ in open_broker():
        with pytest.raises(ConsentError, match=DENIED):  # found, and Google's answer read
            await after.complete_consent({"state": state, "error": "access_denied"})
        with pytest.raises(ConsentError) as second:  # taken once
            await after.complete_consent({"state": state, "error": "access_denied"})
        assert str(second.value) == NOT_STARTED_HERE


async def test_a_sign_in_expires_after_its_lifetime(
    broker: tuple[TokenBroker, Stores],
) -> None:
    made, _ = broker
    started = time.time()
    made.clock = lambda: started
    late = state_of(await made.begin_consent("scanner"))
    in_time = state_of(await made.begin_consent("scanner"))
    lifetime = PENDING_LIFETIME.total_seconds()
    made.clock = lambda: started + lifetime + 1
    with pytest.raises(ConsentError) as refused:
        await made.complete_consent({"state": late, "error": "access_denied"})
    assert str(refused.value) == NOT_STARTED_HERE
    made.clock = lambda: started + lifetime - 1
    with pytest.raises(ConsentError, match=DENIED):
        await made.complete_consent({"state": in_time, "error": "access_denied"})


async def test_a_new_sign_in_prunes_the_expired_ones(broker: tuple[TokenBroker, Stores]) -> None:
    made, stores = broker
    started = time.time()
    made.clock = lambda: started
    abandoned = state_of(await made.begin_consent("scanner"))
    made.clock = lambda: started + PENDING_LIFETIME.total_seconds() + 1
    current = state_of(await made.begin_consent("scanner"))
    rows = await stores.db.fetch_all("SELECT state_hash FROM pending_sign_ins")
    assert rows == [(state_hash(current),)] and abandoned != current


async def test_the_state_is_stored_as_a_hash_and_the_verifier_sealed(
    broker: tuple[TokenBroker, Stores],
) -> None:
    made, stores = broker
    state = state_of(await made.begin_consent("scanner"))
    (row,) = await stores.db.fetch_all("SELECT * FROM pending_sign_ins")
    stored = b" ".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    assert state.encode() not in stored and b"code_verifier" not in stored
    assert row[0] == state_hash(state) and row[1] == "scanner"


async def test_an_unknown_or_unreadable_sign_in_is_refused_with_a_sentence(
    broker: tuple[TokenBroker, Stores],
) -> None:
    made, stores = broker
    later = made._now() + PENDING_LIFETIME
    await stores.auth.put_pending_sign_in(state_hash("odd"), "scanner", b"not json", later)
    for state in ("odd", "forged", ""):
        with pytest.raises(ConsentError) as refused:
            await made.complete_consent({"state": state, "code": "a code"})
        assert str(refused.value) == NOT_STARTED_HERE
