"""The whole gateway against a real Dovecot, byte for byte, with the same edge-case corpus.

The corpus of ``test_imap_compat`` (multipart/alternative, attachments with quoted ``;``, nested
message/rfc822, folded, RFC 2047 and raw UTF-8 headers, Japanese bodies, malformed and missing
Content-Type, duplicate headers, LF-only and header-only messages) is seeded into a Graph and a
Gmail sandbox mailbox and delivered into the private Dovecot. Every FETCH form of that test then
goes to the gateway (imaplib, STARTTLS, LOGIN, EXAMINE INBOX: the full path through login, the
mailbox view, the provider API and the renderer) and to Dovecot, and the untagged responses
must be identical bytes. Only UIDs are normalised (each server numbers its own messages);
sequence numbers are equal because both INBOXes hold exactly the corpus, in the same order.

SEARCH of every RFC 3501 key is compared on the same corpus (the ``* SEARCH`` lines). Documented
differences, in ``KNOWN_DIFFERENCES`` with their reason: only \\Recent (RECENT, NEW, OLD).
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import socket
from collections.abc import AsyncIterator

import pytest

from gateway.sandbox.upstream import Dovecot, MailUser
from tests.gateway_accounts import Gateway, RawIMAP, two_account_gateway
from tests.integration.test_imap_compat import FETCHES
from tests.unit.test_imap_render import CORPUS

# \\Recent is per session: the reference session is the first to see the delivered mail, so
# Dovecot reports it recent; the gateway never sets \\Recent (RFC 3501 allows a server not to).
_RECENT = "the gateway never reports \\Recent; Dovecot does to the first session after delivery"
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {
    ("SEARCH", "RECENT"): _RECENT,
    ("SEARCH", "NEW"): _RECENT,
    ("SEARCH", "OLD"): _RECENT,
}

# Beyond test_imap_compat's forms: several items at once (the order of items and their
# rendering side by side), and UID FETCH, which adds the UID item the client did not ask for.
EXTRA_FETCHES = [
    "RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)] ENVELOPE",
    "BODY.PEEK[1]<0.10> BODY.PEEK[2.MIME] BODY.PEEK[TEXT]<1.3> BODYSTRUCTURE",
]
LISTINGS = [
    "UID RFC822.SIZE",
    "UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO CC SUBJECT DATE MESSAGE-ID CONTENT-TYPE)]",
]
UID_FETCHES = ["BODY.PEEK[HEADER]", "RFC822.SIZE BODYSTRUCTURE"]
# Every RFC 3501 search key (6.4.4) on the same corpus. INTERNALDATE differs by construction
# (Dovecot's is the delivery time, the sandbox's the seeding time), so SINCE/BEFORE/ON use
# bounds both sides fall within.
SEARCHES = [
    "ALL",
    "ANSWERED",
    "UNANSWERED",
    "DELETED",
    "UNDELETED",
    "DRAFT",
    "UNDRAFT",
    "FLAGGED",
    "UNFLAGGED",
    "SEEN",
    "UNSEEN",
    "NEW",
    "OLD",
    "RECENT",
    "KEYWORD $Forwarded",
    "UNKEYWORD $Forwarded",
    "KEYWORD \\Seen",
    "LARGER 600",
    "SMALLER 600",
    "SENTBEFORE 5-Jan-2023",
    "SENTON 4-Mar-2026",
    "SENTSINCE 3-Mar-2026",
    "SENTBEFORE 1-Jan-1971",
    "SINCE 1-Jan-2020",
    "BEFORE 1-Jan-2020",
    "ON 1-Jan-2020",
    "FROM example.org",
    "TO example",
    "CC example",
    "BCC example",
    "SUBJECT subject",
    'HEADER Message-ID "@example.com"',
    "BODY line",
    "TEXT folded",
    "NOT SUBJECT x OR SEEN LARGER 300",
    "(SMALLER 300 UNSEEN) 2:*",
    "UID 1:*",
]


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with two_account_gateway(tmp_path_factory.mktemp("differential")) as running:
        for account in ("crm", "scanner"):
            for raw in CORPUS.values():
                running.seed(account, raw)
        yield running


_UID = re.compile(rb"\bUID \d+")


def _normalise(response: bytes) -> bytes:
    """Replace UIDs in the response line (never inside a literal: the corpus has none)."""
    return _UID.sub(b"UID n", response)


def _transcript(client: RawIMAP) -> dict[tuple[str, str], bytes]:
    assert client.command("EXAMINE INBOX")[-1].split()[1] == b"OK"
    out: dict[tuple[str, str], bytes] = {}
    # First, as a client's first sync does: sizes before any body was downloaded (the gateway
    # must know the exact size of the CRLF form), then headers of every message in one FETCH.
    for fetch in LISTINGS:
        responses = client.command(f"FETCH 1:* ({fetch})")
        assert responses[-1].split()[1] == b"OK", (fetch, responses)
        out["1:*", fetch] = b"".join(_normalise(r) for r in responses[:-1])
    for key in SEARCHES:
        responses = client.command(f"SEARCH {key}")
        assert responses[-1].split()[1] == b"OK", (key, responses)
        out["SEARCH", key] = b"".join(r for r in responses[:-1] if r.startswith(b"* SEARCH"))
    for seq, name in enumerate(CORPUS, 1):
        for fetch in FETCHES + EXTRA_FETCHES:
            responses = client.command(f"FETCH {seq} ({fetch})")
            assert responses[-1].split()[1] == b"OK", (name, fetch, responses)
            out[name, fetch] = b"".join(_normalise(r) for r in responses[:-1])
        # UID FETCH of the message's own UID, found through the sequence number
        uid = re.search(rb"UID (\d+)", client.command(f"FETCH {seq} (UID)")[0]).group(1)
        for fetch in UID_FETCHES:
            responses = client.command(f"UID FETCH {uid.decode()} ({fetch})")
            assert responses[-1].split()[1] == b"OK", (name, fetch, responses)
            out[name, "UID " + fetch] = b"".join(_normalise(r) for r in responses[:-1])
    return out


def _dovecot(dovecot: Dovecot, user: MailUser) -> dict[tuple[str, str], bytes]:
    client = RawIMAP(socket.create_connection((dovecot.host, dovecot.imap_port), timeout=15))
    try:
        assert client.command(f"LOGIN {user.name} {user.password}")[-1].split()[1] == b"OK"
        return _transcript(client)
    finally:
        client.close()


def _gateway(gw: Gateway, account: str) -> dict[tuple[str, str], bytes]:
    client: imaplib.IMAP4 = gw.imap(account)  # STARTTLS, then LOGIN
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    try:
        return _transcript(RawIMAP.over(client))
    finally:
        client.shutdown()


@pytest.fixture(scope="module")
async def reference(dovecot: Dovecot) -> dict[tuple[str, str], bytes]:
    user = dovecot.new_user("gateway-differential")
    for raw in CORPUS.values():
        await asyncio.to_thread(dovecot.deliver, user.name, raw)
    return await asyncio.to_thread(_dovecot, dovecot, user)


@pytest.mark.parametrize("account", ["crm", "scanner"], ids=["graph", "gmail"])
async def test_gateway_fetches_equal_dovecot_byte_for_byte(
    gw: Gateway, reference: dict[tuple[str, str], bytes], account: str
) -> None:
    ours = await asyncio.to_thread(_gateway, gw, account)
    assert ours.keys() == reference.keys()
    per_message = len(FETCHES) + len(EXTRA_FETCHES) + len(UID_FETCHES)
    assert len(reference) == len(CORPUS) * per_message + len(LISTINGS) + len(SEARCHES)
    differences = {k: (reference[k], ours[k]) for k in reference if reference[k] != ours[k]}
    unexpected = {k: v for k, v in differences.items() if k not in KNOWN_DIFFERENCES}
    assert not unexpected, f"{len(unexpected)} responses differ from Dovecot:\n" + "\n".join(
        f"{k}:\n dovecot {v[0]!r}\n gateway {v[1]!r}" for k, v in list(unexpected.items())[:15]
    )
    # Sanity: the comparison covered real content, not empty answers.
    assert all(value.startswith(b"* ") for value in reference.values())
    assert b"BODYSTRUCTURE" in ours["japanese", "BODYSTRUCTURE"]
    assert "日本語の本文です".encode() in ours["japanese", "BODY.PEEK[TEXT]"]
    assert (
        ours["SEARCH", "ALL"]
        == b"* SEARCH " + " ".join(map(str, range(1, len(CORPUS) + 1))).encode() + b"\r\n"
    )
    assert ours["SEARCH", "ANSWERED"] == b"* SEARCH\r\n"  # no trailing space
