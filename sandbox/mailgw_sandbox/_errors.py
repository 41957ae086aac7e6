"""The error bodies each real service sends, in one place, so every route answers alike."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

from aiohttp import web


def _now() -> datetime:
    return datetime.now(UTC)


def graph_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Microsoft Graph: ``{"error":{"code","message","innerError":{date,request-id,...}}}``."""
    request_id = str(uuid.uuid4())
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": _now().strftime("%Y-%m-%dT%H:%M:%S"),
                "request-id": request_id,
                "client-request-id": request_id,
            },
        }
    }
    return web.json_response(body, status=status, headers=headers)


def aad_error(
    status: int,
    error: str,
    code: int,
    description: str,
    suberror: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Microsoft identity platform token/device endpoint error (AADSTS codes)."""
    now = _now()
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    body: dict[str, object] = {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\n"
            f"Correlation ID: {correlation}\r\nTimestamp: {stamp}"
        ),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    if suberror:
        body["suberror"] = suberror
    return web.json_response(body, status=status, headers=headers)


_GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def google_api_error(
    status: int,
    reason: str,
    message: str,
    headers: dict[str, str] | None = None,
    location: str | None = None,
) -> web.Response:
    """Google APIs (Gmail): ``{"error":{code, message, errors:[{domain, reason}], status}}``."""
    detail: dict[str, str] = {"domain": "global", "reason": reason, "message": message}
    if location:
        detail.update(locationType="header", location=location)
    body = {
        "error": {
            "code": status,
            "message": message,
            "errors": [detail],
            "status": _GOOGLE_STATUS.get(status, "UNKNOWN"),
        }
    }
    return web.json_response(body, status=status, headers=headers)


def google_oauth_error(
    status: int, error: str, description: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Google's OAuth token endpoint: a flat ``{"error","error_description"}``."""
    body = json.dumps({"error": error, "error_description": description})
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)
