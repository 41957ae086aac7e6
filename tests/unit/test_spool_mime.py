"""Header rewriting for the API senders and the offset-based MIME walk of large messages."""

from __future__ import annotations

import base64
import email
import hashlib
import mmap
import os
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.delivery import Envelope
from gateway.providers._mime import prepare, split_head
from gateway.providers._parts import attachments
from gateway.providers.graph import _without


def _envelope(*rcpts: str) -> Envelope:
    return Envelope("crm", "a@example.com", rcpts, False, datetime.now(UTC), "::1")


def test_envelope_only_recipient_becomes_bcc_and_unknown_header_recipient_is_removed() -> None:
    raw = (
        b"From: A <a@example.com>\r\nTo: Bob <bob@example.org>, Eve <eve@example.org>\r\n"
        b"Cc: carol@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    )
    prepared = prepare(raw, _envelope("BOB@example.org", "hidden@example.net"))
    sent = email.message_from_bytes(prepared.joined(), policy=policy.default)
    assert str(sent["To"]) == "Bob <bob@example.org>"
    assert sent["Cc"] is None
    assert str(sent["Bcc"]) == "hidden@example.net"
    assert prepared.dropped == ("eve@example.org", "carol@example.org")
    assert prepared.from_address == "a@example.com"
    assert prepared.joined().endswith(b"\r\n\r\nbody\r\n")


def test_headers_matching_the_envelope_are_left_byte_exact() -> None:
    raw = (
        b"From: a@example.com\nTo: =?utf-8?q?B=C3=B6b?= <b@example.org>\nBcc: c@example.org\n\nx\n"
    )
    prepared = prepare(raw, _envelope("b@example.org", "c@example.org"))
    assert prepared.joined() == raw
    assert prepared.range(5, 30) == raw[5:30]
    assert b"".join(prepared.chunks(7)) == raw


def test_missing_recipients_join_an_existing_bcc_and_long_lists_are_folded() -> None:
    many = [f"person{n}@example.org" for n in range(8)]
    raw = b"From: a@example.com\r\nBcc: person0@example.org\r\n\r\nx"
    prepared = prepare(raw, _envelope(*many))
    head, _, _ = split_head(prepared.joined())
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    sent = email.message_from_bytes(prepared.joined(), policy=policy.default)
    assert [a.addr_spec for a in sent["Bcc"].addresses] == many


def _mixed(*files: tuple[str, bytes], text: bool = True) -> bytes:
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = "a@example.com"
    mail["Subject"] = "parts"
    if text:
        mail.set_content("hello\n")
        mail.add_alternative("<p>hello</p>", subtype="html")
    else:
        mail.make_mixed()
    for name, data in files:
        mail.add_attachment(data, maintype="application", subtype="pdf", filename=name)
    return mail.as_bytes()


def test_attachments_are_found_sized_and_decoded_in_pieces() -> None:
    first, second = os.urandom(100_001), os.urandom(5000)
    raw = _mixed(("one.pdf", first), ("two.pdf", second))
    _, offset, _ = split_head(raw)
    head = email.message_from_bytes(raw[:offset], policy=policy.default)
    found = attachments(raw, offset, head)  # type: ignore[arg-type]
    assert [(a.name, a.size, a.content_type) for a in found] == [
        ("one.pdf", len(first), "application/pdf"),
        ("two.pdf", len(second), "application/pdf"),
    ]
    pieces = list(found[0].decoded(raw, 30_000))
    assert [len(p) for p in pieces] == [30_000, 30_000, 30_000, 10_001]
    assert b"".join(pieces) == first

    draft = email.message_from_bytes(
        raw[:offset] + _without(raw, offset, found[:1]), policy=policy.default
    )
    names = [p.get_filename() for p in draft.walk() if p.get_filename()]
    assert names == ["two.pdf"]
    assert draft.get_body(("plain",)).get_content().strip() == "hello"  # type: ignore[union-attr]


def test_lifting_every_part_leaves_a_valid_multipart() -> None:
    raw = _mixed(("only.pdf", os.urandom(2000)), text=False)
    _, offset, _ = split_head(raw)
    head = email.message_from_bytes(raw[:offset], policy=policy.default)
    found = attachments(raw, offset, head)  # type: ignore[arg-type]
    assert [a.name for a in found] == ["only.pdf"]
    draft = email.message_from_bytes(raw[:offset] + _without(raw, offset, found))
    assert [p.get_content_type() for p in draft.walk()] == ["multipart/mixed", "text/plain"]
    assert not draft.defects


def test_a_single_part_message_has_no_attachments() -> None:
    raw = b"From: a@example.com\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
    _, offset, _ = split_head(raw)
    head = email.message_from_bytes(raw[:offset], policy=policy.default)
    assert attachments(raw, offset, head) == []  # type: ignore[arg-type]


def _mapping_rss_kib(path: Path) -> int:
    """The resident size of this process's mapping of ``path`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line.rstrip().endswith(str(path)):
                inside = True
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError(f"{path} is not mapped")


def test_a_mapped_message_is_scanned_and_decoded_in_place_and_its_pages_let_go(
    tmp_path: Path,
) -> None:
    """Issue 13: the Graph draft path copied the mapped spool file to the heap to scan it; it is
    scanned and decoded where it lies, and what was read is unmapped again as it goes."""
    payload = os.urandom(9 * 1024 * 1024)
    raw = _mixed(("big.pdf", payload), ("small.pdf", b"x" * 500))
    path = tmp_path / "message"
    path.write_bytes(raw)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        prepared = prepare(mapped, _envelope())
        head = email.message_from_bytes(prepared.head, policy=policy.default)
        found = attachments(mapped, prepared.body_offset, head)  # type: ignore[arg-type]
        assert [(a.name, a.size) for a in found] == [("big.pdf", len(payload)), ("small.pdf", 500)]
        assert _mapping_rss_kib(path) < 1024  # the 12 MB scanned, not left mapped
        digest, sizes = hashlib.sha256(), []
        for piece in found[0].decoded(mapped, 3 * 1024 * 1024):
            digest.update(piece)
            sizes.append(len(piece))
            assert _mapping_rss_kib(path) < 1024
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert sizes == [3 * 1024 * 1024] * 3
        draft = prepared.head + _without(mapped, prepared.body_offset, found[:1])
        parsed = email.message_from_bytes(draft, policy=policy.default)
        assert [p.get_filename() for p in parsed.iter_attachments()] == ["small.pdf"]


@pytest.mark.parametrize("line", [4, 76, 1000, 0], ids=["4-char", "76-char", "1000-char", "one"])
def test_base64_of_any_line_length_decodes_in_exact_pieces(line: int) -> None:
    """Each piece is cut from exactly the characters it needs, whatever the line breaks."""
    payload = os.urandom(100_000)
    encoded = base64.b64encode(payload)
    if line:
        encoded = b"\r\n".join(encoded[i : i + line] for i in range(0, len(encoded), line))
    raw = (
        b'From: a@example.com\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b'--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="f"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"\r\n--b--\r\n"
    )
    _, offset, _ = split_head(raw)
    head = email.message_from_bytes(raw[:offset], policy=policy.default)
    (found,) = attachments(raw, offset, head)  # type: ignore[arg-type]
    assert found.size == len(payload)
    pieces = list(found.decoded(raw, 30_000))
    assert [len(p) for p in pieces] == [30_000, 30_000, 30_000, 10_000]
    assert b"".join(pieces) == payload
