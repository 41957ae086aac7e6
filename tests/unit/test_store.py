"""The state stores on both backends: round trips, secrets, consent links, UID maps, events,
concurrency and transactions on SQLite and on PostgreSQL alike (the ``backend`` fixture);
SQLite's own file, pragmas and migrations below them. PostgreSQL's own: test_store_postgresql."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.store import (
    AccountAuth,
    AuthStore,
    Connection,
    EventLog,
    MailboxState,
    MailboxStore,
    MailboxUid,
    SecretBox,
    StoreError,
    Stores,
    _db,
    migrate_postgresql,
    open_postgresql,
    open_sqlite,
)
from gateway.store._auth import SqlAuthStore
from gateway.store._db import Database
from gateway.store._events import SqlEventLog
from gateway.store._mailboxes import SqlMailboxStore
from gateway.store._migrations import MIGRATIONS, Migration, check_sequence, migrate

KEY = bytes(range(32))
SECRET = b"refresh-token-that-must-never-hit-the-disk-in-clear"
# A database written by the single-class store of commit e680db9 (before the split by
# purpose), dumped as SQL; made with the same KEY. See test_opens_a_database_of_the_old_store.
OLD_DATABASE = Path(__file__).parent / "data" / "gateway_db_schema6.sql"


@dataclass(frozen=True)
class Backend:
    """One backend's way to open the stores again over the same data."""

    name: str
    open: Callable[[SecretBox], Awaitable[Stores]]


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", lambda box: open_sqlite(tmp_path, box))
    url: str = request.getfixturevalue("pg_url")
    await migrate_postgresql(url)
    return Backend("postgresql", lambda box: open_postgresql(url, box, pool_size=4))


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(KEY)


@pytest.fixture
async def stores(backend: Backend, box: SecretBox) -> AsyncIterator[Stores]:
    opened = await backend.open(box)
    yield opened
    await opened.close()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    opened = await Database.open(tmp_path)
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
    stores = await open_sqlite(state_dir, box)
    await stores.close()
    assert (state_dir / "gateway.db").is_file()
    assert state_dir.stat().st_mode & 0o777 == 0o700


def test_sqlite_stores_implement_their_interfaces() -> None:
    """Each SQLite store offers every method of its Protocol, with the same parameters."""
    for protocol, implementation in (
        (AuthStore, SqlAuthStore),
        (EventLog, SqlEventLog),
        (MailboxStore, SqlMailboxStore),
    ):
        wanted = {n for n in vars(protocol) if not n.startswith("_")}
        offered = {n for n in vars(implementation) if not n.startswith("_")}
        assert wanted == offered, implementation
        for name in wanted:
            expected = inspect.signature(getattr(protocol, name))
            assert inspect.signature(getattr(implementation, name)) == expected, name


async def test_pragmas(db: Database, tmp_path: Path) -> None:
    assert db.schema_version == len(MIGRATIONS)
    conn = _raw(tmp_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
    pragmas = await db.run(
        lambda c: [c.execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "foreign_keys")]
    )
    assert pragmas == [2, 1]  # FULL, ON (per-connection settings, so read on the store's own)


async def test_reopen_keeps_data(backend: Backend, box: SecretBox) -> None:
    stores = await backend.open(box)
    await stores.auth.set_setting("mode", "demo")
    await stores.auth.set_setting("mode", "run")
    await stores.auth.put_secret("graph/alice", SECRET)
    await stores.events.record_event("runtime.start")
    await stores.events.record_event("consent", account="alice@example.com", detail="Mail.Send")
    await stores.close()
    await stores.close()  # idempotent

    stores = await backend.open(box)
    try:
        assert await stores.auth.get_setting("mode") == "run"
        assert await stores.auth.get_setting("missing") is None
        assert await stores.auth.get_secret("graph/alice") == SECRET
        events = await stores.events.recent_events()
    finally:
        await stores.close()
    assert [(e.kind, e.account, e.detail) for e in events] == [
        ("consent", "alice@example.com", "Mail.Send"),
        ("runtime.start", None, None),
    ]
    assert events[0].id > events[1].id
    now = datetime.now(UTC)
    assert all(e.at.tzinfo is not None and now - timedelta(minutes=1) < e.at <= now for e in events)


async def test_closed_stores_refuse_calls(backend: Backend, box: SecretBox) -> None:
    stores = await backend.open(box)
    await stores.close()
    with pytest.raises(StoreError, match="closed"):
        await stores.auth.get_setting("mode")
    with pytest.raises(StoreError, match="closed"):
        await stores.events.record_event("late")
    with pytest.raises(StoreError, match="closed"):
        await stores.mailboxes.load_mailbox("desk")


async def test_recent_events_limit(stores: Stores) -> None:
    events = stores.events
    for number in range(5):
        await events.record_event("tick", detail=str(number))
    recent = await events.recent_events(limit=3)
    assert [e.detail for e in recent] == ["4", "3", "2"]
    assert await events.recent_events(limit=0) == []
    with pytest.raises(ValueError, match="negative"):
        await events.recent_events(limit=-1)


async def test_timestamps_are_fixed_width_utc_text(stores: Stores) -> None:
    await stores.events.record_event("tick")
    await stores.auth.put_secret("s", b"x")
    stamps = [row[0] for row in await stores.db.fetch_all("SELECT at FROM events")]
    stamps += [row[0] for row in await stores.db.fetch_all("SELECT updated_at FROM secrets")]
    assert len(stamps) >= 2  # PostgreSQL also keeps the key check among the secrets
    for stamp in stamps:
        assert isinstance(stamp, str)
        assert len(stamp) == 27
        assert stamp.endswith("Z")


async def test_secrets_round_trip_and_replace(stores: Stores) -> None:
    auth = stores.auth
    assert await auth.get_secret("graph/alice") is None
    await auth.put_secret("graph/alice", SECRET)
    await auth.put_secret("graph/alice", b"rotated")
    assert await auth.get_secret("graph/alice") == b"rotated"


async def test_plaintext_never_in_database_files(tmp_path: Path, box: SecretBox) -> None:
    stores = await open_sqlite(tmp_path, box)
    try:
        await stores.auth.put_secret("graph/alice", SECRET)
        await stores.auth.put_account_auth(
            AccountAuth("crm", "microsoft", "connected", None, ("Mail.Send",), SECRET + b"-2")
        )
        contents = _database_files(tmp_path)
    finally:
        await stores.close()
    assert "gateway.db-wal" in contents  # the fresh write is still in the WAL, not checkpointed
    for name, content in contents.items():
        assert SECRET not in content, name
    assert all(SECRET not in content for content in _database_files(tmp_path).values())


async def test_ciphertext_moved_to_another_name_fails(stores: Stores) -> None:
    auth = stores.auth
    await auth.put_secret("graph/alice", SECRET)
    await auth.put_secret("graph/bob", b"bob's token")
    await stores.db.execute(
        "UPDATE secrets SET ciphertext = "
        "(SELECT ciphertext FROM secrets WHERE name = 'graph/alice') WHERE name = 'graph/bob'",
        (),
    )
    with pytest.raises(StoreError, match="'graph/bob'"):
        await auth.get_secret("graph/bob")
    assert await auth.get_secret("graph/alice") == SECRET


async def test_wrong_key_fails(backend: Backend, box: SecretBox) -> None:
    """SQLite: the first secret read says so; PostgreSQL, where instances share the tokens,
    refuses the instance at open (test_store_postgresql has the sentence)."""
    stores = await backend.open(box)
    await stores.auth.put_secret("graph/alice", SECRET)
    await stores.close()
    with pytest.raises(StoreError, match="secret key does not match"):
        other = await backend.open(SecretBox(bytes(32)))
        try:
            await other.auth.get_secret("graph/alice")
        finally:
            await other.close()
    stores = await backend.open(box)
    try:
        assert await stores.auth.get_secret("graph/alice") == SECRET  # nothing was lost
    finally:
        await stores.close()


async def test_migrates_older_database(tmp_path: Path, box: SecretBox) -> None:
    conn = _raw(tmp_path)
    try:
        assert migrate(conn, MIGRATIONS[:1]) == 1
        conn.execute("INSERT INTO settings (key, value) VALUES ('mode', 'run')")
    finally:
        conn.close()
    db = await Database.open(tmp_path)
    try:
        assert db.schema_version == len(MIGRATIONS)
        auth, events = SqlAuthStore(db, box), SqlEventLog(db)
        assert await auth.get_setting("mode") == "run"
        await events.record_event("runtime.start")
        assert [e.kind for e in await events.recent_events()] == ["runtime.start"]
    finally:
        await db.close()


def _old_database(tmp_path: Path) -> Path:
    """The old store's database restored from its dump into ``tmp_path/gateway.db``."""
    tmp_path.mkdir(exist_ok=True)
    conn = _raw(tmp_path)
    try:
        conn.executescript(OLD_DATABASE.read_text(encoding="utf-8"))
    finally:
        conn.close()
    return tmp_path / "gateway.db"


def _schema(path: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
    finally:
        conn.close()


def test_schema_is_the_old_stores(tmp_path: Path) -> None:
    """Migrations 1-6 make exactly the tables and indexes the single-class store made."""
    old = _old_database(tmp_path / "old")
    (tmp_path / "new").mkdir()
    conn = _raw(tmp_path / "new")
    try:
        assert migrate(conn, MIGRATIONS[:6]) == 6
    finally:
        conn.close()
    assert _schema(tmp_path / "new" / "gateway.db") == _schema(old)


async def test_opens_a_database_of_the_old_store(tmp_path: Path, box: SecretBox) -> None:
    """Every purpose store reads what the pre-split store wrote, and can write beside it."""
    _old_database(tmp_path)
    stores = await open_sqlite(tmp_path, box)
    try:
        auth, events, mailboxes = stores.auth, stores.events, stores.mailboxes
        assert await auth.get_setting("google.client_id") == "client-123.apps.googleusercontent.com"
        assert await auth.get_secret("google.client_secret") == b"s3cret-client"
        crm = await auth.get_account_auth("crm")
        assert crm is not None and crm.token == b"msal-cache-bytes"
        assert (crm.state, crm.principal) == ("connected", "crm@contoso.example")
        assert crm.scopes == ("Mail.Send", "offline_access")
        desk = await auth.get_account_auth("desk")
        assert desk is not None and desk.token is None and desk.admin_notified
        assert desk.reconsent_since == datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
        assert desk.last_error == "invalid_grant"
        now = datetime.now(UTC)
        assert await auth.use_consent_link("hash-used", now) is None
        assert await auth.use_consent_link("hash-live", now) == "desk"

        assert [(e.id, e.kind, e.account) for e in await events.recent_events()] == [
            (2, "oauth.connected", "crm"),
            (1, "gateway.started", None),
        ]
        await events.record_event("gateway.started")
        assert (await events.recent_events(1))[0].id == 3

        state, entries = await mailboxes.load_mailbox("desk")
        assert state == MailboxState(1714555800, 4, "cursor-7")
        at = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)
        assert entries == [
            MailboxUid(1, "m1", at, ("\\Seen",), 120),
            MailboxUid(2, "m2", at, (), None, ("\\Flagged",)),
            MailboxUid(3, "m3", at, (), 300, None, True),
        ]
        headers = await mailboxes.load_mailbox_headers("desk", ["m1", "m2"])
        assert headers == {"m1": b"Subject: one\r\n\r\n"}
    finally:
        await stores.close()


async def test_refuses_newer_database(tmp_path: Path, box: SecretBox) -> None:
    conn = _raw(tmp_path)
    try:
        migrate(conn)
        future = len(MIGRATIONS) + 1
        conn.execute(
            "INSERT INTO schema_version (version, description) VALUES (?, 'future')", (future,)
        )
    finally:
        conn.close()
    with pytest.raises(StoreError) as caught:
        await open_sqlite(tmp_path, box)
    assert str(caught.value) == (
        f"{tmp_path / 'gateway.db'} has schema version {future} but this gateway only knows up to "
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
        await open_sqlite(tmp_path, box)
    message = str(caught.value)
    assert str(tmp_path / "gateway.db") in message
    assert "restore a backup" in message


async def test_locked_database_named(
    tmp_path: Path, box: SecretBox, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await open_sqlite(tmp_path, box)).close()
    monkeypatch.setattr(_db, "BUSY_TIMEOUT_SECONDS", 0.05)
    conn = _raw(tmp_path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError) as caught:
            await open_sqlite(tmp_path, box)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    message = str(caught.value)
    assert str(tmp_path / "gateway.db") in message
    assert "second gateway" in message


async def test_concurrent_calls(stores: Stores) -> None:
    auth = stores.auth

    async def round_trip(number: int) -> str | None:
        await auth.set_setting(f"key{number}", f"value{number}")
        return await auth.get_setting(f"key{number}")

    results = await asyncio.gather(*(round_trip(n) for n in range(100)))
    assert results == [f"value{n}" for n in range(100)]
    await asyncio.gather(*(auth.set_setting("shared", str(n)) for n in range(100)))
    assert await auth.get_setting("shared") in {str(n) for n in range(100)}
    (count,) = await stores.db.fetch_one("SELECT COUNT(*) FROM settings") or (0,)
    assert count == 101


async def test_sqlite_calls_apply_in_submission_order(tmp_path: Path, box: SecretBox) -> None:
    stores = await open_sqlite(tmp_path, box)
    try:
        await asyncio.gather(*(stores.auth.set_setting("shared", str(n)) for n in range(100)))
        assert await stores.auth.get_setting("shared") == "99"  # one worker thread
    finally:
        await stores.close()


async def test_sql_runs_on_one_dedicated_thread(db: Database) -> None:
    names = await asyncio.gather(
        *(db.run(lambda _conn: threading.current_thread().name) for _ in range(10))
    )
    assert len(set(names)) == 1
    assert names[0].startswith("gateway-store")


async def test_stores_share_one_connection(db: Database, box: SecretBox) -> None:
    """A write through one purpose store is visible at once through the others' connection."""
    auth, events = SqlAuthStore(db, box), SqlEventLog(db)
    await auth.set_setting("mode", "run")
    await events.record_event("tick")
    (count,) = await db.fetch_one("SELECT COUNT(*) FROM settings") or (0,)
    assert count == 1
    assert [e.kind for e in await events.recent_events()] == ["tick"]


async def test_transact_applies_all_or_nothing(stores: Stores) -> None:
    db = stores.db

    def half_then_fail(conn: Connection) -> None:
        conn.execute("INSERT INTO settings (key, value) VALUES ('a', '1')")
        conn.execute("INSERT INTO settings (key, value) VALUES ('a', '2')")  # duplicate key

    with pytest.raises(StoreError, match=r"(?i)unique"):
        await db.transact(half_then_fail)
    assert await db.fetch_all("SELECT key FROM settings") == []

    def both(conn: Connection) -> int:
        conn.execute("INSERT INTO settings (key, value) VALUES ('a', '1')")
        conn.execute("INSERT INTO settings (key, value) VALUES ('b', '2')")
        return 2

    assert await db.transact(both) == 2
    assert sorted(await db.fetch_all("SELECT key, value FROM settings")) == [
        ("a", "1"),
        ("b", "2"),
    ]


async def test_account_auth_round_trip_encrypts_the_token(stores: Stores, backend: Backend) -> None:
    auth = stores.auth
    token = b"refresh-token-material-0123456789"
    await auth.put_account_auth(
        AccountAuth("crm", "microsoft", "connected", "crm@contoso.example", ("Mail.Send",), token)
    )
    stored = await auth.get_account_auth("crm")
    assert stored is not None and stored.token == token and stored.scopes == ("Mail.Send",)
    assert "refresh-token" not in repr(stored)
    since = datetime.now(UTC)
    await auth.put_account_auth(
        AccountAuth("crm", "microsoft", "needs_reconsent", None, (), token, reconsent_since=since)
    )
    changed = await auth.get_account_auth("crm")
    assert changed is not None
    assert changed.state == "needs_reconsent" and changed.reconsent_since == since
    (sealed,) = await stores.db.fetch_one("SELECT token_ciphertext FROM account_auth") or (b"",)
    assert token not in bytes(sealed) and len(sealed) > len(token)
    await stores.close()
    stores = await backend.open(SecretBox(KEY))
    try:
        reopened = await stores.auth.get_account_auth("crm")
        assert reopened is not None and reopened.token == token
        await stores.auth.delete_account_auth("crm")
        assert await stores.auth.get_account_auth("crm") is None
    finally:
        await stores.close()


async def test_consent_links_are_single_use_and_expire(stores: Stores) -> None:
    auth = stores.auth
    now = datetime.now(UTC)
    await auth.add_consent_link("hash-a", "crm", now + timedelta(hours=1))
    await auth.add_consent_link("hash-b", "crm", now - timedelta(seconds=1))
    assert await auth.peek_consent_link("hash-a", now) == "crm"
    assert await auth.peek_consent_link("hash-a", now) == "crm"  # peeking does not spend it
    assert await auth.use_consent_link("hash-a", now) == "crm"
    assert await auth.use_consent_link("hash-a", now) is None  # spent
    assert await auth.peek_consent_link("hash-a", now) is None
    assert await auth.use_consent_link("hash-b", now) is None  # expired
    assert await auth.peek_consent_link("hash-b", now) is None
    assert await auth.use_consent_link("unknown", now) is None


PAYLOAD = b'{"code_verifier": "pkce-verifier-that-is-a-secret-0123456789"}'


async def test_pending_sign_ins_are_taken_once_and_expire(stores: Stores, backend: Backend) -> None:
    """A sign-in is taken at most once, only before it expires, and survives a restart."""
    auth = stores.auth
    now = datetime.now(UTC)
    await auth.put_pending_sign_in("state-a", "crm", PAYLOAD, now + timedelta(minutes=15))
    await auth.put_pending_sign_in("state-b", "crm", PAYLOAD, now - timedelta(seconds=1))
    await auth.put_pending_sign_in("state-c", "scanner", b"{}", now + timedelta(minutes=15))
    assert await auth.take_pending_sign_in("state-a", now) == ("crm", PAYLOAD)
    assert await auth.take_pending_sign_in("state-a", now) is None  # used
    assert await auth.take_pending_sign_in("state-b", now) is None  # expired
    assert await auth.take_pending_sign_in("unknown", now) is None
    await stores.close()
    stores = await backend.open(SecretBox(KEY))  # the gateway restarted before the callback
    try:
        assert await stores.auth.take_pending_sign_in("state-c", now) == ("scanner", b"{}")
        assert await stores.db.fetch_all("SELECT state_hash FROM pending_sign_ins") == []
    finally:
        await stores.close()


async def test_pending_sign_in_is_sealed_and_bound_to_its_row(stores: Stores) -> None:
    """The payload (a PKCE verifier) is encrypted, and does not open under another state."""
    auth = stores.auth
    later = datetime.now(UTC) + timedelta(minutes=15)
    await auth.put_pending_sign_in("state-a", "crm", PAYLOAD, later)
    row = await stores.db.fetch_one("SELECT sealed FROM pending_sign_ins")
    assert row is not None and b"pkce-verifier" not in bytes(row[0])
    await stores.db.execute(
        "UPDATE pending_sign_ins SET state_hash = ? WHERE state_hash = ?", ("state-x", "state-a")
    )
    with pytest.raises(StoreError, match="cannot decrypt"):
        await auth.take_pending_sign_in("state-x", datetime.now(UTC))


async def test_expired_pending_sign_ins_are_pruned(stores: Stores) -> None:
    auth = stores.auth
    now = datetime.now(UTC)
    await auth.put_pending_sign_in("live", "crm", PAYLOAD, now + timedelta(seconds=1))
    await auth.put_pending_sign_in("gone", "crm", PAYLOAD, now)
    await auth.prune_pending_sign_ins(now)
    assert await stores.db.fetch_all("SELECT state_hash FROM pending_sign_ins") == [("live",)]


async def test_two_instances_taking_one_sign_in_get_it_once(
    stores: Stores, backend: Backend
) -> None:
    """Callbacks with the same state on two instances at once: one gets the sign-in."""
    other = await backend.open(SecretBox(KEY))
    try:
        now = datetime.now(UTC)
        states = [f"state-{n}" for n in range(20)]
        for state in states:
            await stores.auth.put_pending_sign_in(state, "crm", PAYLOAD, now + timedelta(hours=1))
        takes = [
            opened.auth.take_pending_sign_in(state, now)
            for state in states
            for opened in (stores, other)
        ]
        taken = await asyncio.gather(*takes)
        for state, pair in zip(states, zip(taken[::2], taken[1::2], strict=True), strict=True):
            assert sorted(pair, key=lambda t: t is None) == [("crm", PAYLOAD), None], state
    finally:
        await other.close()


AT = datetime(2024, 5, 1, 9, 30, tzinfo=UTC)


def _view(state: MailboxState | None) -> tuple[int, int, str | None] | None:
    """What a sync stored (the version is the store's own count)."""
    return None if state is None else (state.uidvalidity, state.uidnext, state.cursor)


async def test_mailbox_changes_and_headers(stores: Stores) -> None:
    """A UID map with its cursor and headers, changed as syncs change it."""
    mailboxes = stores.mailboxes
    assert await mailboxes.load_mailbox("desk") == (None, [])
    first = [
        MailboxUid(1, "m1", AT, ("\\Seen",), 120),
        MailboxUid(2, "m2", AT, (), None, ("\\Flagged",)),
    ]
    version = await mailboxes.save_mailbox_sync(
        "desk", None, MailboxState(4_000_000_000, 3, "c1"), first
    )
    assert version is not None
    state, entries = await mailboxes.load_mailbox("desk")
    assert (_view(state), entries) == ((4_000_000_000, 3, "c1"), first)

    header = b"Subject: one\r\nFrom: a@example.com\r\n\r\n"
    await mailboxes.save_mailbox_headers("desk", {"m1": header, "unknown": b"X: y\r\n\r\n"})
    found = await mailboxes.load_mailbox_headers("desk", ["m1", "m2", "unknown"])
    assert found == {"m1": header}  # only messages of the map keep a header

    later = MailboxUid(3, "m3", AT, (), 300, None, True)
    edited = MailboxUid(2, "m2", AT, ("\\Answered",), 50)
    state = MailboxState(4_000_000_000, 4, "c2")
    assert await mailboxes.save_mailbox_sync("desk", version, state, [later], ["m1"], [edited])
    state, entries = await mailboxes.load_mailbox("desk")
    assert (_view(state), entries) == ((4_000_000_000, 4, "c2"), [edited, later])
    assert await mailboxes.load_mailbox_headers("desk", ["m1"]) == {}  # went with its row

    rebuilt = [MailboxUid(1, "m3", AT)]
    version = await mailboxes.mailbox_version("desk")
    state = MailboxState(7, 2, "c3")
    assert await mailboxes.save_mailbox_sync("desk", version, state, rebuilt, replace=True)
    state, entries = await mailboxes.load_mailbox("desk")
    assert (_view(state), entries) == ((7, 2, "c3"), rebuilt)
    assert await mailboxes.load_mailbox("other") == (None, [])


async def test_mailbox_change_that_fails_applies_nothing(stores: Stores) -> None:
    mailboxes = stores.mailboxes
    first = [MailboxUid(1, "m1", AT)]
    version = await mailboxes.save_mailbox_sync("desk", None, MailboxState(9, 2, "c1"), first)
    clash = MailboxUid(1, "m2", AT)  # UID 1 is taken
    with pytest.raises(StoreError):
        await mailboxes.save_mailbox_sync(
            "desk", version, MailboxState(9, 3, "c2"), [MailboxUid(2, "m3", AT), clash]
        )
    state, entries = await mailboxes.load_mailbox("desk")
    assert (_view(state), entries) == ((9, 2, "c1"), first)
    assert await mailboxes.mailbox_version("desk") == version


async def test_events_newest_first_across_reopen(backend: Backend, box: SecretBox) -> None:
    stores = await backend.open(box)
    try:
        for number in range(60):
            await stores.events.record_event("tick", detail=str(number))
    finally:
        await stores.close()
    stores = await backend.open(box)
    try:
        await stores.events.record_event("after")
        recent = await stores.events.recent_events()
    finally:
        await stores.close()
    assert len(recent) == 50  # the default limit
    assert [e.detail for e in recent[:3]] == [None, "59", "58"]
    assert [e.id for e in recent] == sorted((e.id for e in recent), reverse=True)
