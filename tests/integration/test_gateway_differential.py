"""The whole gateway against a real Dovecot, byte for byte, with the same edge-case corpus.

The corpus of ``test_imap_compat`` (multipart/alternative, attachments with quoted ``;``, nested
message/rfc822, folded, RFC 2047 and raw UTF-8 headers, Japanese bodies, malformed and missing
Content-Type, duplicate headers, LF-only and header-only messages, RFC 2231 continuations, NUL
bytes, folded ENVELOPE fields) is seeded into a Graph and a Gmail sandbox mailbox and into the
upstream Dovecot mailbox of an upstream IMAP account, and delivered into a reference Dovecot
mailbox. Every FETCH form of that test then goes to the gateway (imaplib, STARTTLS, LOGIN,
EXAMINE INBOX: the full path through login, the mailbox view, the provider API and the renderer)
and to Dovecot, and the untagged responses must be identical bytes. Only UIDs are normalised
(each server numbers its own messages); sequence numbers are equal because every INBOX holds
exactly the corpus, in the same order.

Every flag is part of the corpus (``FLAGS``): Dovecot's copies get \\Seen, \\Flagged,
\\Answered, \\Draft, $Forwarded and $MDNSent (set with doveadm: an IMAP SELECT would take
\\Recent from the reference session); the cloud mailboxes get what their web clients can set
(read, and Outlook's follow-up flag or Gmail's star) through the sandbox's own operations.
SELECT's FLAGS, FETCH FLAGS and SEARCH of every RFC 3501 key are compared per account kind.

Documented differences: the flags a provider cannot carry (``CANNOT_CARRY``, each with its
reason) are left out of that kind's Dovecot reference, so the gateway must equal Dovecot serving
the mail as the provider holds it, byte for byte; and \\Recent (``RECENT_DIFFERENCES``), which
the gateway never reports. An upstream IMAP account carries every flag: only \\Recent differs.
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from mailgw_sandbox import MailboxOps, User
from mailgw_sandbox.upstream import Dovecot, MailUser
from tests.gateway_accounts import Gateway, RawIMAP, two_account_gateway
from tests.integration.test_imap_compat import FETCHES
from tests.unit.test_imap_render import CORPUS

# \\Recent is per session: the reference session is the first to see the delivered mail, so
# Dovecot reports it recent; the gateway never sets \\Recent (RFC 3501 allows a server not to).
_RECENT = "the gateway never reports \\Recent; Dovecot does to the first session after delivery"
# Documented differences for every account kind: these SEARCH answers, and \\Recent in FLAGS.
RECENT_DIFFERENCES = {("SEARCH", key): _RECENT for key in ("RECENT", "NEW", "OLD")}

# The flags each message carries in Dovecot (the reference and the upstream account's mailbox).
FLAGS: dict[str, tuple[str, ...]] = {
    "alternative": ("\\Flagged",),
    "attachment": ("\\Answered", "\\Seen"),
    "nested": ("$Forwarded",),
    "headers": ("\\Answered", "\\Flagged", "$Forwarded"),
    "japanese": ("\\Draft",),
    "semicolon": ("\\Flagged", "\\Seen"),
    "rfc2231": ("\\Answered", "\\Draft", "\\Flagged", "$Forwarded", "$MDNSent"),
    "nul-byte": ("\\Seen",),
}

_GRAPH_MESSAGE = "https://learn.microsoft.com/en-us/graph/api/resources/message"
_GMAIL_LABELS = "https://developers.google.com/gmail/api/guides/labels"
_GRAPH_KEYWORDS = (
    "Graph has no IMAP keywords: Outlook's categories are names from the user's category "
    f"list, not message keywords, and are not mapped ({_GRAPH_MESSAGE})"
)
_GMAIL_KEYWORDS = (
    "Gmail keeps per-message state only as labels, and user labels are folders in Gmail's own "
    f"IMAP, not keywords ({_GMAIL_LABELS})"
)
# Documented differences: per account kind, the flags its provider cannot carry, and why.
CANNOT_CARRY: dict[str, dict[str, str]] = {
    "graph": {
        "\\Answered": "the Graph message resource has no answered state; its per-message states "
        f"are isRead and flag ({_GRAPH_MESSAGE}; Outlook keeps a reply only in the MAPI "
        "property PidTagLastVerbExecuted, outside the resource)",
        "\\Draft": "isDraft is true only for an unsent item Outlook created and is not among "
        "the properties an update may change (https://learn.microsoft.com/en-us/graph/api/"
        "message-update): a message received into the Inbox is never a draft",
        "$Forwarded": _GRAPH_KEYWORDS,
        "$MDNSent": _GRAPH_KEYWORDS,
    },
    "gmail": {
        "\\Answered": "Gmail has no answered label, and labels are its only message state "
        f"({_GMAIL_LABELS})",
        "\\Draft": "DRAFT is applied only to drafts and cannot be applied by hand (Manage labels, "
        f"{_GMAIL_LABELS}): a received INBOX message never has it",
        "$Forwarded": _GMAIL_KEYWORDS,
        "$MDNSent": _GMAIL_KEYWORDS,
    },
    "upstream": {},  # an upstream IMAP server keeps every flag, and the gateway carries each
}
ACCOUNTS = {"graph": "crm", "gmail": "scanner", "upstream": "legacy"}

# Beyond test_imap_compat's forms: several items at once (the order of items and their
# rendering side by side), and UID FETCH, which adds the UID item the client did not ask for.
EXTRA_FETCHES = [
    "RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID)] ENVELOPE",
    "BODY.PEEK[1]<0.10> BODY.PEEK[2.MIME] BODY.PEEK[TEXT]<1.3> BODYSTRUCTURE",
    "FLAGS",
    "FLAGS UID RFC822.SIZE",
]
LISTINGS = [
    "UID FLAGS",
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
    "KEYWORD $MDNSent",
    "UNKEYWORD $MDNSent",
    "KEYWORD $NotThere",
    "FLAGGED UNSEEN",
    "UNFLAGGED SEEN",
    "OR ANSWERED FLAGGED",
    "NOT DRAFT FLAGGED",
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


def _cloud_flag_ops(ops: MailboxOps) -> dict[str, Callable[[User, str], None]]:
    """How a person sets each flag the clouds keep, in Outlook or Gmail's web client."""
    return {
        "\\Seen": lambda user, message_id: ops.set_read(user, message_id, True),
        "\\Flagged": lambda user, message_id: ops.set_flagged(user, message_id, True),
    }


def _dovecot_flags(dovecot: Dovecot, user: MailUser, leave_out: frozenset[str]) -> None:
    """Set ``FLAGS`` (less ``leave_out``) on the user's corpus copy, with doveadm: an IMAP
    SELECT would take \\Recent from the reference session that reads the mailbox next."""
    for uid, name in enumerate(CORPUS, 1):
        if flags := [flag for flag in FLAGS.get(name, ()) if flag not in leave_out]:
            where = ("mailbox", "INBOX", "uid", str(uid))
            dovecot.doveadm("flags", "add", "-u", user.name, " ".join(flags), *where)


@pytest.fixture(scope="module")
async def gw(tmp_path_factory: pytest.TempPathFactory, dovecot: Dovecot) -> AsyncIterator[Gateway]:
    directory = tmp_path_factory.mktemp("differential")
    async with two_account_gateway(directory, dovecot) as running:
        for kind, account in ACCOUNTS.items():
            for raw in CORPUS.values():
                await asyncio.to_thread(running.seed, account, raw)
            if account in running.upstream:
                upstream, user = running.upstream[account]
                await asyncio.to_thread(_dovecot_flags, upstream, user, frozenset())
                continue
            user = running.users[account]
            ops = running.sandbox.ops(user)
            set_flag = _cloud_flag_ops(ops)
            for message_id, name in zip(ops.inbox_ids(user), CORPUS, strict=True):
                for flag in FLAGS.get(name, ()):
                    if flag not in CANNOT_CARRY[kind]:
                        set_flag[flag](user, message_id)
        yield running


_UID = re.compile(rb"\bUID \d+")
_FLAG_LIST = re.compile(rb"FLAGS \(([^)]*)\)")


def _normalise(response: bytes) -> bytes:
    """Replace UIDs in the response line (never inside a literal: the corpus has none)."""
    return _UID.sub(b"UID n", response)


def _without_recent(response: bytes) -> bytes:
    """``response`` with \\Recent taken out of its FLAGS lists (the corpus's bodies have none)."""

    def strip(match: re.Match[bytes]) -> bytes:
        names = [name for name in match.group(1).split() if name.lower() != b"\\recent"]
        return b"FLAGS (" + b" ".join(names) + b")"

    return _FLAG_LIST.sub(strip, response)


def _transcript(client: RawIMAP) -> dict[tuple[str, str], bytes]:
    examined = client.command("EXAMINE INBOX")
    assert examined[-1].split()[1] == b"OK"
    out: dict[tuple[str, str], bytes] = {
        ("EXAMINE", "FLAGS"): b"".join(
            r for r in examined if r.startswith((b"* FLAGS", b"* OK [PERMANENTFLAGS"))
        )
    }
    # First, as a client's first sync does: flags and sizes before any body was downloaded (the
    # gateway must know the exact size of the CRLF form), then headers of every message.
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
async def references(dovecot: Dovecot) -> dict[frozenset[str], dict[tuple[str, str], bytes]]:
    """Dovecot's transcript of the corpus with every flag, and with each account kind's
    ``CANNOT_CARRY`` flags left out (what Dovecot answers about mail the provider holds)."""
    out = {}
    for leave_out in {frozenset(flags) for flags in CANNOT_CARRY.values()}:
        user = dovecot.new_user("gateway-differential")
        for raw in CORPUS.values():
            await asyncio.to_thread(dovecot.deliver, user.name, raw)
        await asyncio.to_thread(_dovecot_flags, dovecot, user, leave_out)
        out[leave_out] = await asyncio.to_thread(_dovecot, dovecot, user)
    return out


def test_documented_differences_name_only_flags_the_corpus_carries() -> None:
    """Each flag a provider cannot carry is on some message (so it makes a difference that
    the comparison checks), and every other flag of the corpus is one the sandbox can set as
    the provider's web client does (so the comparison shows the gateway carries it)."""
    corpus_flags = {flag for flags in FLAGS.values() for flag in flags}
    for kind, missing in CANNOT_CARRY.items():
        assert set(missing) <= corpus_flags, kind
        assert all(reason for reason in missing.values()), kind
        if kind != "upstream":
            assert corpus_flags - set(missing) == {"\\Seen", "\\Flagged"}, kind


@pytest.mark.parametrize("kind", list(ACCOUNTS))
async def test_gateway_fetches_equal_dovecot_byte_for_byte(
    gw: Gateway, references: dict[frozenset[str], dict[tuple[str, str], bytes]], kind: str
) -> None:
    reference = references[frozenset(CANNOT_CARRY[kind])]
    ours = await asyncio.to_thread(_gateway, gw, ACCOUNTS[kind])
    assert ours.keys() == reference.keys()
    per_message = len(FETCHES) + len(EXTRA_FETCHES) + len(UID_FETCHES)
    assert len(reference) == len(CORPUS) * per_message + len(LISTINGS) + len(SEARCHES) + 1
    expected = {k: _without_recent(v) for k, v in reference.items() if k not in RECENT_DIFFERENCES}
    differences = {k: (v, ours[k]) for k, v in expected.items() if v != ours[k]}
    assert not differences, f"{len(differences)} responses differ from Dovecot:\n" + "\n".join(
        f"{k}:\n dovecot {v[0]!r}\n gateway {v[1]!r}" for k, v in list(differences.items())[:15]
    )
    # \Recent, the one difference for every kind: never reported by the gateway.
    assert reference["SEARCH", "RECENT"] == reference["SEARCH", "ALL"] != ours["SEARCH", "RECENT"]
    assert ours["SEARCH", "RECENT"] == ours["SEARCH", "NEW"] == b"* SEARCH\r\n"  # no trailing space
    assert ours["SEARCH", "OLD"] == ours["SEARCH", "ALL"]
    # Sanity: the comparison covered real content and real flags, not empty answers.
    assert all(value.startswith(b"* ") for value in reference.values())
    assert b"BODYSTRUCTURE" in ours["japanese", "BODYSTRUCTURE"]
    assert "日本語の本文です".encode() in ours["japanese", "BODY.PEEK[TEXT]"]
    assert (
        ours["SEARCH", "ALL"]
        == b"* SEARCH " + " ".join(map(str, range(1, len(CORPUS) + 1))).encode() + b"\r\n"
    )
    flagged = [seq for seq, name in enumerate(CORPUS, 1) if "\\Flagged" in FLAGS.get(name, ())]
    assert ours["SEARCH", "FLAGGED"] == b"* SEARCH %b\r\n" % " ".join(map(str, flagged)).encode()
    assert b"\\Flagged" in ours["headers", "FLAGS"] and b"\\Seen" in ours["semicolon", "FLAGS"]
    carried = b" ".join(v for k, v in ours.items() if k[0] != "EXAMINE")
    for flag in CANNOT_CARRY[kind]:
        assert flag.encode() not in carried, (kind, flag)
    if kind == "upstream":
        assert ours["rfc2231", "FLAGS"].startswith(
            b"* 14 FETCH (FLAGS (\\Answered \\Flagged \\Draft $Forwarded $MDNSent))"
        )
