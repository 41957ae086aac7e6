"""Gmail's batch answers as the gateway reads them: each part's status and headers, whatever
case the part's header names are in (Retry-After inside a 429 part sets the wait)."""

from __future__ import annotations

from gateway.providers._http import retry_after
from gateway.providers._inbox import sort_batch
from gateway.providers.gmail_inbox import _batch_parts

BOUNDARY = "batch_xyz"
ANSWER = (
    b"--batch_xyz\r\n"
    b"Content-Type: application/http\r\n"
    b"Content-ID: <response-0>\r\n\r\n"
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"Retry-After: 7\r\n"
    b"Content-Type: application/json\r\n\r\n"
    b'{"error": {"code": 429}}\r\n'
    b"--batch_xyz\r\n"
    b"Content-Type: application/http\r\n"
    b"content-id: <response-1>\r\n\r\n"
    b"HTTP/1.1 404 Not Found\r\n\r\n"
    b"{}\r\n"
    b"--batch_xyz--\r\n"
)


def test_a_retry_after_inside_a_batch_part_is_the_wait() -> None:
    parts = _batch_parts(ANSWER, BOUNDARY)
    assert [(cid, status) for cid, status, _, _ in parts] == [
        ("response-0", 429),
        ("response-1", 404),
    ]
    assert retry_after(parts[0][2]) == 7.0
    answers = [(cid.removeprefix("response-"), st, body, hd) for cid, st, hd, body in parts]
    batch = sort_batch(["a", "b"], answers, lambda body: None, throttled={429})
    assert batch.gone == ["b"] and batch.retry_after == 7.0
