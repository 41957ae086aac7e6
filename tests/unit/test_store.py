"""The SQLite state store: durability across reopen, migrations, secrets, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.store import AccountAuth, SecretBox, Store, StoreError, _sqlite
from gateway.store._migrations import MIGRATIONS, Migration, check_sequence, migrate

KEY = bytes(range(32))
SECRET = b"refresh-token-that-must-never-hit-the-disk-in-clear"


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(KEY)


@pytest.fixture
async def store(tmp_path: Path, box: SecretBox) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path, box)
    yield opened
    await opened.close()


def _raw(tmp_path: Path) -> sqlite3.Connection:
    """A second, plain connection for setting up or inspecting the file behind the store."""
    return sqlite3.connect(tmp_path / "gateway.db", isolation_level=None)


def _database_files(tmp_path: Path) -> dict[str, bytes]:
    """Raw bytes of the database and its WAL/shared-memory files, by file name."""
    return {file.name: file.read_bytes() for file in tmp_path.glob("gateway.db*")}


async def test_open_creates_private_state_dir(tmp_path: Path, box: SecretBox) -> None:
    state_dir = tmp_path / "new" / "state"
    store = await Store.open(state_dir, box)
    await store.close()
    assert (state_dir / "gateway.db").is_file()
    assert state_dir.stat().st_mode & 0o777 == 0o700


async def test_pragmas(store: Store, tmp_path: Path) -> None:
    assert store.schema_version == len(MIGRATIONS) == 6
    conn = _raw(tmp_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    pragmas = await store._run(
        lambda c: [c.execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "foreign_keys")]
    )
    assert pragmas == [2, 1]  # FULL, ON (per-connection settings, so read on the store's own)


async def test_reopen_keeps_data(tmp_path: Path, box: SecretBox) -> None:
    store = await Store.open(tmp_path, box)
    await store.set_setting("mode", "demo")
    await store.set_setting("mode", "run")
    await store.put_secret("graph/alice", SECRET)
    await store.record_event("runtime.start")
    await store.record_event("consent", account="alice@example.com", detail="Mail.Send")
    await store.close()
    await store.close()  # idempotent

    store = await Store.open(tmp_path, box)
    try:
        assert await store.get_setting("mode") == "run"
        assert await store.get_setting("missing") is None
        assert await store.get_secret("graph/alice") == SECRET
        events = await store.recent_events()
    finally:
        await store.close()
    assert [(e.kind, e.account, e.detail) for e in events] == [
        ("consent", "alice@example.com", "Mail.Send"),
        ("runtime.start", None, None),
    ]
    assert events[0].id > events[1].id
    now = datetime.now(UTC)
    assert all(e.at.tzinfo is not None and now - timedelta(minutes=1) < e.at <= now for e in events)


async def test_closed_store_refuses_calls(tmp_path: Path, box: SecretBox) -> None:
    store = await Store.open(tmp_path, box)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get_setting("mode")


async def test_recent_events_limit(store: Store) -> None:
    for number in range(5):
        await store.record_event("tick", detail=str(number))
    events = await store.recent_events(limit=3)
    assert [e.detail for e in events] == ["4", "3", "2"]
    assert await store.recent_events(limit=0) == []
    with pytest.raises(ValueError, match="negative"):
        await store.recent_events(limit=-1)


async def test_timestamps_are_fixed_width_utc_text(store: Store, tmp_path: Path) -> None:
    await store.record_event("tick")
    await store.put_secret("s", b"x")
    conn = _raw(tmp_path)
    try:
        stamps = [row[0] for row in conn.execute("SELECT at FROM events")]
        stamps += [row[0] for row in conn.execute("SELECT updated_at FROM secrets")]
    finally:
        conn.close()
    for stamp in stamps:
        assert isinstance(stamp, str)
        assert len(stamp) == 27
        assert stamp.endswith("Z")


async def test_secrets_round_trip_and_delete(store: Store) -> None:
    assert await store.get_secret("graph/alice") is None
    await store.put_secret("graph/alice", SECRET)
    await store.put_secret("graph/alice", b"rotated")
    assert await store.get_secret("graph/alice") == b"rotated"
    await store.delete_secret("graph/alice")
    await store.delete_secret("graph/alice")  # deleting a missing secret is fine
    assert await store.get_secret("graph/alice") is None


async def test_plaintext_never_in_database_files(store: Store, tmp_path: Path) -> None:
    await store.put_secret("graph/alice", SECRET)
    contents = _database_files(tmp_path)
    assert "gateway.db-wal" in contents  # the fresh write is still in the WAL, not checkpointed
    for name, content in contents.items():
        assert SECRET not in content, name


async def test_ciphertext_moved_to_another_name_fails(store: Store, tmp_path: Path) -> None:
    await store.put_secret("graph/alice", SECRET)
    await store.put_secret("graph/bob", b"bob's token")
    conn = _raw(tmp_path)
    try:
        conn.execute(
            "UPDATE secrets SET ciphertext = "
            "(SELECT ciphertext FROM secrets WHERE name = 'graph/alice') WHERE name = 'graph/bob'"
        )
    finally:
        conn.close()
    with pytest.raises(StoreError, match="'graph/bob'"):
        await store.get_secret("graph/bob")
    assert await store.get_secret("graph/alice") == SECRET


async def test_wrong_key_fails(tmp_path: Path, box: SecretBox) -> None:
    store = await Store.open(tmp_path, box)
    await store.put_secret("graph/alice", SECRET)
    await store.close()
    store = await Store.open(tmp_path, SecretBox(bytes(32)))
    try:
        with pytest.raises(StoreError, match="secret key does not match"):
            await store.get_secret("graph/alice")
    finally:
        await store.close()


async def test_migrates_older_database(tmp_path: Path, box: SecretBox) -> None:
    conn = _raw(tmp_path)
    try:
        assert migrate(conn, MIGRATIONS[:1]) == 1
        conn.execute("INSERT INTO settings (key, value) VALUES ('mode', 'run')")
    finally:
        conn.close()
    store = await Store.open(tmp_path, box)
    try:
        assert store.schema_version == len(MIGRATIONS)
        assert await store.get_setting("mode") == "run"
        await store.record_event("runtime.start")
        assert [e.kind for e in await store.recent_events()] == ["runtime.start"]
    finally:
        await store.close()


async def test_refuses_newer_database(tmp_path: Path, box: SecretBox) -> None:
    conn = _raw(tmp_path)
    try:
        migrate(conn)
        conn.execute("INSERT INTO schema_version (version, description) VALUES (7, 'future')")
    finally:
        conn.close()
    with pytest.raises(StoreError) as caught:
        await Store.open(tmp_path, box)
    assert str(caught.value) == (
        f"{tmp_path / 'gateway.db'} has schema version 7 but this gateway only knows up to "
        f"{len(MIGRATIONS)}; upgrade the gateway or restore a backup"
    )


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    conn = _raw(tmp_path)
    try:
        assert migrate(conn) == len(MIGRATIONS)
        assert migrate(conn) == len(MIGRATIONS)
        rows = conn.execute("SELECT version, description FROM schema_version ORDER BY version")
        assert [v for v, _ in rows] == [m.version for m in MIGRATIONS]
    finally:
        conn.close()


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    broken = Migration(2, "broken", ("CREATE TABLE half (x TEXT)", "THIS IS NOT SQL"))
    conn = _raw(tmp_path)
    try:
        with pytest.raises(sqlite3.OperationalError):
            migrate(conn, (MIGRATIONS[0], broken))
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone() == (1,)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "half" not in tables
        assert not conn.in_transaction
    finally:
        conn.close()


def test_known_migrations_are_contiguous() -> None:
    check_sequence(MIGRATIONS)
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


@pytest.mark.parametrize("versions", [[1, 3], [2], [2, 1], [1, 1], [0, 1]])
def test_gaps_and_disorder_rejected(tmp_path: Path, versions: list[int]) -> None:
    migrations = [Migration(v, f"v{v}", ("SELECT 1",)) for v in versions]
    with pytest.raises(ValueError, match="without gaps"):
        check_sequence(migrations)
    conn = _raw(tmp_path)
    try:
        with pytest.raises(ValueError, match="without gaps"):
            migrate(conn, migrations)
    finally:
        conn.close()


async def test_corrupt_database_named(tmp_path: Path, box: SecretBox) -> None:
    (tmp_path / "gateway.db").write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(StoreError) as caught:
        await Store.open(tmp_path, box)
    message = str(caught.value)
    assert str(tmp_path / "gateway.db") in message
    assert "restore a backup" in message


async def test_locked_database_named(
    tmp_path: Path, box: SecretBox, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await Store.open(tmp_path, box)).close()
    monkeypatch.setattr(_sqlite, "BUSY_TIMEOUT_SECONDS", 0.05)
    conn = _raw(tmp_path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError) as caught:
            await Store.open(tmp_path, box)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    message = str(caught.value)
    assert str(tmp_path / "gateway.db") in message
    assert "second gateway" in message


async def test_concurrent_calls(store: Store) -> None:
    async def round_trip(number: int) -> str | None:
        await store.set_setting(f"key{number}", f"value{number}")
        return await store.get_setting(f"key{number}")

    results = await asyncio.gather(*(round_trip(n) for n in range(100)))
    assert results == [f"value{n}" for n in range(100)]
    await asyncio.gather(*(store.set_setting("shared", str(n)) for n in range(100)))
    assert await store.get_setting("shared") == "99"  # one worker thread: submission order


async def test_sql_runs_on_one_dedicated_thread(store: Store) -> None:
    names = await asyncio.gather(
        *(store._run(lambda _conn: threading.current_thread().name) for _ in range(10))
    )
    assert len(set(names)) == 1
    assert names[0].startswith("gateway-store")


async def test_account_auth_round_trip_encrypts_the_token(tmp_path: Path, box: SecretBox) -> None:
    token = b"refresh-token-material-0123456789"
    store = await Store.open(tmp_path, box)
    try:
        await store.put_account_auth(
            AccountAuth(
                "crm", "microsoft", "connected", "crm@contoso.example", ("Mail.Send",), token
            )
        )
        stored = await store.get_account_auth("crm")
        assert stored is not None and stored.token == token and stored.scopes == ("Mail.Send",)
        assert "refresh-token" not in repr(stored)
        since = datetime.now(UTC)
        await store.put_account_auth(
            AccountAuth(
                "crm", "microsoft", "needs_reconsent", None, (), token, reconsent_since=since
            )
        )
        changed = await store.get_account_auth("crm")
        assert changed.state == "needs_reconsent" and changed.reconsent_since == since
        assert [a.account for a in await store.list_account_auth()] == ["crm"]
        await store.delete_account_auth("crm")
        assert await store.get_account_auth("crm") is None
    finally:
        await store.close()
    assert all(token not in content for content in _database_files(tmp_path).values())


async def test_consent_links_are_single_use_and_expire(tmp_path: Path, box: SecretBox) -> None:
    store = await Store.open(tmp_path, box)
    now = datetime.now(UTC)
    try:
        await store.add_consent_link("hash-a", "crm", now + timedelta(hours=1))
        await store.add_consent_link("hash-b", "crm", now - timedelta(seconds=1))
        assert await store.use_consent_link("hash-a", now) == "crm"
        assert await store.use_consent_link("hash-a", now) is None  # spent
        assert await store.use_consent_link("hash-b", now) is None  # expired
        assert await store.use_consent_link("unknown", now) is None
    finally:
        await store.close()
