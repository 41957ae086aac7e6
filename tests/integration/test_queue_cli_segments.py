"""``gateway queue`` beside a running ``gateway run`` on segment messages (issue 13's segments).

Small messages are entries of a shared append-only segment file (``queue/<id>.seg``), not files
of their own. Another process, the queue CLI, forgets one by marking its entry done in place
(its status byte) and never deletes a segment; only the gateway that prepared the spool does,
and never the one it appends to. These tests run both processes on one state directory, with
real SMTP clients and the sandbox's Graph, to show that such a delete is honoured by the
running gateway (the deleted message is never sent, the others exactly once) and that the
segment goes at the next start, once everything in it is done.

The file spool's rescan interval (30 s) is not configurable, so nothing here waits for a
periodic rescan: what the running gateway knows is read from its log at a graceful stop
(``spool.stopped left=N``), and the disk is read again by a restart (``spool.started``).
"""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway.spool._files import SpoolFiles
from mailgw_sandbox import Fault, Sandbox
from tests.helpers import (
    HOST,
    MS_ADDRESS,
    PASSWORD,
    GatewayProcess,
    connected_config,
    free_port,
    message_ids,
    sent_of,
    until,
)

QUEUED_AS = re.compile(rb"queued as (\S+)")
LISTED_ID = re.compile(r"^(\S+)  ", re.M)  # the first column of a ``gateway queue list`` entry


@dataclass
class Setup:
    """A ``gateway run`` process (not started) on a config wired to the sandbox."""

    gateway: GatewayProcess
    config: Path
    queue: Path  # <state_dir>/spool/queue
    log: Path

    def segments(self) -> list[str]:
        return sorted(path.name for path in self.queue.glob("*.seg"))

    def listing(self) -> list[str]:
        return sorted(path.name for path in self.queue.iterdir())

    def events(self, event: str) -> list[str]:
        """The gateway's log lines of ``event``, from every run (the log is appended to)."""
        return [line for line in self.log.read_text().splitlines() if f"event={event} " in line]

    def results(self) -> Counter[str]:
        """The delivery log's results, read from the files as ``gateway queue`` reads them."""
        deliveries = SpoolFiles(self.queue.parent).recent_deliveries(100)
        return Counter(line["result"] for line in deliveries)

    async def stop(self) -> None:
        """SIGTERM, as a service manager stops it: a graceful stop, exit status 0."""
        assert self.gateway.process is not None
        self.gateway.process.send_signal(signal.SIGTERM)
        assert await self.gateway.wait() == 0, self.gateway.output()

    async def kill(self) -> None:
        """The end of a test, whatever happened: no gateway left running."""
        self.gateway.kill()
        if self.gateway.process is not None:
            await self.gateway.wait()

    async def assert_empty(self) -> None:
        """``gateway queue list`` says there is nothing left."""
        status, out = await self.cli("list")
        assert (status, out.strip()) == (0, "the queue is empty"), out

    async def cli(self, *args: str) -> tuple[int, str]:
        """``python -m gateway queue ARGS -c CONFIG``, a process of its own: (status, output)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "queue", *args, "-c", str(self.config),
            stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(errors="replace")


def setup(sandbox: Sandbox, tmp_path: Path) -> Setup:
    """SMTP only (a port chosen here: the process cannot report port 0's choice), Graph by
    app-only credentials (no consent to give), and Graph answering 503 (Retry-After 1 s) to
    every request until the test clears the sandbox's faults."""
    smtp_port = free_port()
    config = connected_config(sandbox, tmp_path)
    config["listeners"] = {f"{name}_port": None for name in ("smtps", "imap", "imaps")}
    config["listeners"].update(pop3_port=None, pop3s_port=None, admin_port=None)
    config["listeners"]["smtp_port"] = smtp_port
    config["logging"] = {"level": "info"}  # spool.started / spool.stopped are info
    # The shortest backoffs the config allows; the 503's Retry-After sets the real pace.
    config["spool"] = {"first_backoff_seconds": 1, "max_backoff_minutes": 1}
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "gateway.log"
    sandbox.faults.add(Fault("graph", "503", remaining=10_000, retry_after="1"))
    gateway = GatewayProcess(config_file, log, smtp_port)
    return Setup(gateway, config_file, tmp_path / "state" / "spool" / "queue", log)


def submit(port: int, message_id: str) -> str:
    """One small message through SMTP as ``crm`` (Graph); its queue id from the 250 reply."""
    data = (
        f"From: {MS_ADDRESS}\r\nTo: alice@example.org\r\nSubject: {message_id}\r\n"
        f"Message-ID: {message_id}\r\n\r\nA small message, kept in a segment.\r\n"
    ).encode()
    with smtplib.SMTP(HOST, port, timeout=30) as client:
        client.login("crm", PASSWORD)
        assert client.mail(MS_ADDRESS)[0] == 250
        assert client.rcpt("alice@example.org")[0] == 250
        code, reply = client.data(data)
    assert code == 250, reply
    found = QUEUED_AS.search(reply)
    assert found is not None, reply
    return found.group(1).decode()


def sent_ids(sandbox: Sandbox, never: str) -> set[str]:
    """The Message-IDs in the mailbox's Sent; fails at once if ``never`` (deleted) is one."""
    sent = message_ids(sent_of(sandbox, MS_ADDRESS))
    if never in sent:
        pytest.fail(f"{never} was sent although gateway queue deleted it: Sent holds {sent}")
    return set(sent)


async def queued_in_a_segment(run: Setup, sandbox: Sandbox, wanted: list[str]) -> list[str]:
    """Submit ``wanted`` (Message-IDs) to the started gateway and wait until Graph refused
    twice: the messages then wait in the queue, entries of a segment. Their queue ids."""
    ids = [await asyncio.to_thread(submit, run.gateway.smtp_port, m) for m in wanted]
    assert len(set(ids)) == len(ids), ids
    await until(lambda: sandbox.faults.requests.get("graph", 0) >= 2, 15, "two 503s served")
    assert run.segments(), f"no segment in {run.listing()}"
    in_files = [i for i in ids if (run.queue / f"{i}.eml").exists()]
    assert in_files == [], f"small messages stored as files of their own: {in_files}"
    return ids


async def test_queue_cli_deletes_a_segment_message_the_running_gateway_then_never_sends(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """While Graph answers 503, three small messages wait in a segment of a running gateway.
    ``gateway queue`` (another process, beside it) lists them, deletes one (its entry marked
    done, the segment left in place: the gateway appends to it) and says a second delete of
    it matched nothing; ``retry`` makes the other two due. Once Graph is back, those two are
    sent exactly once and the deleted one never: the running gateway, which had it in memory,
    drops it without sending (it has no message left at its stop), and a restart, which
    reads the segment again, does not bring it back. The queue is then empty for the CLI."""
    run = setup(sandbox, tmp_path)
    wanted = [f"<segment-{n}@queue-cli.test>" for n in range(3)]
    try:
        await run.gateway.start()
        ids = await queued_in_a_segment(run, sandbox, wanted)

        status, out = await run.cli("list")
        assert status == 0, out
        assert set(LISTED_ID.findall(out)) == set(ids), out
        assert all(message_id in out for message_id in wanted), out

        doomed, kept = ids[1], [ids[0], ids[2]]
        status, out = await run.cli("delete", doomed)
        assert (status, out.strip()) == (0, f"deleted {doomed}"), out
        status, out = await run.cli("delete", doomed)
        assert (status, out.strip()) == (1, f"no message {doomed!r} in the queue"), out
        assert run.segments(), "gateway queue deleted a segment (only the gateway may)"
        status, out = await run.cli("list")
        assert status == 0 and set(LISTED_ID.findall(out)) == set(kept), out
        # Due now on disk (the gateway reads that at its next rescan, and meanwhile retries
        # on its own after each Retry-After); still refused by Graph, both are still queued.
        status, out = await run.cli("retry")
        assert (status, out.strip()) == (0, "2 message(s) will be retried"), out

        sandbox.faults.clear()
        await until(
            lambda: {wanted[0], wanted[2]} <= sent_ids(sandbox, never=wanted[1]),
            20,
            lambda: f"the two kept messages sent\n{run.gateway.output()}",
        )
        # Both forgotten after their send (the log line follows the done mark).
        await until(
            lambda: run.results() == {"sent": 2, "deleted": 1},
            10,
            lambda: f"2 sent and 1 deleted in the delivery log, not {run.results()}",
        )
        await run.assert_empty()
        assert run.segments(), "the segment the running gateway appends to was deleted"

        await run.stop()
        (stopped,) = run.events("spool.stopped")
        assert stopped.endswith(" left=0"), (
            f"the running gateway still had the deleted {doomed} in memory: {stopped}"
        )
        await run.gateway.start()  # its start-up scan reads the segment again
        started = run.events("spool.started")
        assert len(started) == 2 and started[1].endswith(" queued=0"), (
            f"the restart found messages to send (the deleted {doomed}?): {started}"
        )
        await run.assert_empty()
    finally:
        await run.kill()
    sent = Counter(message_ids(sent_of(sandbox, MS_ADDRESS)))
    assert sent == {wanted[0]: 1, wanted[2]: 1}, (
        f"expected {wanted[0]} and {wanted[2]} once each, never the deleted {wanted[1]}: {sent}"
    )


async def test_a_restart_deletes_the_segment_whose_entries_are_all_done(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """The running gateway never deletes the segment it appends to, and ``gateway queue``
    never deletes one at all, so a segment whose messages were all sent or deleted stays on
    disk until the gateway starts again: start-up must then delete it (here one entry was
    marked done by the gateway after its send, the other by the CLI's delete), or every
    restart would leave such a file behind for good."""
    run = setup(sandbox, tmp_path)
    try:
        await run.gateway.start()
        sent_id, deleted_id = await queued_in_a_segment(
            run, sandbox, ["<sent@restart.test>", "<deleted@restart.test>"]
        )
        status, out = await run.cli("delete", deleted_id)
        assert (status, out.strip()) == (0, f"deleted {deleted_id}"), out
        sandbox.faults.clear()
        await until(
            lambda: "<sent@restart.test>" in sent_ids(sandbox, never="<deleted@restart.test>"),
            20,
            "the message not deleted sent",
        )
        await until(
            lambda: run.results() == {"sent": 1, "deleted": 1},
            20,
            lambda: f"1 sent and 1 deleted in the delivery log, not {run.results()}",
        )
        await run.stop()
        before = run.segments()
        assert before, f"the segment went before the restart: it would prove nothing ({sent_id})"

        await run.gateway.start()
        listing = run.listing()
        assert not [name for name in listing if name.endswith(".seg")], (
            f"start-up kept {before}, all of whose entries are done: queue/ holds {listing}"
        )
        await run.assert_empty()
    finally:
        await run.kill()
    assert message_ids(sent_of(sandbox, MS_ADDRESS)) == ["<sent@restart.test>"]
