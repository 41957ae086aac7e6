"""Structured logs: one line per event, fields intact, registered secrets never printed."""

from __future__ import annotations

import io
import json
import logging

from gateway.config import Secret
from gateway.logs import configure_logging, get_logger, redact, register_secret


def test_text_lines_are_logfmt(captured_log: io.StringIO) -> None:
    configure_logging("info", "text", captured_log)
    get_logger("gateway.test").info("listener.started", name="smtp", port=2525, note="two words")
    (line,) = captured_log.getvalue().splitlines()
    assert "level=info logger=gateway.test event=listener.started" in line
    assert 'name=smtp port=2525 note="two words"' in line


def test_json_lines_parse_and_carry_fields(captured_log: io.StringIO) -> None:
    configure_logging("info", "json", captured_log)
    log = get_logger("gateway.test")
    log.info("one", count=1)
    log.debug("hidden")  # below the level
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("failed", step="x")
    lines = captured_log.getvalue().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert len(lines) == 2  # the multi-line traceback stays inside one JSON line
    assert first["event"] == "one" and first["count"] == 1
    assert (
        second["error"] == "RuntimeError: boom\nsecond line" and "Traceback" in second["traceback"]
    )


def test_registered_secrets_are_masked_everywhere(captured_log: io.StringIO) -> None:
    configure_logging("debug", "text", captured_log)
    register_secret("tok-ABCDEF123456")
    Secret("upstream-pw-987", "test")  # config secrets register themselves
    log = get_logger("gateway.test")
    log.info("token.refreshed", token="tok-ABCDEF123456")
    logging.getLogger("some.library").warning("Authorization: Bearer tok-ABCDEF123456")
    log.info("login", detail="password upstream-pw-987 sent")
    output = captured_log.getvalue()
    assert "tok-ABCDEF123456" not in output and "upstream-pw-987" not in output
    assert output.count("[redacted]") == 3


def test_short_values_are_not_treated_as_secrets() -> None:
    register_secret("abc")
    assert redact("abc def") == "abc def"


def test_chatty_libraries_are_held_at_warning(captured_log: io.StringIO) -> None:
    configure_logging("debug", "text", captured_log)
    logging.getLogger("mail.log").info("AUTH PLAIN dXNlcgB1c2VyAHBhc3M=")
    assert captured_log.getvalue() == ""


def test_oauth_credentials_are_masked_by_name_in_any_form(captured_log: io.StringIO) -> None:
    """Values no one registered (MSAL's own request bodies): form, URL, JSON, repr, Bearer."""
    configure_logging("debug", "json", captured_log)
    library = logging.getLogger("msal.token_cache")
    body = {
        "data": {
            "code": "0.AXcode-value-1",
            "code_verifier": "verifier_value_22",
            "client_assertion": "eyJhbGciOi.assertion.sig",
            "scope": ["Mail.Send"],
        }
    }
    library.debug("event=%s", json.dumps(body, indent=4))  # as MSAL logs a token request
    library.debug(
        "POST grant_type=authorization_code&code=0.AXcode-value-2&code_verifier=verifier_33"
        "&client_secret=s3cr3t-value&refresh_token=1.refresh-value&device_code=dev-code-44"
    )
    library.debug("GET /callback?state=abc&code=4/0google-code-5")
    library.debug("auth response %s", {"code": "0.AXcode-value-6", "state": "st"})
    library.debug("Authorization: Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.payload.sig")
    output = captured_log.getvalue()
    for value in (
        "0.AXcode-value",
        "verifier_value_22",
        "eyJhbGciOi.assertion",
        "verifier_33",
        "s3cr3t-value",
        "1.refresh-value",
        "dev-code-44",
        "4/0google-code-5",
        "eyJ0eXAiOiJKV1Qi",
    ):
        assert value not in output, value
    assert output.count("[redacted]") == 11
    assert "Mail.Send" in output and "state=abc" in output  # the rest stays readable


def test_short_or_look_alike_parameters_stay(captured_log: io.StringIO) -> None:
    configure_logging("debug", "text", captured_log)
    log = get_logger("gateway.test")
    log.info("smtp.reply", code=250, user_code="ABCD-EFGH", error_code="invalid_grant")
    logging.getLogger("twisted").warning('WWW-Authenticate: Bearer realm="", error="x"')
    output = captured_log.getvalue()
    assert "code=250" in output and "user_code=ABCD-EFGH" in output
    assert "error_code=invalid_grant" in output and 'Bearer realm=\\"\\"' in output
    assert "[redacted]" not in output
