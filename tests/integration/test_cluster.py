"""Two gateway processes sharing one PostgreSQL, as an admin runs them behind a load balancer.

Issue 16's must-show that needs real processes: a SIGKILL of one instance in the middle of a
500-message burst sent to both loses and duplicates nothing (the survivor takes over the dead
one's claims when their leases expire, looking in Sent mail first where an attempt was under way).
PostgreSQL going away under a running gateway is tests/integration/test_spool_database.py's.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import signal
from collections import Counter
from pathlib import Path

import yaml

from gateway.store import KEY_ENV_VAR, migrate_postgresql
from mailgw_sandbox import Fault, Sandbox
from tests.helpers import (
    GOOGLE_ADDRESS,
    MS_ADDRESS,
    Burst,
    GatewayProcess,
    connected_config,
    free_port,
    message_ids,
    sent_of,
    until,
)

LEASE_SECONDS = 5  # short, so the survivor takes the dead instance's claims within the test


def instance_config(base: dict, root: Path, name: str, url: str) -> tuple[Path, int]:
    """One instance's config: its own state_dir and SMTP port, the shared database."""
    config = copy.deepcopy(base)
    config["state_dir"] = str(root / name / "state")
    smtp_port = free_port()
    config["listeners"] = {f"{kind}_port": None for kind in ("smtps", "imap", "imaps", "pop3")}
    config["listeners"].update(pop3s_port=None, admin_port=None, smtp_port=smtp_port)
    config["logging"] = {"level": "info"}
    config["store"] = {"url": url}
    config["spool"] = {"lease_seconds": LEASE_SECONDS}
    path = root / f"{name}.yaml"
    (root / name).mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path, smtp_port


async def start_cluster(
    sandbox: Sandbox, tmp_path: Path, url: str, count: int = 2
) -> list[GatewayProcess]:
    await migrate_postgresql(url)
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    base = connected_config(sandbox, tmp_path)
    instances = []
    for name in "abcdefgh"[:count]:
        path, port = instance_config(base, tmp_path, name, url)
        instance = GatewayProcess(path, tmp_path / f"{name}.log", port, {KEY_ENV_VAR: key})
        await instance.start()
        instances.append(instance)
    return instances


async def stop_all(instances: list[GatewayProcess]) -> None:
    for instance in instances:
        instance.kill()
        if instance.process is not None:
            await instance.wait()


def delivered(sandbox: Sandbox) -> Counter[str]:
    """Message-IDs in both sandbox mailboxes' Sent mail, with how often each arrived."""
    return Counter(
        message_ids(sent_of(sandbox, MS_ADDRESS)) + message_ids(sent_of(sandbox, GOOGLE_ADDRESS))
    )


async def test_sigkill_of_one_instance_in_a_burst_to_both_loses_and_duplicates_nothing(
    sandbox: Sandbox, tmp_path: Path, pg_url: str
) -> None:
    for target in ("graph", "gmail"):  # slow clouds: a backlog, and sends in flight at the kill
        sandbox.faults.add(Fault(target, "slow", remaining=150, delay=0.15))
    # Gmail's 15,000 units per user a minute is 150 sends: the survivor's 250 would wait for
    # the quota (test_throttle_burst covers that). This test is about the crash: room for 500.
    sandbox.throttle.configure("google", 100 * 500, 60.0)
    instances = await start_cluster(sandbox, tmp_path, pg_url)
    burst = Burst(500)
    workers = 4
    try:
        ports = [instance.smtp_port for instance in instances]
        clients = asyncio.gather(
            *(asyncio.to_thread(burst.client, w, workers, ports[w % 2]) for w in range(workers))
        )
        await until(lambda: len(burst.accepted) >= 200, 60, "200 messages accepted")
        instances[0].kill()
        await asyncio.wait_for(clients, 60)
        assert await instances[0].wait() == -signal.SIGKILL
        accepted, in_doubt = set(burst.accepted), set(burst.in_doubt)
        assert len(accepted) >= 300, "the survivor must have taken its clients' messages"

        def all_delivered() -> bool:
            return set(delivered(sandbox)) >= accepted

        def missing() -> str:
            lost = sorted(accepted - set(delivered(sandbox)))
            return f"{len(lost)} not delivered, e.g. {lost[:5]}\n{instances[1].output()}"

        await until(all_delivered, 90, missing)
        await asyncio.sleep(LEASE_SECONDS + 1)  # a late duplicate would show up by now
    finally:
        await stop_all(instances)
    sent = delivered(sandbox)
    twice = sorted(m for m, count in sent.items() if count > 1)
    assert twice == [], f"delivered more than once: {twice}"
    assert set(sent) <= accepted | in_doubt
    print(
        f"cluster crash: {len(accepted)} accepted, {len(in_doubt)} in doubt, "
        f"{len(sent)} delivered once each"
    )
