"""The spool in the shared database (issue 16, point 2), on a real PostgreSQL.

Two database spools on one database stand for two instances: they split the work and never
deliver one message twice; a claim whose instance died is taken over when its lease runs out,
looking in sent mail first where the attempt had begun; a provider's pause holds on every
instance; ``gateway queue`` works on the rows. A whole gateway with ``store.url`` delivers
through the sandbox's Graph and Gmail, and answers 451 (never 250) while PostgreSQL is down,
then delivers everything it accepted once PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import io
import smtplib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gateway.delivery import Temporary
from gateway.spool import DatabaseSpool, queue_main
from gateway.store import SecretBox, Stores, migrate_postgresql, open_postgresql
from mailgw_sandbox import Sandbox
from mailgw_sandbox.postgres import PostgresServer
from tests.helpers import (
    HOST,
    PASSWORD,
    connected_config,
    message_ids,
    running_cluster,
    sent_of,
    until,
)
from tests.unit.test_spool import RAW, Scripted, account, envelope

KEY = b"k" * 32


@asynccontextmanager
async def instance(
    url: str, tmp_path: Path, name: str, sender: Scripted, **options: Any
) -> AsyncIterator[DatabaseSpool]:
    """One instance's spool: its own stores (pool, listening connection) on the database."""
    stores: Stores = await open_postgresql(url, SecretBox(KEY))
    settings = {"first_backoff": 0.05, "max_backoff": 0.2, "rescan_interval": 0.5, **options}
    spool = DatabaseSpool(
        stores.db,
        stores.coordination,
        stores.backend,
        tmp_path / name,
        [account()],
        {"microsoft": sender},  # type: ignore[dict-item]
        owner=name,
        **settings,
    )
    try:
        yield spool
    finally:
        await spool.stop()
        await stores.close()


async def test_two_instances_split_the_work_and_deliver_each_message_once(
    pg_url: str, tmp_path: Path
) -> None:
    await migrate_postgresql(pg_url)
    first, second = Scripted(latency=0.05), Scripted(latency=0.05)
    async with (
        instance(pg_url, tmp_path, "a", first, max_in_flight=2) as a,
        instance(pg_url, tmp_path, "b", second, max_in_flight=2) as b,
    ):
        await a.start()
        await b.start()
        # All submitted to A: A is busy, so B takes messages at once (notified, not rescanned).
        ids = {(await a.submit(envelope(), RAW)).queue_id for _ in range(30)}
        await until(lambda: len(first.calls) + len(second.calls) >= 30, 20, "30 sends")
        await until(lambda: not a.messages() and not b.messages(), 10, "both queues empty")
        logged = await a.recent_deliveries(100)
    sent = [raw for _, raw in first.calls + second.calls]
    assert len(sent) == 30 and len(set(sent)) == 30  # each message exactly once
    assert first.calls and second.calls, "one instance did all the work"
    assert {entry["queue_id"] for entry in logged} == ids
    assert {entry["result"] for entry in logged} == {"sent"}


async def test_an_expired_claim_whose_send_had_begun_is_looked_up_not_sent_again(
    pg_url: str, tmp_path: Path
) -> None:
    await migrate_postgresql(pg_url)
    stores = await open_postgresql(pg_url, SecretBox(KEY))
    dead = DatabaseSpool(
        stores.db, stores.coordination, stores.backend, tmp_path / "dead", [account()],
        {"microsoft": Scripted()}, owner="dead", lease_seconds=1.0,  # type: ignore[dict-item]
    )  # fmt: skip
    found = await dead.submit(envelope(), RAW)
    lost = await dead.submit(envelope(), RAW)
    records = dead.messages()
    claims = await dead.database.claim_batch(records)
    assert [taken for taken, _ in claims] == [True, True]
    started = [record for _, record in claims if record is not None]
    for record in started:
        record.attempt_started, record.attempts = True, 1
    assert await dead.database.mark_batch(started) == [True, True]
    await stores.close()  # ... and the instance dies mid-send: no release, no renewal
    sent_before = {r.message_id for r in records if r.id == found.queue_id}
    survivor_sender = Scripted(sent_ids=sent_before)
    async with instance(pg_url, tmp_path, "survivor", survivor_sender) as survivor:
        await survivor.start()
        await until(lambda: not survivor.messages(), 15, "the dead instance's claims taken")
        logged = {e["queue_id"]: e for e in await survivor.recent_deliveries()}
    assert sorted(survivor_sender.lookups) == sorted(r.message_id for r in records)
    assert len(survivor_sender.calls) == 1  # only the one not found in sent mail was sent
    assert logged[found.queue_id]["detail"] == "found in sent mail after an interrupted attempt"
    assert logged[lost.queue_id]["result"] == "sent"


async def test_a_providers_pause_holds_on_every_instance(pg_url: str, tmp_path: Path) -> None:
    """Whichever instance claims the message gets the 429; the other hears of the pause at once
    and sends nothing for that mailbox, new submissions on either included."""
    await migrate_postgresql(pg_url)

    def throttled() -> Temporary:
        return Temporary("429 slow down", retry_after=30.0, throttled=True)

    senders = Scripted(throttled()), Scripted(throttled())
    async with (
        instance(pg_url, tmp_path, "a", senders[0]) as a,
        instance(pg_url, tmp_path, "b", senders[1]) as b,
    ):
        await b.start()
        await a.start()
        await a.submit(envelope(), RAW)
        await until(lambda: "crm" in a.pauses() and "crm" in b.pauses(), 10, "both paused")
        await b.submit(envelope(), RAW)
        await a.submit(envelope(), RAW)
        await asyncio.sleep(1.0)  # both workers pass several times (rescan 0.5 s) meanwhile
        assert len(senders[0].calls) + len(senders[1].calls) == 1  # only the throttled send
        assert abs(b.pauses()["crm"].timestamp() - a.pauses()["crm"].timestamp()) < 0.01


async def test_queue_commands_work_on_the_database_rows(pg_url: str, tmp_path: Path) -> None:
    await migrate_postgresql(pg_url)
    from gateway.delivery import Permanent

    sender = Scripted(Permanent("refused for a reason"))
    async with instance(pg_url, tmp_path, "a", sender) as spool:
        await spool.start()
        dead = await spool.submit(envelope(), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["dead"], 10, "dead letter")
        store = spool.database
        out = io.StringIO()
        assert await queue_main(store, "list", None, out) == 0
        assert dead.queue_id in out.getvalue() and "reason: refused for a reason" in out.getvalue()
        assert await queue_main(store, "retry", dead.queue_id, io.StringIO()) == 0
        await until(lambda: len(sender.calls) == 2, 10, "the retried message sent")
        await until(lambda: spool.messages() == [], 10, "the retried message gone")
        assert await queue_main(store, "delete", "nope", io.StringIO()) == 1
        sender.outcomes.append(Permanent("again"))
        again = await spool.submit(envelope(), RAW)
        await until(lambda: [r.state for r in spool.messages()] == ["dead"], 10, "dead again")
        assert await queue_main(store, "delete", again.queue_id, io.StringIO()) == 0
        assert await store.records() == []
        logged = await spool.recent_deliveries()
    assert [e["result"] for e in logged[:3]] == ["deleted", "dead", "sent"]


def send(port: int, account: str, address: str, subject: str) -> tuple[int, str]:
    """One SMTP session; the reply to the end of DATA (code, text)."""
    message = (
        f"From: {address}\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@e2e.test>\r\n\r\n{subject}\r\n"
    )
    with smtplib.SMTP(HOST, port, timeout=60) as client:
        client.login(account, PASSWORD)
        client.mail(address)
        client.rcpt("alice@example.org")
        code, text = client.data(message.encode())
    return code, text.decode()


async def test_a_gateway_on_postgresql_delivers_through_graph_and_gmail(
    sandbox: Sandbox, pg_url: str, tmp_path: Path
) -> None:
    config = connected_config(sandbox, tmp_path)
    async with running_cluster(config, tmp_path, pg_url, count=1) as (gateway,):
        assert isinstance(gateway.spool, DatabaseSpool)
        port = gateway.ports["smtp"]
        addresses = {a["username"]: a["address"] for a in config["accounts"]}
        replies = [
            await asyncio.to_thread(send, port, "crm", addresses["crm"], "pg-graph"),
            await asyncio.to_thread(send, port, "scanner", addresses["scanner"], "pg-gmail"),
        ]
        assert [code for code, _ in replies] == [250, 250]
        await until(lambda: gateway.spool.messages() == [], 20, "both delivered")
        logged = await gateway.spool.recent_deliveries()
    assert message_ids(sent_of(sandbox, addresses["crm"])) == ["<pg-graph@e2e.test>"]
    assert message_ids(sent_of(sandbox, addresses["scanner"])) == ["<pg-gmail@e2e.test>"]
    assert [e["result"] for e in logged] == ["sent", "sent"]


async def test_postgresql_down_means_451_then_everything_accepted_is_delivered(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Its own server: stopping the session's would break the other tests' databases."""
    with PostgresServer() as server:
        config = connected_config(sandbox, tmp_path)
        address = next(a["address"] for a in config["accounts"] if a["username"] == "crm")
        cluster = running_cluster(config, tmp_path, server.new_database(), count=1)
        async with cluster as (gateway,):
            port = gateway.ports["smtp"]
            before = await asyncio.to_thread(send, port, "crm", address, "before-outage")
            assert before[0] == 250
            await until(lambda: gateway.spool.messages() == [], 20, "the first delivered")
            await asyncio.to_thread(server.stop)
            code, text = await asyncio.to_thread(send, port, "crm", address, "during-outage")
            assert (code, text) == (451, "4.3.0 The gateway cannot queue the message right now, "
                                         "please retry later")  # fmt: skip
            await asyncio.to_thread(server.restart_after)
            await asyncio.to_thread(resend_until_accepted, port, address, "after-outage")
            await until(lambda: len(sent_of(sandbox, address)) == 2, 30, "both accepted sent")
            await until(lambda: gateway.spool.messages() == [], 30, "the spool empty")
    assert sorted(message_ids(sent_of(sandbox, address))) == [
        "<after-outage@e2e.test>",
        "<before-outage@e2e.test>",
    ]


def resend_until_accepted(port: int, address: str, subject: str, within: float = 30.0) -> None:
    """As a client does after a 4xx: try again (briefly) until the gateway takes it."""
    deadline = time.monotonic() + within
    while (reply := send(port, "crm", address, subject))[0] != 250:
        assert reply[0] == 451 and time.monotonic() < deadline, reply
        time.sleep(0.5)
