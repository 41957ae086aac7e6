"""What only the PostgreSQL backend has: schema versions set by ``gateway migrate`` (never by an
instance), the shared secret key check, the connection's failures told without the password,
64-bit columns, and recovery when the server comes back. The stores' behaviour on both backends
is in test_store.py; a private server runs for the session (tests/conftest.py ``postgres``)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest

from gateway.logs import configure_logging
from gateway.store import (
    KEY_ENV_VAR,
    MailboxUid,
    SecretBox,
    StoreError,
    _pg,
    describe,
    migrate_postgresql,
    open_postgresql,
)
from gateway.store._migrations import MIGRATIONS, Migration
from mailgw_sandbox.postgres import PASSWORD, PostgresServer
from tests.helpers import free_port

KEY = bytes(range(32))
NEWEST = len(MIGRATIONS)


def _database(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def _versions(postgres: PostgresServer, url: str) -> list[int]:
    out = postgres.psql("SELECT version FROM schema_version ORDER BY version", _database(url))
    return [int(line) for line in out.split()]


async def test_unmigrated_database_is_refused_naming_gateway_migrate(pg_url: str) -> None:
    with pytest.raises(StoreError) as caught:
        await open_postgresql(pg_url, SecretBox(KEY))
    assert str(caught.value) == (
        f"{describe(pg_url)} has schema version 0, this gateway needs {NEWEST}: run "
        "`gateway migrate -c CONFIG` once (with every older instance stopped if one runs)"
    )


async def test_instance_never_migrates_an_older_schema(
    pg_url: str, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_pg, "MIGRATIONS", MIGRATIONS[:1])
    await migrate_postgresql(pg_url)
    monkeypatch.undo()
    with pytest.raises(StoreError, match=f"has schema version 1, this gateway needs {NEWEST}"):
        await open_postgresql(pg_url, SecretBox(KEY))
    assert _versions(postgres, pg_url) == [1]  # opening changed nothing


async def test_newer_schema_is_refused(pg_url: str, postgres: PostgresServer) -> None:
    await migrate_postgresql(pg_url)
    future = NEWEST + 1
    postgres.psql(
        f"INSERT INTO schema_version (version, description) VALUES ({future}, 'future')",  # noqa: S608
        _database(pg_url),
    )
    with pytest.raises(StoreError) as caught:
        await open_postgresql(pg_url, SecretBox(KEY))
    assert str(caught.value) == (
        f"{describe(pg_url)} has schema version {future} but this gateway only knows up to "
        f"{NEWEST}; upgrade this instance to the version the others run"
    )
    with pytest.raises(StoreError, match=f"only knows up to {NEWEST}; upgrade the gateway"):
        await migrate_postgresql(pg_url)
    assert _versions(postgres, pg_url)[-1] == future


async def test_migrate_is_idempotent(pg_url: str, postgres: PostgresServer) -> None:
    assert await migrate_postgresql(pg_url) == (0, NEWEST)
    assert await migrate_postgresql(pg_url) == (NEWEST, NEWEST)
    assert _versions(postgres, pg_url) == list(range(1, NEWEST + 1))
    stores = await open_postgresql(pg_url, SecretBox(KEY))
    await stores.close()


def test_concurrent_migrates_from_processes_apply_each_step_once(
    pg_url: str, postgres: PostgresServer
) -> None:
    """Three ``gateway migrate`` runs at once (an operator's script on each machine): each
    step once, every run succeeds (a duplicate step would fail on schema_version's key)."""
    code = (
        "import asyncio, sys\n"
        "from gateway.store import migrate_postgresql\n"
        "print(asyncio.run(migrate_postgresql(sys.argv[1])))\n"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code, pg_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], results
    assert all(out.strip().endswith(f", {NEWEST})") for out, _err in results), results
    assert _versions(postgres, pg_url) == list(range(1, NEWEST + 1))


async def test_failed_migration_rolls_back(
    pg_url: str, postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = Migration(2, "broken", ("CREATE TABLE half (x TEXT)", "THIS IS NOT SQL"))
    monkeypatch.setattr(_pg, "MIGRATIONS", (MIGRATIONS[0], broken))
    with pytest.raises(StoreError, match="syntax error"):
        await migrate_postgresql(pg_url)
    assert _versions(postgres, pg_url) == [1]
    tables = postgres.psql(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", _database(pg_url)
    ).split()
    assert "half" not in tables and "settings" in tables


async def test_key_check_refuses_an_instance_with_another_key(pg_url: str) -> None:
    await migrate_postgresql(pg_url)
    first = await open_postgresql(pg_url, SecretBox(KEY))
    await first.auth.put_secret("graph/alice", b"token")
    with pytest.raises(StoreError) as caught:
        await open_postgresql(pg_url, SecretBox(bytes(32)))
    assert str(caught.value) == (
        f"this instance's secret key does not match the one the tokens in {describe(pg_url)} "
        f"were sealed with: give every instance the same key ({KEY_ENV_VAR}, or the same "
        "secret.key file in each state directory)"
    )
    second = await open_postgresql(pg_url, SecretBox(KEY))  # same key: in, beside the first
    try:
        assert await second.auth.get_secret("graph/alice") == b"token"
    finally:
        await second.close()
        await first.close()


async def test_two_first_instances_with_different_keys_cannot_both_start(pg_url: str) -> None:
    await migrate_postgresql(pg_url)
    for _round in range(5):  # the check value is written by whichever comes first
        opened = await asyncio.gather(
            open_postgresql(pg_url, SecretBox(KEY), pool_size=2),
            open_postgresql(pg_url, SecretBox(bytes(32)), pool_size=2),
            return_exceptions=True,
        )
        started = [stores for stores in opened if not isinstance(stores, BaseException)]
        refused = [error for error in opened if isinstance(error, BaseException)]
        assert len(started) == 1 and len(refused) == 1, opened
        assert isinstance(refused[0], StoreError) and "secret key" in str(refused[0])
        await started[0].close()


def _broken_urls(postgres: PostgresServer, pg_url: str) -> dict[str, tuple[str, str]]:
    """Failing URLs by case: (URL, words the sentence must carry)."""
    database = _database(pg_url)
    wrong_password = "not-the-" + PASSWORD
    closed = free_port()
    where = f"127.0.0.1:{postgres.port}"
    return {
        "refused": (
            f"postgresql://gateway:{PASSWORD}@127.0.0.1:{closed}/{database}",
            f"cannot connect to PostgreSQL at postgresql://gateway@127.0.0.1:{closed}/{database} "
            "(store.url): connection failed: connection to server at",
        ),
        "wrong password": (
            f"postgresql://gateway:{wrong_password}@{where}/{database}",
            f"cannot connect to PostgreSQL at postgresql://gateway@{where}/{database} "
            '(store.url): connection failed: connection to server at "127.0.0.1", '
            f"port {postgres.port} failed: FATAL: password authentication failed for user",
        ),
        "no such database": (
            f"postgresql://gateway:{PASSWORD}@{where}/nosuchdb",
            f"cannot connect to PostgreSQL at postgresql://gateway@{where}/nosuchdb (store.url)"
            ': connection failed: connection to server at "127.0.0.1", '
            f'port {postgres.port} failed: FATAL: database "nosuchdb" does not exist',
        ),
        "bad escape": (
            f"postgresql://gateway:{PASSWORD}%zz@{where}/{database}",
            "invalid percent-encoded token",
        ),
        "unclosed bracket": (
            f"postgresql://gateway:{PASSWORD}@[::1/{database}",
            "cannot connect to PostgreSQL at store.url (not a valid postgresql:// URL)",
        ),
        "bad port": (
            f"postgresql://gateway:{PASSWORD}@127.0.0.1:fivefour/{database}",
            "invalid integer value",
        ),
    }


async def test_connection_failures_are_sentences_without_the_password(
    pg_url: str, postgres: PostgresServer, captured_log: io.StringIO
) -> None:
    configure_logging("debug", "text", captured_log)
    for case, (url, words) in _broken_urls(postgres, pg_url).items():
        for attempt in (migrate_postgresql(url), open_postgresql(url, SecretBox(KEY))):
            with pytest.raises(StoreError) as caught:
                await attempt
            message = str(caught.value)
            assert words in message, case
            assert message.endswith(
                "; check that the server runs, the address and credentials, and pg_hba.conf"
            ), case
            assert PASSWORD not in message, case
            assert "Traceback" not in message
    assert PASSWORD not in captured_log.getvalue()


def test_describe_leaves_the_password_out() -> None:
    assert describe("postgresql://gw:pw@db.example:5433/state?sslmode=require") == (
        "postgresql://gw@db.example:5433/state"
    )
    assert (
        describe("postgresql://gw:pw@[2001:db8::5]/state") == "postgresql://gw@[2001:db8::5]/state"
    )
    assert describe("postgres:///state") == "postgresql://localhost/state"
    assert describe("postgresql://gw:pw@db:port/x") == ("store.url (not a valid postgresql:// URL)")


async def test_columns_are_64_bit(pg_url: str, postgres: PostgresServer) -> None:
    """UIDs and UIDVALIDITY are unsigned 32-bit in IMAP: past PostgreSQL's signed INTEGER."""
    await migrate_postgresql(pg_url)
    stores = await open_postgresql(pg_url, SecretBox(KEY))
    at = "2024-05-01T00:00:00.000000Z"
    try:
        await stores.db.execute(
            "INSERT INTO mailbox_state (account, uidvalidity, uidnext, sync_cursor, updated_at) "
            "VALUES (?, ?, ?, ?, ?)",
            ("desk", 4_000_000_000, 4_000_000_002, "c1", at),
        )
        await stores.db.execute(
            "INSERT INTO mailbox_uids (account, uid, provider_id, internal_date, flags) "
            "VALUES (?, ?, ?, ?, ?)",
            ("desk", 4_000_000_001, "m1", at, ""),
        )
        state, entries = await stores.mailboxes.load_mailbox("desk")
    finally:
        await stores.close()
    assert state is not None
    assert (state.uidvalidity, state.uidnext) == (4_000_000_000, 4_000_000_002)
    assert entries == [MailboxUid(4_000_000_001, "m1", datetime(2024, 5, 1, tzinfo=UTC))]
    found = postgres.psql(
        "SELECT table_name || '.' || column_name || '=' || data_type FROM "
        "information_schema.columns WHERE table_name IN ('mailbox_uids', 'mailbox_state', "
        "'events') AND column_name IN ('uid', 'uidvalidity', 'uidnext', 'id')",
        _database(pg_url),
    ).split()
    assert sorted(found) == [
        "events.id=bigint",
        "mailbox_state.uidnext=bigint",
        "mailbox_state.uidvalidity=bigint",
        "mailbox_uids.uid=bigint",
    ]


async def test_calls_work_at_once_when_postgresql_is_back(
    pg_url: str, postgres: PostgresServer
) -> None:
    """After an outage every pooled connection is dead; none may fail a call once the server
    is back (each would be a 4xx to a client although nothing is wrong any more)."""
    await migrate_postgresql(pg_url)
    stores = await open_postgresql(pg_url, SecretBox(KEY), pool_size=6)
    db = stores.db
    try:
        await asyncio.gather(
            *(db.run(lambda c: c.execute("SELECT pg_sleep(0.2)")) for _ in range(6))
        )
        postgres.stop()
        try:
            with pytest.raises(StoreError, match=r"cannot use the PostgreSQL database"):
                await stores.auth.set_setting("during", "outage")
        finally:
            postgres.restart_after()
        for number in range(12):
            await stores.auth.set_setting(f"after{number}", "ok")
        assert await stores.auth.get_setting("during") is None  # refused means not written
        assert await stores.auth.get_setting("after11") == "ok"
    finally:
        await stores.close()
