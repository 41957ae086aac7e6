"""The sandbox's Microsoft Graph mail API, driven with httpx over HTTPS as the gateway will.

Tokens come straight from the directory (the sign-in flows have their own tests); every other
step is a real HTTP request against the sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from mailgw_sandbox import Sandbox, User

ADDRESS = "adele@contoso.example"
IMMUTABLE = {"Prefer": 'IdType="ImmutableId"'}
MiB = 1024 * 1024
START = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def _raw(number: int, **headers: str) -> bytes:
    fields = {
        "From": "Bob Kelly <bob@fabrikam.example>",
        "To": f"Adele Vance <{ADDRESS}>",
        "Subject": f"Message {number}",
        "Message-ID": f"<{number}@fabrikam.example>",
        "Date": "Sat, 01 Mar 2025 08:00:00 +0000",
        **headers,
    }
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items() if value)
    return f"{head}\r\nHello number {number}.\r\n".encode()


def _recipient(address: str) -> dict[str, Any]:
    return {"emailAddress": {"address": address}}


def _path_id(message_id: str) -> str:
    """Ids contain ``=``, ``-`` and ``_``: percent-encode them in paths, as clients should."""
    return quote(message_id, safe="")


def _token(sandbox: Sandbox, user: User, *scopes: str) -> str:
    app = sandbox.add_app("microsoft", secret=False)
    return sandbox.directory.issue("access", "microsoft", app.client_id, user.address, scopes).token


@pytest.fixture
def adele(sandbox: Sandbox) -> User:
    return sandbox.add_user("microsoft", ADDRESS, "Adele Vance", send_as=("sales@contoso.example",))


def _client(sandbox: Sandbox, sandbox_tls: Any, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        verify=sandbox_tls, base_url=f"{sandbox.url}/v1.0", headers=headers, timeout=30
    )


@pytest.fixture
async def graph(
    sandbox: Sandbox, sandbox_tls: Any, adele: User
) -> AsyncIterator[httpx.AsyncClient]:
    token = _token(sandbox, adele, "User.Read", "Mail.ReadWrite", "Mail.Send")
    async with _client(sandbox, sandbox_tls, token) as client:
        yield client


def _seed(sandbox: Sandbox, user: User, count: int) -> list[str]:
    """Deliver ``count`` messages a minute apart; returns their immutable ids, oldest first."""
    ops = sandbox.ops(user)
    return [
        ops.seed_inbox(user, _raw(n), received_at=START + timedelta(minutes=n))
        for n in range(count)
    ]


def _graph_error(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


# -- authentication and permissions ---------------------------------------------------------


async def test_bearer_tokens_are_checked(sandbox: Sandbox, sandbox_tls: Any, adele: User) -> None:
    token = _token(sandbox, adele, "User.Read")
    google = sandbox.directory.issue("access", "google", "g", ADDRESS, ["gmail.send"]).token
    async with _client(sandbox, sandbox_tls, token) as client:
        me = await client.get("/me")
        by_id = await client.get(f"/users/{adele.id}")
        sandbox.directory.expire_access_tokens("microsoft")
        expired = await client.get("/me")
        missing = await client.get("/me", headers={"Authorization": ""})
        wrong_cloud = await client.get("/me", headers={"Authorization": f"Bearer {google}"})
    assert me.status_code == 200 and me.json()["userPrincipalName"] == ADDRESS
    assert by_id.json()["id"] == adele.id
    assert _graph_error(expired) == (
        401,
        "InvalidAuthenticationToken",
        "Lifetime validation failed, the token is expired.",
    )
    assert expired.headers["WWW-Authenticate"].startswith("Bearer ")
    assert _graph_error(missing) == (401, "InvalidAuthenticationToken", "Access token is empty.")
    assert wrong_cloud.status_code == 401


async def test_a_revoked_token_is_refused_at_once_with_a_claims_challenge(
    sandbox: Sandbox, sandbox_tls: Any, adele: User
) -> None:
    """Continuous access evaluation: an unexpired but revoked token gets 401 with
    ``error="insufficient_claims"`` and base64 claims asking for a token issued after the
    revocation, on every try; a new token is accepted."""
    token = _token(sandbox, adele, "User.Read")
    async with _client(sandbox, sandbox_tls, token) as client:
        assert (await client.get("/me")).status_code == 200
        assert sandbox.directory.revoke_access_tokens(ADDRESS) == 1
        refused = [await client.get("/me") for _ in range(2)]
        renewed = await client.get(
            "/me", headers={"Authorization": f"Bearer {_token(sandbox, adele, 'User.Read')}"}
        )
    for answer in refused:
        assert _graph_error(answer)[:2] == (401, "InvalidAuthenticationToken")
        challenge = answer.headers["WWW-Authenticate"]
        assert challenge.startswith("Bearer ") and 'error="insufficient_claims"' in challenge
        encoded = re.search(r'claims="([^"]+)"', challenge).group(1)
        claims = json.loads(base64.b64decode(encoded))
        assert claims["access_token"]["nbf"]["essential"] is True
        assert int(claims["access_token"]["nbf"]["value"]) >= int(sandbox.directory.clock()) - 5
    assert renewed.status_code == 200


async def test_permissions_are_checked_per_endpoint(
    sandbox: Sandbox, sandbox_tls: Any, adele: User
) -> None:
    bob = sandbox.add_user("microsoft", "bob@contoso.example")
    [message_id] = _seed(sandbox, adele, 1)
    read_only = _token(sandbox, adele, "Mail.Read")
    async with _client(sandbox, sandbox_tls, read_only) as client:
        listed = await client.get("/me/mailFolders/inbox/messages")
        patched = await client.patch(f"/me/messages/{_path_id(message_id)}", json={"isRead": True})
        sent = await client.post("/me/sendMail", json={"message": {}})
        other = await client.get(f"/users/{bob.address}/mailFolders/inbox/messages")
        nobody = await client.get("/users/nobody@contoso.example/messages")
        unknown = await client.get("/me/mailboxSettings")
    denied = (403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
    assert listed.status_code == 200
    assert _graph_error(patched) == denied
    assert _graph_error(sent) == denied
    assert _graph_error(other) == denied
    assert _graph_error(nobody)[:2] == (404, "ErrorInvalidUser")
    assert _graph_error(unknown) == (
        400,
        "BadRequest",
        "Resource not found for the segment 'mailboxSettings'.",
    )


async def test_fifth_concurrent_request_on_a_mailbox_is_throttled(
    sandbox: Sandbox, graph: httpx.AsyncClient
) -> None:
    gate = sandbox.microsoft.hold_graph_requests()
    requests = [asyncio.create_task(graph.get("/me/mailFolders/inbox/messages")) for _ in range(5)]
    # Four requests hold the mailbox's four slots until the gate opens, so exactly one answers.
    done, holding = await asyncio.wait(requests, return_when=asyncio.FIRST_COMPLETED)
    [throttled] = [task.result() for task in done]
    gate.set()
    served = await asyncio.gather(*holding)
    assert _graph_error(throttled) == (
        429,
        "ApplicationThrottled",
        "Application is over its MailboxConcurrency limit.",
    )
    assert float(throttled.headers["Retry-After"]) > 0
    assert [response.status_code for response in served] == [200] * 4
    assert sandbox.microsoft.graph.in_flight[ADDRESS] == 0


async def test_request_bodies_over_4_mb_are_refused(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    message = {
        "subject": "Too big",
        "body": {"contentType": "Text", "content": "x" * int(4.1 * MiB)},
        "toRecipients": [_recipient("carol@fabrikam.example")],
    }
    sized = await graph.post("/me/sendMail", json={"message": message})
    payload = base64.b64encode(b"x" * (3 * MiB + MiB // 10))

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), MiB):
            yield payload[start : start + MiB]

    chunked = await graph.post(
        "/me/sendMail", content=chunks(), headers={"Content-Type": "text/plain"}
    )
    for response in (sized, chunked):
        assert _graph_error(response) == (
            400,
            "BadRequest",
            "The maximum request length supported is 4MB.",
        )
    inner = sized.json()["error"]["innerError"]
    assert {"date", "request-id", "client-request-id"} <= inner.keys()
    assert sandbox.ops(adele).sent(adele) == []


# -- sending --------------------------------------------------------------------------------


async def test_send_mail_json_with_and_without_sent_items(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    message = {
        "subject": "Quarterly numbers",
        "body": {"contentType": "Text", "content": "See attached."},
        "toRecipients": [_recipient("carol@fabrikam.example")],
        "ccRecipients": [_recipient("Dan@Fabrikam.example")],
        "bccRecipients": [_recipient("erin@fabrikam.example")],
        "internetMessageHeaders": [{"name": "X-Gateway-Id", "value": "42"}],
        "attachments": [
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "numbers.csv",
                "contentType": "text/csv",
                "contentBytes": base64.b64encode(b"q1,q2\n1,2\n").decode(),
            }
        ],
    }
    unsaved = await graph.post("/me/sendMail", json={"message": message, "saveToSentItems": False})
    saved = await graph.post("/me/sendMail", json={"message": message})
    bad_header = await graph.post(
        "/me/sendMail",
        json={
            "message": {**message, "internetMessageHeaders": [{"name": "Gateway", "value": "1"}]}
        },
    )
    sent_items = await graph.get("/me/mailFolders/sentitems/messages")
    assert (unsaved.status_code, saved.status_code) == (202, 202)
    assert _graph_error(bad_header)[:2] == (400, "InvalidInternetMessageHeader")
    first, second = sandbox.ops(adele).sent(adele)
    assert first.recipients == (
        "carol@fabrikam.example",
        "dan@fabrikam.example",
        "erin@fabrikam.example",
    )
    assert (first.saved_to_sent, second.saved_to_sent) == (False, True)
    parsed = email.message_from_bytes(first.raw, policy=email.policy.default)
    assert parsed["X-Gateway-Id"] == "42" and parsed["From"].addresses[0].addr_spec == ADDRESS
    [attachment] = parsed.iter_attachments()
    assert attachment.get_content() == "q1,q2\n1,2\n"
    [copy] = sent_items.json()["value"]
    assert copy["subject"] == "Quarterly numbers" and copy["isDraft"] is False


async def test_send_mime_takes_recipients_from_headers_including_bcc(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    def mime(sender: str) -> bytes:
        raw = _raw(1, From=sender, To="carol@fabrikam.example", **{"Message-ID": ""})
        raw = raw.replace(b"Subject:", b"Bcc: hidden@fabrikam.example\r\nSubject:")
        return base64.encodebytes(raw)  # 76-character lines, as in Graph's own example

    text = {"Content-Type": "text/plain"}
    accepted = await graph.post("/me/sendMail", content=mime(ADDRESS), headers=text)
    alias = await graph.post("/me/sendMail", content=mime("sales@contoso.example"), headers=text)
    stranger = await graph.post("/me/sendMail", content=mime("ceo@contoso.example"), headers=text)
    garbage = await graph.post("/me/sendMail", content=b"not base64 at all!", headers=text)
    assert (accepted.status_code, alias.status_code) == (202, 202)
    assert _graph_error(stranger)[:2] == (403, "ErrorSendAsDenied")
    assert _graph_error(garbage) == (
        400,
        "ErrorMimeContentInvalidBase64String",
        "Invalid base64 string for MIME content.",
    )
    first, second = sandbox.ops(adele).sent(adele)
    assert first.recipients == ("carol@fabrikam.example", "hidden@fabrikam.example")
    assert second.from_address == "sales@contoso.example"
    assert re.search(rb"^Message-ID: <[0-9A-F]+@contoso\.example>\r\n", first.raw)


async def test_a_draft_marked_delete_after_submit_is_sent_without_a_sent_items_copy(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    """PidTagDeleteAfterSubmit (Boolean 0x0E01) set with PATCH on a MIME draft, or in a JSON
    draft's create request: the message goes out and no copy is left in any folder."""
    text = {"Content-Type": "text/plain"}
    marked = {"singleValueExtendedProperties": [{"id": "Boolean 0x0E01", "value": "true"}]}

    async def mime_draft(number: int) -> str:
        raw = _raw(number, From=ADDRESS, To="carol@fabrikam.example")
        created = await graph.post("/me/messages", content=base64.b64encode(raw), headers=text)
        assert created.status_code == 201
        return _path_id(created.json()["id"])

    gone, kept = await mime_draft(1), await mime_draft(2)
    patched = await graph.patch(f"/me/messages/{gone}", json=marked)
    json_draft = await graph.post(
        "/me/messages",
        json={
            "subject": "JSON draft",
            "toRecipients": [_recipient("dan@fabrikam.example")],
            "singleValueExtendedProperties": [{"id": "Boolean 0x0e01000b", "value": "True"}],
        },
    )
    sends = [
        await graph.post(f"/me/messages/{path}/send")
        for path in (gone, kept, _path_id(json_draft.json()["id"]))
    ]
    assert patched.status_code == 200 and json_draft.status_code == 201
    assert [r.status_code for r in sends] == [202, 202, 202]
    first, second, third = sandbox.ops(adele).sent(adele)
    assert first.recipients == ("carol@fabrikam.example",) and b"Message 1" in first.raw
    assert third.recipients == ("dan@fabrikam.example",)
    assert (first.saved_to_sent, second.saved_to_sent, third.saved_to_sent) == (
        False,
        True,
        False,
    )

    async def subjects(folder: str) -> list[str]:
        listed = await graph.get(f"/me/mailFolders/{folder}/messages")
        return [message["subject"] for message in listed.json()["value"]]

    folders = ("sentitems", "drafts", "deleteditems")
    assert [await subjects(folder) for folder in folders] == [["Message 2"], [], []]
    assert (await graph.get(f"/me/messages/{gone}")).status_code == 404


@pytest.mark.parametrize(
    ("prop", "code"),
    [
        ({"id": "Boolean 0x0E01", "value": "yes"}, "ErrorInvalidExtendedPropertyValue"),
        ({"id": "Boolean 0x8001", "value": "true"}, "ErrorInvalidExtendedProperty"),
        ({"id": "Bool 0x0E01", "value": "true"}, "ErrorInvalidExtendedProperty"),
        ({"id": "Boolean 0E01", "value": "true"}, "ErrorInvalidExtendedProperty"),
        ({"id": "Boolean 0x0E01", "value": True}, "ErrorInvalidExtendedProperty"),
    ],
)
async def test_malformed_extended_properties_are_refused(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User, prop: dict[str, Any], code: str
) -> None:
    [message_id] = _seed(sandbox, adele, 1)
    path = f"/me/messages/{_path_id(message_id)}"
    refused = await graph.patch(path, json={"singleValueExtendedProperties": [prop]})
    assert _graph_error(refused)[:2] == (400, code)
    assert sandbox.microsoft.store.mailbox(adele).find(message_id).extended == {}


async def test_large_message_through_draft_upload_session_and_send(
    sandbox: Sandbox, sandbox_tls: Any, graph: httpx.AsyncClient, adele: User
) -> None:
    draft = await graph.post(
        "/me/messages",
        json={
            "subject": "Big report",
            "body": {"contentType": "HTML", "content": "<p>Report attached.</p>"},
            "toRecipients": [_recipient("carol@fabrikam.example")],
        },
        headers=IMMUTABLE,
    )
    assert draft.status_code == 201 and draft.json()["isDraft"] is True
    message_id = draft.json()["id"]
    content = bytes(range(256)) * (5 * MiB // 256)
    session = await graph.post(
        f"/me/messages/{_path_id(message_id)}/attachments/createUploadSession",
        json={
            "AttachmentItem": {
                "attachmentType": "file",
                "name": "report.bin",
                "size": len(content),
                "contentType": "application/octet-stream",
            }
        },
    )
    assert session.status_code == 201 and session.json()["nextExpectedRanges"] == ["0-"]
    upload_url = session.json()["uploadUrl"]
    assert upload_url.startswith(f"{sandbox.url}/api/v2.0/")  # absolute, outside /v1.0
    responses = []
    async with httpx.AsyncClient(verify=sandbox_tls, timeout=30) as uploader:  # no token
        for start in range(0, len(content), 3 * MiB):
            chunk = content[start : start + 3 * MiB]
            end = start + len(chunk) - 1
            responses.append(
                await uploader.put(
                    upload_url,
                    content=chunk,
                    headers={"Content-Range": f"bytes {start}-{end}/{len(content)}"},
                )
            )
    assert responses[0].status_code == 200
    assert responses[0].json()["nextExpectedRanges"] == [str(3 * MiB)]
    assert responses[1].status_code == 201 and "Attachments('" in responses[1].headers["Location"]

    sent = await graph.post(f"/me/messages/{_path_id(message_id)}/send", headers=IMMUTABLE)
    in_sent_items = await graph.get(f"/me/messages/{_path_id(message_id)}", headers=IMMUTABLE)
    assert sent.status_code == 202
    assert (
        in_sent_items.json()["parentFolderId"]
        == (await graph.get("/me/mailFolders/sentitems")).json()["id"]
    )
    [delivered] = sandbox.ops(adele).sent(adele)
    assert delivered.recipients == ("carol@fabrikam.example",)
    parsed = email.message_from_bytes(delivered.raw, policy=email.policy.default)
    [attachment] = parsed.iter_attachments()
    assert attachment.get_filename() == "report.bin"
    assert attachment.get_content() == content


async def test_upload_session_rules(
    sandbox: Sandbox, sandbox_tls: Any, graph: httpx.AsyncClient
) -> None:
    draft = await graph.post("/me/messages", json={"subject": "Draft"})
    path = f"/me/messages/{_path_id(draft.json()['id'])}/attachments/createUploadSession"

    def item(size: int) -> dict[str, Any]:
        return {"AttachmentItem": {"attachmentType": "file", "name": "a.bin", "size": size}}

    small = await graph.post(path, json=item(MiB))
    url = (await graph.post(path, json=item(4 * MiB))).json()["uploadUrl"]
    chunk, total = b"x" * MiB, f"/{4 * MiB}"
    async with httpx.AsyncClient(verify=sandbox_tls) as uploader:
        out_of_order = await uploader.put(
            url, content=chunk, headers={"Content-Range": f"bytes {MiB}-{2 * MiB - 1}{total}"}
        )
        with_token = await uploader.put(
            url,
            content=chunk,
            headers={"Content-Range": f"bytes 0-{MiB - 1}{total}", "Authorization": "Bearer x"},
        )
        forged = await uploader.put(
            url.split("?")[0] + "?authtoken=forged",
            content=chunk,
            headers={"Content-Range": f"bytes 0-{MiB - 1}{total}"},
        )
        cancelled = await uploader.delete(url)
        after_cancel = await uploader.put(
            url, content=chunk, headers={"Content-Range": f"bytes 0-{MiB - 1}{total}"}
        )
    assert _graph_error(small)[:2] == (400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
    assert _graph_error(out_of_order)[:2] == (416, "fragmentOutOfOrder")
    assert with_token.status_code == 401
    assert forged.status_code == 401
    assert cancelled.status_code == 204
    assert after_cancel.status_code == 404


async def test_mime_draft_small_attachment_and_tenant_size_limit(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    raw = _raw(7, From=ADDRESS, To="carol@fabrikam.example")
    draft = await graph.post(
        "/me/messages", content=base64.b64encode(raw), headers={"Content-Type": "text/plain"}
    )
    drafts_folder = (await graph.get("/me/mailFolders/drafts")).json()
    assert draft.status_code == 201
    assert draft.json()["isDraft"] is True
    assert draft.json()["parentFolderId"] == drafts_folder["id"]
    path = f"/me/messages/{_path_id(draft.json()['id'])}"
    attachment = await graph.post(
        f"{path}/attachments",
        json={
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": "notes.txt",
            "contentBytes": base64.b64encode(b"n" * 2000).decode(),
        },
    )
    assert attachment.status_code == 201 and attachment.json()["size"] == 2000
    sandbox.microsoft.max_message_bytes = 2000
    too_big = await graph.post(f"{path}/send")
    sandbox.microsoft.max_message_bytes = 35 * MiB
    sent = await graph.post(f"{path}/send")
    again = await graph.post(f"{path}/send")  # its REST id changed when it went to Sent Items
    sent_items = (await graph.get("/me/mailFolders/sentitems/messages")).json()["value"]
    assert _graph_error(too_big) == (
        400,
        "ErrorMessageSizeExceeded",
        "The message exceeds the maximum supported size.",
    )
    assert sent.status_code == 202
    assert _graph_error(again)[:2] == (404, "ErrorItemNotFound")
    [delivered] = sandbox.ops(adele).sent(adele)
    assert b"notes.txt" in delivered.raw
    assert [m["subject"] for m in sent_items] == ["Message 7"]


# -- reading --------------------------------------------------------------------------------


async def test_list_pages_with_absolute_next_links(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    _seed(sandbox, adele, 25)
    url: str | None = "/me/mailFolders/inbox/messages?$select=subject,receivedDateTime&$top=10"
    pages = []
    while url:
        page = await graph.get(url)
        assert page.status_code == 200
        pages.append(page.json()["value"])
        url = page.json().get("@odata.nextLink")
        assert url is None or url.startswith(f"{sandbox.url}/v1.0/me/mailFolders/inbox/messages?")
    subjects = [m["subject"] for page in pages for m in page]
    assert [len(page) for page in pages] == [10, 10, 5]
    assert subjects == [f"Message {n}" for n in reversed(range(25))]  # newest first by default
    assert pages[0][0].keys() == {"@odata.etag", "id", "subject", "receivedDateTime"}
    assert pages[0][0]["receivedDateTime"] == "2025-03-01T08:24:00Z"


async def test_list_filters_and_order(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    ids = _seed(sandbox, adele, 6)
    for message_id in ids[:2]:
        sandbox.ops(adele).set_read(adele, message_id, True)
    base = "/me/mailFolders/inbox/messages?$select=subject&"
    since = await graph.get(
        base + "$filter=receivedDateTime ge 2025-03-01T08:03:00Z and isRead eq false"
        "&$orderby=receivedDateTime desc"
    )
    by_id = await graph.get(
        base + "$filter=internetMessageId eq '<4@fabrikam.example>'&$count=true"
    )
    inefficient = await graph.get(base + "$filter=isRead eq false&$orderby=receivedDateTime desc")
    bad_select = await graph.get(base.replace("subject", "size"))
    bad_top = await graph.get(base + "$top=1001")
    bad_filter = await graph.get(base + "$filter=subject eq 'x'")

    def subjects(response: httpx.Response) -> list[str]:
        return [m["subject"] for m in response.json()["value"]]

    assert _graph_error(inefficient) == (
        400,
        "InefficientFilter",
        "The restriction or sort order is too complex for this operation.",
    )
    assert subjects(since) == ["Message 5", "Message 4", "Message 3"]
    assert by_id.json()["@odata.count"] == 1 and subjects(by_id) == ["Message 4"]
    assert _graph_error(bad_select)[:2] == (400, "RequestBroker--ParseUri")
    assert bad_top.status_code == 400 and bad_filter.status_code == 400


async def test_get_message_json_and_raw_mime(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    raw = _raw(3)
    message_id = sandbox.ops(adele).seed_inbox(adele, raw)
    path = f"/me/messages/{_path_id(message_id)}"
    as_html = await graph.get(path, headers=IMMUTABLE)
    as_text = await graph.get(path, headers={"Prefer": 'outlook.body-content-type="text"'})
    mime = await graph.get(f"{path}/$value")
    in_folder = await graph.get(f"/me/mailFolders/inbox/messages/{_path_id(message_id)}/$value")
    wrong_case = await graph.get(f"/me/messages/{_path_id(message_id.swapcase())}")
    size = await graph.get(
        path, params={"$expand": "singleValueExtendedProperties($filter=id eq 'Integer 0x0E08')"}
    )
    message = as_html.json()
    assert message["id"] == message_id and re.fullmatch(r"[A-Za-z0-9_=-]+", message_id)
    assert as_html.headers["Preference-Applied"] == 'IdType="ImmutableId"'
    assert message["internetMessageId"] == "<3@fabrikam.example>"
    assert message["from"]["emailAddress"] == {
        "name": "Bob Kelly",
        "address": "bob@fabrikam.example",
    }
    assert message["isRead"] is False and message["body"]["contentType"] == "html"
    assert as_text.json()["body"] == {"contentType": "text", "content": "Hello number 3.\r\n"}
    assert as_text.json()["id"] != message_id  # a REST id without the ImmutableId preference
    assert mime.status_code == 200 and mime.content == raw and in_folder.content == raw
    assert mime.headers["Content-Type"].startswith("text/plain")
    assert wrong_case.status_code == 404  # ids are case-sensitive
    [store_size] = size.json()["singleValueExtendedProperties"]
    assert int(store_size["value"]) != len(raw)  # a store size, not the MIME length


async def test_patch_read_and_flag_needs_valid_values(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    [message_id] = _seed(sandbox, adele, 1)
    path = f"/me/messages/{_path_id(message_id)}"
    patched = await graph.patch(path, json={"isRead": True, "flag": {"flagStatus": "flagged"}})
    bad_flag = await graph.patch(path, json={"flag": {"flagStatus": "urgent"}})
    subject = await graph.patch(path, json={"subject": "changed"})
    fetched = await graph.get(path, params={"$select": "isRead,flag"})
    assert patched.status_code == 200
    assert (patched.json()["isRead"], patched.json()["flag"]) == (True, {"flagStatus": "flagged"})
    assert bad_flag.status_code == 400 and subject.status_code == 400
    assert fetched.json()["isRead"] is True and fetched.json()["flag"]["flagStatus"] == "flagged"


async def test_move_changes_rest_ids_but_not_immutable_ids(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    immutable_ids = _seed(sandbox, adele, 2)
    listed = await graph.get("/me/mailFolders/inbox/messages?$orderby=receivedDateTime asc")
    rest_id = listed.json()["value"][0]["id"]
    moved = await graph.post(
        f"/me/messages/{_path_id(rest_id)}/move", json={"destinationId": "archive"}
    )
    stale = await graph.get(f"/me/messages/{_path_id(rest_id)}")
    archive = (await graph.get("/me/mailFolders/archive")).json()
    assert moved.status_code == 201
    assert moved.json()["id"] != rest_id and moved.json()["parentFolderId"] == archive["id"]
    assert _graph_error(stale)[:2] == (404, "ErrorItemNotFound")

    trash = (await graph.get("/me/mailFolders/deleteditems")).json()["id"]
    kept = await graph.post(
        f"/me/messages/{_path_id(immutable_ids[1])}/move",
        json={"destinationId": trash},
        headers=IMMUTABLE,
    )
    in_trash = await graph.get("/me/mailFolders/deleteditems/messages", headers=IMMUTABLE)
    assert kept.status_code == 201 and kept.json()["id"] == immutable_ids[1]
    assert kept.headers["Preference-Applied"] == 'IdType="ImmutableId"'
    assert [m["id"] for m in in_trash.json()["value"]] == [immutable_ids[1]]
    assert sandbox.ops(adele).inbox_ids(adele) == []


async def _delta_round(
    graph: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> tuple[list[list[dict[str, Any]]], str]:
    """Follow nextLinks to the deltaLink; returns the pages and the deltaLink."""
    pages = []
    while True:
        response = await graph.get(url, headers=headers)
        assert response.status_code == 200, response.text
        pages.append(response.json()["value"])
        if "@odata.deltaLink" in response.json():
            return pages, response.json()["@odata.deltaLink"]
        url = response.json()["@odata.nextLink"]


async def test_delta_pages_then_reports_changes_and_removals(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    ids = _seed(sandbox, adele, 5)
    headers = {"Prefer": 'IdType="ImmutableId", odata.maxpagesize=2'}
    first = await graph.get(
        "/me/mailFolders/inbox/messages/delta?$select=subject,isRead", headers=headers
    )
    assert first.headers["Preference-Applied"] == 'IdType="ImmutableId", odata.maxpagesize=2'
    pages, delta_link = await _delta_round(graph, first.json()["@odata.nextLink"], headers)
    pages.insert(0, first.json()["value"])
    assert [len(page) for page in pages] == [2, 2, 1]
    assert sorted(m["id"] for page in pages for m in page) == sorted(ids)
    assert delta_link.startswith(f"{sandbox.url}/v1.0/me/mailFolders/")

    ops = sandbox.ops(adele)
    ops.move(adele, ids[0], "archive")
    ops.delete(adele, ids[1])
    ops.set_read(adele, ids[2], True)
    await graph.patch(f"/me/messages/{_path_id(ids[3])}", json={"flag": {"flagStatus": "flagged"}})
    new_id = ops.seed_inbox(adele, _raw(9))
    pages, delta_link = await _delta_round(graph, delta_link, headers)
    changes = {m["id"]: m for page in pages for m in page}
    assert changes[ids[0]]["@removed"] == {"reason": "deleted"}
    assert changes[ids[1]]["@removed"] == {"reason": "deleted"}
    assert changes[ids[2]]["isRead"] is True
    assert ids[3] in changes and changes[new_id]["subject"] == "Message 9"
    assert ids[4] not in changes
    quiet, _ = await _delta_round(graph, delta_link, headers)
    assert quiet == [[]]


async def test_flagging_in_outlook_shows_in_delta_and_the_control_api_checks_its_body(
    sandbox: Sandbox, sandbox_tls: Any, graph: httpx.AsyncClient, adele: User
) -> None:
    ids = _seed(sandbox, adele, 3)
    select = "/me/mailFolders/inbox/messages/delta?$select=flag"
    _, delta_link = await _delta_round(graph, select, IMMUTABLE)
    sandbox.ops(adele).set_flagged(adele, ids[0], True)
    sandbox.ops(adele).set_flagged(adele, ids[2], True)  # flagged, then cleared below
    async with httpx.AsyncClient(verify=sandbox_tls, base_url=sandbox.url) as control:
        base = f"/_sandbox/users/{ADDRESS}/messages"
        headers = {"X-Sandbox-Control": "1"}
        cleared = await control.post(
            f"{base}/{_path_id(ids[2])}/flag", json={"flagged": False}, headers=headers
        )
        flagged = await control.post(f"{base}/{_path_id(ids[1])}/flag", json={}, headers=headers)
        not_a_bool = await control.post(
            f"{base}/{_path_id(ids[1])}/flag", json={"flagged": "yes"}, headers=headers
        )
        missing = await control.post(f"{base}/AAMkAGI2nothere/flag", json={}, headers=headers)
    assert cleared.json() == {"flagged": False} and flagged.json() == {"flagged": True}
    assert not_a_bool.status_code == 400 and "flagged must be true or false" in not_a_bool.text
    assert missing.status_code == 404
    pages, delta_link = await _delta_round(graph, delta_link, IMMUTABLE)
    changes = {m["id"]: m["flag"]["flagStatus"] for page in pages for m in page}
    assert changes == {ids[0]: "flagged", ids[1]: "flagged", ids[2]: "notFlagged"}
    sandbox.ops(adele).set_flagged(adele, ids[0], True)  # already flagged: no change to report
    assert (await _delta_round(graph, delta_link, IMMUTABLE))[0] == [[]]


async def test_delta_without_immutable_ids_reports_the_old_rest_id(
    sandbox: Sandbox, graph: httpx.AsyncClient, adele: User
) -> None:
    immutable_ids = _seed(sandbox, adele, 2)
    first, delta_link = await _delta_round(graph, "/me/mailFolders/inbox/messages/delta?$top=1", {})
    assert [len(page) for page in first] == [1, 1]
    rest_ids = {m["id"] for page in first for m in page}
    assert rest_ids.isdisjoint(immutable_ids)
    sandbox.ops(adele).move(adele, immutable_ids[0], "trash")
    [[removed]] = (await _delta_round(graph, delta_link, {}))[0]
    assert removed["@removed"] == {"reason": "deleted"} and removed["id"] in rest_ids
    tampered = await graph.get(delta_link.replace("deltatoken=", "deltatoken=x"))
    assert _graph_error(tampered)[:2] == (410, "SyncStateNotFound")
