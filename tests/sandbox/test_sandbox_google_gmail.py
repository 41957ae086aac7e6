"""The sandbox's Gmail API, driven with httpx over HTTPS as the gateway drives the real one.

Tokens are minted straight from the directory: sign-in has its own tests, and each test here
needs a token with exactly the scopes it is about.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Callable
from email import message_from_bytes
from email.utils import parsedate_to_datetime

import httpx
import pytest

from mailgw_sandbox import Sandbox, User

AUTH = "https://www.googleapis.com/auth/"
MAIL, SEND, READONLY, MODIFY = (
    "https://mail.google.com/",
    AUTH + "gmail.send",
    AUTH + "gmail.readonly",
    AUTH + "gmail.modify",
)
MIB = 1024 * 1024

Connect = Callable[..., httpx.AsyncClient]


def rfc822(
    subject: str = "Hello",
    sender: str = "Ada <ada@example.com>",
    recipients: str = "To: bob@example.net",
    date: str = "Tue, 01 Oct 2024 09:30:00 +0000",
    message_id: str = "<hello-1@example.com>",
    body: str = "Hi there,\r\nsee you soon.\r\n",
) -> bytes:
    return (
        f"From: {sender}\r\n{recipients}\r\nSubject: {subject}\r\nDate: {date}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


@pytest.fixture
def ada(sandbox: Sandbox) -> User:
    return sandbox.add_user("google", "ada@example.com", "Ada", send_as=["ada@lovelace.example"])


@pytest.fixture
async def connect(sandbox: Sandbox, sandbox_tls: ssl.SSLContext) -> AsyncIterator[Connect]:
    """``connect(user, *scopes)``: a client on the user's mailbox with a fresh token."""
    clients: list[httpx.AsyncClient] = []

    def open_client(user: User, *scopes: str) -> httpx.AsyncClient:
        grant = sandbox.directory.issue("access", "google", "test-client", user.address, scopes)
        client = httpx.AsyncClient(
            base_url=f"{sandbox.url}/gmail/v1/users/me",
            verify=sandbox_tls,
            headers={"Authorization": f"Bearer {grant.token}"},
            timeout=30,
        )
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.aclose()


def upload_url(sandbox: Sandbox, upload_type: str) -> str:
    return f"{sandbox.url}/upload/gmail/v1/users/me/messages/send?uploadType={upload_type}"


async def test_send_raw_takes_recipients_from_headers_and_keeps_bcc_in_sent(
    sandbox: Sandbox, ada: User, connect: Connect
) -> None:
    bob = sandbox.add_user("google", "bob@example.net")
    gmail = connect(ada, SEND)
    raw = rfc822(
        recipients="To: Bob <bob@example.net>\r\nCc: carol@example.org\r\nBcc: Dan@X.example"
    )
    answer = await gmail.post("/messages/send", json={"raw": b64url(raw)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["labelIds"] == ["SENT"]
    [sent] = sandbox.ops(ada).sent(ada)
    assert sent.id == answer.json()["id"]
    assert sent.recipients == ("bob@example.net", "carol@example.org", "dan@x.example")
    assert sent.raw == raw and b"Bcc: Dan@X.example" in sent.raw
    [delivered_id] = sandbox.ops(bob).inbox_ids(bob)
    delivered = sandbox.google.mailbox(bob).get(delivered_id)
    assert b"Bcc:" not in delivered.raw and delivered.labels == {"INBOX", "UNREAD"}


async def test_unverified_from_is_rewritten_silently_and_an_alias_kept(
    sandbox: Sandbox, ada: User, connect: Connect
) -> None:
    gmail = connect(ada, SEND)
    for sender in ("Boss <ceo@example.com>", "Ada L <ada@lovelace.example>"):
        answer = await gmail.post("/messages/send", json={"raw": b64url(rfc822(sender=sender))})
        assert answer.status_code == 200
    rewritten, kept = sandbox.ops(ada).sent(ada)
    assert rewritten.from_address == "ada@example.com"
    assert b"From: Ada <ada@example.com>\r\n" in rewritten.raw
    assert b"ceo@example.com" not in rewritten.raw
    assert kept.from_address == "ada@lovelace.example"
    assert kept.raw == rfc822(sender="Ada L <ada@lovelace.example>")


async def test_send_completes_headers_and_the_sent_copy_is_searchable(
    sandbox: Sandbox, ada: User, connect: Connect
) -> None:
    bare = b"To: Ada <ada@example.com>\r\nSubject: note to self\r\n\r\nremember the milk\r\n"
    gmail = connect(ada, SEND, READONLY)
    sent = (await gmail.post("/messages/send", json={"raw": b64url(bare)})).json()
    assert sent["labelIds"] == ["INBOX", "SENT", "UNREAD"]  # to oneself: also delivered
    [copy] = sandbox.ops(ada).sent(ada)
    headers = message_from_bytes(copy.raw)
    assert headers["From"] == "Ada <ada@example.com>" and headers["Date"]
    found = await gmail.get(
        "/messages", params={"q": f"in:sent rfc822msgid:{headers['Message-ID']}"}
    )
    assert [m["id"] for m in found.json()["messages"]] == [sent["id"]]


async def test_control_api_seeds_the_gmail_inbox(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext, ada: User, connect: Connect
) -> None:
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as control:
        seeded = await control.post(
            f"/_sandbox/users/{ada.address}/inbox",
            content=rfc822(),
            headers={"X-Sandbox-Control": "1"},
        )
    assert seeded.status_code == 201
    listed = await connect(ada, READONLY).get("/messages", params={"q": "is:unread in:inbox"})
    assert [m["id"] for m in listed.json()["messages"]] == [seeded.json()["id"]]


async def test_send_refuses_bad_requests(ada: User, connect: Connect) -> None:
    gmail = connect(ada, SEND)
    no_recipient = await gmail.post(
        "/messages/send", json={"raw": b64url(rfc822(recipients="X-Note: none"))}
    )
    unknown_field = await gmail.post("/messages/send", json={"raw": "eA==", "mimeType": "x"})
    missing = await gmail.post("/messages/send", json={})
    too_big = await gmail.post("/messages/send", json={"raw": "A" * (5 * MIB + 1)})
    assert no_recipient.json()["error"]["message"] == "Recipient address required"
    assert 'Unknown name "mimeType"' in unknown_field.json()["error"]["message"]
    assert "'raw' RFC822 payload" in missing.json()["error"]["message"]
    assert [r.status_code for r in (no_recipient, unknown_field, missing)] == [400, 400, 400]
    assert too_big.status_code == 413


async def test_media_and_multipart_uploads(sandbox: Sandbox, ada: User, connect: Connect) -> None:
    gmail = connect(ada, SEND)
    first = rfc822(message_id="<m1@example.com>")
    media = await gmail.post(
        upload_url(sandbox, "media"), content=first, headers={"Content-Type": "message/rfc822"}
    )
    assert media.status_code == 200, media.text
    wrong_type = await gmail.post(
        upload_url(sandbox, "media"), content=first, headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"]["errors"][0]["reason"] == "badContent"

    second = rfc822(message_id="<m2@example.com>")
    thread = media.json()["threadId"]
    body = (
        b"--b1\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
        + f'{{"threadId": "{thread}"}}'.encode()
        + b"\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        + second
        + b"\r\n--b1--\r\n"
    )
    multipart = await gmail.post(
        upload_url(sandbox, "multipart"),
        content=body,
        headers={"Content-Type": 'multipart/related; boundary="b1"'},
    )
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["threadId"] == thread
    assert [m.raw for m in sandbox.ops(ada).sent(ada)] == [first, second]


async def test_resumable_upload_in_chunks(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext, ada: User, connect: Connect
) -> None:
    gmail = connect(ada, SEND)
    raw = rfc822(body="x" * (5 * MIB) + "\r\n")
    start = await gmail.post(
        upload_url(sandbox, "resumable"),
        headers={
            "X-Upload-Content-Type": "message/rfc822",
            "X-Upload-Content-Length": str(len(raw)),
        },
    )
    assert start.status_code == 200
    session = start.headers["Location"]
    assert session.startswith(f"{sandbox.url}/upload/gmail/v1/users/me/messages/send?")
    chunk, statuses, offset = 2 * MIB, [], 0
    probe = await gmail.put(session, headers={"Content-Range": f"bytes */{len(raw)}"})
    assert probe.status_code == 308 and "Range" not in probe.headers
    while offset < len(raw):
        part = raw[offset : offset + chunk]
        answer = await gmail.put(  # the client's bearer token on every PUT, as Google's send it
            session,
            content=part,
            headers={"Content-Range": f"bytes {offset}-{offset + len(part) - 1}/{len(raw)}"},
        )
        statuses.append(answer.status_code)
        offset += len(part)
        if answer.status_code == 308:
            assert answer.headers["Range"] == f"bytes=0-{offset - 1}"
    assert statuses == [308, 308, 200]
    assert answer.json()["labelIds"] == ["SENT"]
    assert sandbox.ops(ada).sent(ada)[0].raw == raw


async def test_resumable_upload_puts_need_the_bearer_token_of_the_session_user(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext, ada: User, connect: Connect
) -> None:
    """The session URI alone is no credential: a PUT without a token, with a revoked one or
    with another user's gets no byte stored; a new token of the same user carries on."""
    gmail = connect(ada, SEND)
    raw = rfc822(body="z" * MIB + "\r\n")
    start = await gmail.post(
        upload_url(sandbox, "resumable"), headers={"X-Upload-Content-Length": str(len(raw))}
    )
    session = start.headers["Location"]
    head = {"Content-Range": f"bytes 0-{len(raw) - 1}/{len(raw)}"}
    async with httpx.AsyncClient(verify=sandbox_tls) as anonymous:
        bare = await anonymous.put(session, content=raw, headers=head)
    assert bare.status_code == 401 and bare.json()["error"]["errors"][0]["reason"] == "required"
    other = connect(sandbox.add_user("google", "eve@example.com"), SEND)
    stranger = await other.put(session, content=raw, headers=head)
    assert stranger.status_code == 403
    sandbox.directory.revoke_access_tokens(ada.address)
    revoked = await gmail.put(session, content=raw, headers=head)
    assert revoked.status_code == 401
    assert revoked.json()["error"]["errors"][0]["reason"] == "authError"
    assert 'error="invalid_token"' in revoked.headers["WWW-Authenticate"]
    assert sandbox.ops(ada).sent(ada) == []
    done = await connect(ada, SEND).put(session, content=raw, headers=head)
    assert done.status_code == 200, done.text
    assert sandbox.ops(ada).sent(ada)[0].raw == raw


async def test_uploads_over_35_mib_are_refused(
    sandbox: Sandbox, ada: User, connect: Connect
) -> None:
    gmail = connect(ada, SEND)
    limit = 36_700_160
    declared = await gmail.post(
        upload_url(sandbox, "resumable"), headers={"X-Upload-Content-Length": str(limit + 1)}
    )
    assert declared.status_code == 413
    oversized = rfc822(body="y" * limit)
    media = await gmail.post(
        upload_url(sandbox, "media"), content=oversized, headers={"Content-Type": "message/rfc822"}
    )
    assert media.status_code == 413
    assert media.json()["error"]["code"] == 413
    assert sandbox.ops(ada).sent(ada) == []


async def test_list_and_get_formats(sandbox: Sandbox, ada: User, connect: Connect) -> None:
    ops = sandbox.ops(ada)
    raws = [
        rfc822(
            subject=f"Note {n}",
            date=f"Tue, 0{n} Oct 2024 09:30:00 +0000",
            message_id=f"<note-{n}@example.com>",
        )
        for n in (1, 2, 3)
    ]
    ids = [ops.seed_inbox(ada, raw) for raw in raws]
    gmail = connect(ada, READONLY)

    page = (await gmail.get("/messages", params={"labelIds": "INBOX", "maxResults": 2})).json()
    assert [m["id"] for m in page["messages"]] == [ids[2], ids[1]]  # newest first
    rest = (await gmail.get("/messages", params={"pageToken": page["nextPageToken"]})).json()
    assert [m["id"] for m in rest["messages"]] == [ids[0]] and "nextPageToken" not in rest
    found = await gmail.get("/messages", params={"q": "rfc822msgid:<note-2@example.com>"})
    assert [m["id"] for m in found.json()["messages"]] == [ids[1]]
    none = await gmail.get("/messages", params={"labelIds": ["INBOX", "SENT"]})
    assert none.json() == {"resultSizeEstimate": 0}

    raw = (await gmail.get(f"/messages/{ids[0]}", params={"format": "raw"})).json()
    assert base64.urlsafe_b64decode(raw["raw"]) == raws[0]
    assert isinstance(raw["historyId"], str) and isinstance(raw["sizeEstimate"], int)
    date = parsedate_to_datetime("Tue, 01 Oct 2024 09:30:00 +0000")
    assert raw["internalDate"] == str(int(date.timestamp() * 1000))
    assert raw["snippet"] == "Hi there, see you soon." and "payload" not in raw

    metadata = await gmail.get(
        f"/messages/{ids[0]}", params={"format": "metadata", "metadataHeaders": "Subject"}
    )
    assert metadata.json()["payload"]["headers"] == [{"name": "Subject", "value": "Note 1"}]
    full = (await gmail.get(f"/messages/{ids[0]}")).json()["payload"]
    assert full["mimeType"] == "text/plain"
    assert base64.urlsafe_b64decode(full["body"]["data"]) == b"Hi there,\r\nsee you soon.\r\n"
    minimal = (await gmail.get(f"/messages/{ids[0]}", params={"format": "minimal"})).json()
    assert set(minimal) == {
        "id",
        "threadId",
        "labelIds",
        "snippet",
        "sizeEstimate",
        "historyId",
        "internalDate",
    }
    missing = await gmail.get("/messages/0123456789abcdef")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


async def test_history_records_every_change_and_expires(
    sandbox: Sandbox, ada: User, connect: Connect
) -> None:
    gmail = connect(ada, MODIFY)
    start = (await gmail.get("/profile")).json()["historyId"]
    unchanged = (await gmail.get("/history", params={"startHistoryId": start})).json()
    assert unchanged == {"historyId": start}

    ops = sandbox.ops(ada)
    first, second = ops.seed_inbox(ada, rfc822()), ops.seed_inbox(ada, rfc822(subject="Two"))
    ops.move(ada, first, "archive")
    modified = await gmail.post(
        f"/messages/{second}/modify",
        json={"addLabelIds": ["STARRED"], "removeLabelIds": ["UNREAD"]},
    )
    assert modified.json()["labelIds"] == ["INBOX", "STARRED"]
    ops.delete(ada, first)

    history = (await gmail.get("/history", params={"startHistoryId": start})).json()
    records = history["history"]
    ids = [int(record["id"]) for record in records]
    assert ids == sorted(ids) and len(set(ids)) == 5 and int(history["historyId"]) == ids[-1]
    assert [
        sorted(k for k in r if k.endswith(("Added", "Removed", "Deleted"))) for r in records
    ] == [
        ["messagesAdded"],
        ["messagesAdded"],
        ["labelsRemoved"],
        ["labelsAdded", "labelsRemoved"],
        ["messagesDeleted"],
    ]
    assert records[2]["labelsRemoved"][0]["labelIds"] == ["INBOX"]
    assert records[0]["messagesAdded"][0]["message"]["labelIds"] == ["INBOX", "UNREAD"]
    added_only = await gmail.get(
        "/history", params={"startHistoryId": start, "historyTypes": "messageAdded"}
    )
    assert len(added_only.json()["history"]) == 2

    sandbox.google.expire_history(ada)
    gone = await gmail.get("/history", params={"startHistoryId": start})
    assert gone.status_code == 404
    assert gone.json()["error"]["errors"][0]["reason"] == "notFound"


async def test_starring_in_gmail_is_the_starred_label_with_a_history_record(
    sandbox: Sandbox, sandbox_tls: ssl.SSLContext, ada: User, connect: Connect
) -> None:
    gmail = connect(ada, READONLY)
    message = sandbox.ops(ada).seed_inbox(ada, rfc822())
    start = (await gmail.get("/profile")).json()["historyId"]
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as control:
        starred = await control.post(
            f"/_sandbox/users/{ada.address}/messages/{message}/flag",
            json={"flagged": True},
            headers={"X-Sandbox-Control": "1"},
        )
    assert starred.json() == {"flagged": True}
    labels = (await gmail.get(f"/messages/{message}", params={"format": "minimal"})).json()
    assert labels["labelIds"] == ["INBOX", "STARRED", "UNREAD"]
    sandbox.ops(ada).set_flagged(ada, message, True)  # already starred: nothing changes
    sandbox.ops(ada).set_flagged(ada, message, False)
    records = (await gmail.get("/history", params={"startHistoryId": start})).json()["history"]
    changes = [
        (kind, change["labelIds"], change["message"]["labelIds"])
        for record in records
        for kind in ("labelsAdded", "labelsRemoved")
        for change in record.get(kind, ())
    ]
    assert changes == [
        ("labelsAdded", ["STARRED"], ["INBOX", "STARRED", "UNREAD"]),
        ("labelsRemoved", ["STARRED"], ["INBOX", "UNREAD"]),
    ]
    assert all(record["messages"] == [{"id": message, "threadId": message}] for record in records)


async def test_modify_rules(sandbox: Sandbox, ada: User, connect: Connect) -> None:
    message = sandbox.ops(ada).seed_inbox(ada, rfc822())
    gmail = connect(ada, MODIFY)
    sent_label = await gmail.post(f"/messages/{message}/modify", json={"addLabelIds": ["SENT"]})
    assert sent_label.status_code == 400
    assert sent_label.json()["error"]["message"] == "Invalid label: SENT"
    empty = await gmail.post(f"/messages/{message}/modify", json={})
    assert empty.json()["error"]["message"] == "No label add or removes specified"
    trashed = await gmail.post(f"/messages/{message}/trash")
    assert trashed.json()["labelIds"] == ["TRASH", "UNREAD"]
    assert (await gmail.get("/messages")).json() == {"resultSizeEstimate": 0}
    listed = await gmail.get("/messages", params={"includeSpamTrash": "true"})
    assert listed.json()["resultSizeEstimate"] == 1
    untrashed = await gmail.post(f"/messages/{message}/untrash")
    assert untrashed.json()["labelIds"] == ["INBOX", "UNREAD"]
    read_only = await connect(ada, READONLY).post(
        f"/messages/{message}/modify", json={"removeLabelIds": ["UNREAD"]}
    )
    assert read_only.status_code == 403
    not_full = await gmail.delete(f"/messages/{message}")
    assert not_full.status_code == 403
    deleted = await connect(ada, MAIL).delete(f"/messages/{message}")
    assert deleted.status_code == 204 and sandbox.ops(ada).inbox_ids(ada) == []


async def test_profile_and_send_as(sandbox: Sandbox, ada: User, connect: Connect) -> None:
    sandbox.ops(ada).seed_inbox(ada, rfc822())
    gmail = connect(ada, READONLY)
    profile = (await gmail.get("/profile")).json()
    assert profile["emailAddress"] == ada.address
    assert (profile["messagesTotal"], profile["threadsTotal"]) == (1, 1)
    assert isinstance(profile["historyId"], str)
    send_as = (await gmail.get("/settings/sendAs")).json()["sendAs"]
    assert [(s["sendAsEmail"], s.get("isPrimary", False)) for s in send_as] == [
        ("ada@example.com", True),
        ("ada@lovelace.example", False),
    ]
    assert send_as[1]["verificationStatus"] == "accepted" and send_as[1]["treatAsAlias"]


async def test_credentials_and_scopes_are_enforced(
    sandbox: Sandbox, ada: User, connect: Connect
) -> None:
    sender = connect(ada, SEND)
    denied = await sender.get("/profile")
    assert denied.status_code == 403
    assert denied.json()["error"]["message"] == "Request had insufficient authentication scopes."
    assert denied.json()["error"]["errors"][0]["reason"] == "insufficientPermissions"

    reader = connect(ada, READONLY)
    sandbox.directory.expire_access_tokens("google")
    expired = await reader.get("/profile")
    assert expired.status_code == 401
    assert expired.json()["error"]["errors"][0] == {
        "domain": "global",
        "reason": "authError",
        "message": "Invalid Credentials",
        "locationType": "header",
        "location": "Authorization",
    }
    assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]

    metadata = connect(ada, AUTH + "gmail.metadata")
    searched = await metadata.get("/messages", params={"q": "is:unread"})
    assert searched.json()["error"]["message"] == "Metadata scope does not support 'q' parameter"
    reader = connect(ada, READONLY)  # the first one expired
    typo = await reader.get("/messages", params={"labelId": "INBOX"})
    assert typo.status_code == 400
    assert 'Unknown name "labelId"' in typo.json()["error"]["message"]
    bob = sandbox.add_user("google", "bob@example.net")
    other = await reader.get(f"{sandbox.url}/gmail/v1/users/{bob.address}/profile")
    assert other.status_code == 403 and "Delegation denied" in other.text
