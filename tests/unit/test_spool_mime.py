"""Header rewriting for the API senders and the offset-based MIME walk of large messages."""

from __future__ import annotations

import email
import os
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage

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
